"""A real Airflow deployment for tests: api-server, scheduler and dag-processor processes.

``airflow dags test`` runs a DAG in-process and skips what a deployment does: parsing in
a separate dag-processor, pause state in the metadata database, the scheduler creating
runs, LocalExecutor workers talking to the execution API. Tests of that path use
:class:`AirflowStack`: a private ``AIRFLOW_HOME``, a PostgreSQL metadata database, and
the REST API v2 (simple auth manager) to unpause, trigger and read task logs.

Typical use (see test_scheduler_path.py)::

    with AirflowStack(tmp_path / "airflow", dags_folder=ROOT / "dags",
                      metadata_url=pg.url, env={"RETENTION_RULES_DIR": str(rules)}) as stack:
        stack.wait_for_dag("retention__orders")
        stack.unpause("retention__orders")   # the scheduler starts the latest interval's run
        assert stack.wait_for_first_run("retention__orders")["state"] == "success"
        run_id = stack.trigger("retention__orders")
        assert stack.wait_for_run("retention__orders", run_id) == "success"

Every wait is bounded and raises :class:`StackError` with the tail of each process's
output; :meth:`stop` (also on leaving the ``with``) ends the process groups it started.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
FINISHED = ("success", "failed")
ADMIN = "admin"


class StackError(AssertionError):
    """The stack did not reach the state a test waited for; carries the processes' output."""


def free_port() -> int:
    """A TCP port nobody listens on right now (on 127.0.0.1)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class AirflowStack:
    """api-server + scheduler + dag-processor with LocalExecutor on a private home.

    ``metadata_url`` is a SQLAlchemy URL of an empty database (PostgreSQL in the tests:
    Airflow needs ``asyncpg`` for it, from ``apache-airflow[postgres]``). ``env`` is added
    to every process: connections (``AIRFLOW_CONN_*``), ``RETENTION_*`` settings,
    ``PYTHONPATH``. ``parse_interval`` is how often (seconds) the dag-processor re-reads
    the DAGs folder, so an edited rule file shows within a few seconds.
    """

    def __init__(self, home: Path, *, dags_folder: Path, metadata_url: sa.URL | str,
                 env: Mapping[str, str] | None = None, parse_interval: int = 3):
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._password = secrets.token_urlsafe(16)
        self._token: str | None = None
        self.processes: dict[str, subprocess.Popen] = {}
        if isinstance(metadata_url, sa.URL):
            metadata_url = metadata_url.render_as_string(hide_password=False)
        passwords = self.home / "simple_auth_manager_passwords.json"
        passwords.write_text(json.dumps({ADMIN: self._password}))
        # Nothing of the test process's own Airflow configuration leaks in.
        base = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        self.env = {
            **base,
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",  # the production default
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": str(metadata_url),
            "AIRFLOW__CORE__AUTH_MANAGER":
                "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__BASE_URL": self.base_url,
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base_url}/execution/",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": str(parse_interval),
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": str(parse_interval),
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            **(env or {}),
        }

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> AirflowStack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 180) -> None:
        """Migrate the metadata database, start the three processes, wait for the API."""
        migrate = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=self.env,
                                 capture_output=True, text=True, timeout=timeout)
        if migrate.returncode != 0:
            raise StackError(f"airflow db migrate failed:\n{migrate.stdout[-3000:]}\n{migrate.stderr[-3000:]}")
        # As a deployment's init step does: purge tasks run in their connection's pool, and a
        # pool that does not exist is never scheduled.
        rules = self.env.get("RETENTION_RULES_DIR")
        if rules:
            pools = subprocess.run([sys.executable, "-m", "retention.interfaces.cli", "airflow", "sync-pools",
                                    "--rules", rules], env=self.env, capture_output=True, text=True, timeout=timeout)
            if pools.returncode != 0:
                raise StackError(f"retention airflow sync-pools failed:\n{pools.stdout[-3000:]}\n{pools.stderr[-3000:]}")
        for name in ("api-server", "scheduler", "dag-processor"):
            self._spawn(name)
        self.wait_until(lambda: self._healthy(), timeout, "the API server to answer /api/v2/monitor/health")

    def _spawn(self, name: str) -> None:
        output = (self.home / f"{name}.log").open("ab")
        # Its own session, so stop() can end the process with every child it forked.
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "airflow", name], env=self.env, cwd=self.home,
            stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )
        output.close()

    def stop(self, grace: float = 15) -> None:
        """Terminate the process groups this stack started (SIGTERM, then SIGKILL)."""
        for process in self.processes.values():
            if process.poll() is None:
                _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            # Workers forked by LocalExecutor share the group: make sure none outlives the test.
            _signal_group(process, signal.SIGKILL)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.processes.clear()

    def output(self, lines: int = 40) -> str:
        """The last lines each process wrote, for failure messages."""
        parts = []
        for name in ("api-server", "scheduler", "dag-processor"):
            path = self.home / f"{name}.log"
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {name} ---\n" + "\n".join(tail))
        return "\n".join(parts)

    # -- waiting ---------------------------------------------------------------------------

    def wait_until(self, condition: Callable[[], Any], timeout: float, what: str, interval: float = 1.0) -> Any:
        """Poll ``condition`` until it returns something truthy; StackError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise StackError(f"airflow {name} exited with {process.returncode} while waiting for "
                                     f"{what}\n{self.output()}")
            try:
                result = condition()
            except (OSError, urllib.error.URLError, KeyError, ValueError) as exc:
                last_error, result = exc, None
            if result:
                return result
            time.sleep(interval)
        raise StackError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last_error!r})\n"
                         f"{self.output()}")

    def wait_for_dag(self, dag_id: str, condition: Callable[[dict], bool] = lambda dag: True,
                     timeout: float = 120) -> dict:
        """The DAG's REST record once it is parsed (and ``condition`` holds on it)."""
        def check() -> dict | None:
            dag = self.dag(dag_id)
            return dag if dag is not None and condition(dag) else None
        return self.wait_until(check, timeout, f"DAG {dag_id} to be parsed as expected")

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 180) -> str:
        """The final state of a DAG run (success or failed)."""
        def check() -> str | None:
            state = self.api("GET", f"/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}")["state"]
            return state if state in FINISHED else None
        return self.wait_until(check, timeout, f"run {run_id} of {dag_id} to finish")

    def wait_for_task(self, dag_id: str, run_id: str, task_id: str, timeout: float = 180) -> dict:
        """A task instance's REST record once it has finished (any terminal state)."""
        def check() -> dict | None:
            ti = self.api("GET", f"/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}/taskInstances/{_q(task_id)}")
            return ti if ti["state"] in ("success", "failed", "upstream_failed", "skipped") else None
        return self.wait_until(check, timeout, f"task {task_id} of {dag_id} run {run_id} to finish")

    # -- REST API v2 -----------------------------------------------------------------------

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """Call ``/api/v2{path}`` as the admin user; the decoded JSON answer."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.base_url}/api/v2{path}", data=data, method=method, headers={
            "Authorization": f"Bearer {self._bearer()}", "Content-Type": "application/json",
            "Accept": "application/json",
        })
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                self._token = None  # expired: the next call logs in again
            raise ValueError(f"{method} {path}: HTTP {exc.code}: {exc.read().decode(errors='replace')[:500]}") from None
        return json.loads(text) if text else None

    def dag(self, dag_id: str) -> dict | None:
        """The DAG's REST record, or None while it is not (yet) parsed."""
        try:
            return self.api("GET", f"/dags/{_q(dag_id)}")
        except ValueError as exc:
            if "HTTP 404" in str(exc):
                return None
            raise

    def unpause(self, dag_id: str) -> None:
        """Unpause a DAG, as a person does in the UI."""
        self.api("PATCH", f"/dags/{_q(dag_id)}", {"is_paused": False})

    def trigger(self, dag_id: str, conf: Mapping[str, Any] | None = None, *,
                logical_date: datetime | None | str = "now") -> str:
        """Trigger a manual run; its run_id.

        ``logical_date`` defaults to now, as the UI's trigger form fills it in; pass None
        for a run without one (tasks then find no ``logical_date`` in their context).
        """
        if logical_date == "now":
            logical_date = datetime.now(timezone.utc)
        body = {"logical_date": logical_date.isoformat() if isinstance(logical_date, datetime) else None,
                "conf": dict(conf or {})}
        return self.api("POST", f"/dags/{_q(dag_id)}/dagRuns", body)["dag_run_id"]

    def runs(self, dag_id: str) -> list[dict]:
        """The DAG's runs, oldest first."""
        return self.api("GET", f"/dags/{_q(dag_id)}/dagRuns?order_by=id&limit=100")["dag_runs"]

    def wait_for_first_run(self, dag_id: str, timeout: float = 180) -> dict:
        """The DAG's first run once it has finished (e.g. the one the scheduler makes on unpause)."""
        def check() -> dict | None:
            runs = self.runs(dag_id)
            return runs[0] if runs and runs[0]["state"] in FINISHED else None
        return self.wait_until(check, timeout, f"the first run of {dag_id} to finish")

    def import_errors(self) -> list[dict]:
        """The DAG files that currently fail to import."""
        return self.api("GET", "/importErrors")["import_errors"]

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1) -> str:
        """A task attempt's log as text (through the API, else from the log folder)."""
        try:
            answer = self.api("GET", f"/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}/taskInstances/{_q(task_id)}"
                                     f"/logs/{try_number}?full_content=true")
            content = answer.get("content") if isinstance(answer, dict) else answer
            text = "\n".join(json.dumps(c) if not isinstance(c, str) else c for c in content) \
                if isinstance(content, list) else str(content)
        except (ValueError, OSError):
            text = ""
        folder = self.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}"
        files = sorted(folder.glob(f"**/attempt={try_number}.log"))
        return text + "\n" + "\n".join(f.read_text(errors="replace") for f in files)

    def _bearer(self) -> str:
        if self._token is None:
            request = urllib.request.Request(
                f"{self.base_url}/auth/token", method="POST",
                data=json.dumps({"username": ADMIN, "password": self._password}).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=30) as response:
                self._token = json.loads(response.read())["access_token"]
        return self._token

    def _healthy(self) -> bool:
        with urllib.request.urlopen(f"{self.base_url}/api/v2/monitor/health", timeout=5) as response:
            return response.status == 200


def _q(part: str) -> str:
    return urllib.parse.quote(part, safe="")


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)  # the group this stack created for the process
    except (ProcessLookupError, PermissionError):
        pass
