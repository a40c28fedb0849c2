"""Benchmark: the whole ``retention run`` command, as a user types it, against the tools a DBA would pick.

What it measures
----------------
Each scenario builds a narrow table (``id``, ``customer_id``, ``created_at``, a 96-character
``note``) of ``--rows`` rows (default 2,000,000), exactly ``--expired`` of them (default half)
older than the cutoff of a fixed ``as_of``, with a primary key and an index on ``created_at``,
VACUUM ANALYZEd (PostgreSQL) or ANALYZEd (MariaDB). Every method then runs on an identical
fresh copy of that table, interleaved over ``--repeat`` rounds:

* ``command``  ``python -m retention.interfaces.cli run`` in a subprocess, with its connections,
               audit database and signing key in the environment as in production: imports,
               plan, purge, certificate, everything. Its bytecode is compiled first, as an
               installed package's is.
* ``engine``   (PostgreSQL) ``SqlTable.purge`` in this process with a real journal ledger: the
               purge alone, without the command's start-up, plan and certificate.
* ``raw``      one ``DELETE ... WHERE created_at < cutoff`` in one transaction: the speed limit.
* ``pt-archiver`` (MariaDB, when installed) ``pt-archiver --purge --bulk-delete --limit 1000
               --commit-each``.
* ``raw-archive`` (scenario ``pg-archive``, when psql and gzip are installed) ``psql -c "COPY
               (DELETE ... RETURNING *) TO STDOUT" | gzip -1 > file``; the command archives to a
               moto S3 server (a child process) then, and both archives are counted after.

Scenario ``pg-empty`` runs the command on a table with nothing expired: its fixed cost.

The ``floor`` (scenarios pg-empty and pg-delete) is what the stack costs before any of this
engine's code runs: a fresh Python process that imports SQLAlchemy with its psycopg2 dialect
and pydantic, validates a one-field model and runs one ``SELECT 1`` on the bench database.
Every command pays it, so ``best command/raw`` (raw over raw + floor) is the ratio the whole
command could reach if everything of ours cost nothing.

CPU seconds (``cpu s``) of each method are shown split by process: ``client`` (the method's own
child processes: the command, or psql and gzip; for ``engine``, this process), ``pg`` (the PostgreSQL backends of the bench and
audit databases, read from ``/proc`` by the monitor every 10 ms, so a backend's last 10 ms may be
missed) and, in scenario ``pg-archive``, ``moto`` (the S3 server's process).

While a method runs, a monitor samples the database's open transactions every 10 ms and keeps
the oldest one's age: the longest transaction (``longest_tx``; on MariaDB, whose transactions
start to the second only, the longest running statement) and, on PostgreSQL, the longest one
that wrote (``longest_write_tx``: it holds a transaction id, so it may hold row locks; the
plan's counts and the final recount are reads). After each method the table is
checked (exactly ``--expired`` rows gone, the others all there); a failed check makes the
script exit 1, whatever the timings. Ratios are the engine's throughput over the peer's
(1.0 = as fast). Speed is reported, never asserted.

Memory: ``peak RSS`` is the command's whole process at its peak (``wait4``'s ``ru_maxrss``:
interpreter and imports included, so compare it across sizes); ``RSS growth`` is the engine
method's peak over its RSS before the purge. A peer that is not installed is reported as
"peer not installed" (``peers_missing`` in the JSON) and the rest is still measured.

Run::

    /work/main/.venv/bin/python bench/command_purge.py [--scenario pg-delete pg-empty mariadb pg-archive]
        [--rows 2000000] [--expired 1000000] [--workers 1] [--repeat 3] [--pg URL] [--mysql URL] [--json] [--save [PATH]]
"""

from __future__ import annotations

import argparse
import compileall
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "plugins"))

import moto_process  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from harness import (  # noqa: E402
    PLUGINS,
    PeakRss,
    add_common,
    admin_url,
    airflow_conn_uri,
    bench_parser,
    check_common,
    command_env,
    emit,
    interleave,
    kib_as_mib,
    log,
    median_of,
    peer_hidden,
    peer_missing,
    refill_table,
    retention_run_argv,
    run_measured,
    run_sql,
    scalar,
    server_url,
    throwaway_database,
)
from moto_process import CREDENTIALS, REGION, cpu_seconds, plain_client  # noqa: E402

from retention.evidence.signing import generate_keypair  # noqa: E402

AS_OF = datetime(2026, 1, 1, tzinfo=timezone.utc)
RETAIN = timedelta(days=30)
CUTOFF = AS_OF - RETAIN
DEFAULT_MYSQL = "mysql+pymysql://root@127.0.0.1:3306/"
RULE_YAML = """\
category: bench_events
description: Benchmark of the whole command on a narrow event table
owner: bench
legal_basis: Benchmark only
retain_for: P30D
schedule: null
action: {action}
targets:
  - name: events
    kind: sql
    connection: bench_db
    table: events
    key: [id]
    age_column: created_at
    max_fraction: 0.6
    workers: {workers}
{archive}"""
BUCKET = "bench-archive"
ARCHIVE_YAML = f"""\
archive:
  connection: bench_s3
  bucket: {BUCKET}
  prefix: events/
"""


# -- data ------------------------------------------------------------------------------


def pg_pristine(engine: sa.Engine, rows: int, expired: int) -> None:
    """The pristine table every method copies: ``expired`` rows before the cutoff, by id order."""
    # Expired rows are the lower ids, spread over a year before the cutoff; the rest after it.
    run_sql(engine, "DROP TABLE IF EXISTS pristine", f"""
        CREATE TABLE pristine AS
        SELECT g::bigint AS id, (g % 50000)::int AS customer_id,
               CASE WHEN g <= {expired}
                    THEN timestamptz '{CUTOFF.isoformat()}' - ((({expired} - g) % 31536000) + 1) * interval '1 second'
                    ELSE timestamptz '{CUTOFF.isoformat()}' + ((g - {expired}) % 2500000) * interval '1 second'
               END AS created_at,
               rpad(md5(g::text), 96, 'x') AS note
        FROM generate_series(1, {rows}) g""")


def pg_fresh_copy(engine: sa.Engine) -> None:
    """``events`` as a fresh copy of the pristine table, indexed, vacuumed and checkpointed."""
    refill_table(engine, "events", "CREATE TABLE events (id bigint PRIMARY KEY, customer_id int NOT NULL, "
                 "created_at timestamptz NOT NULL, note text NOT NULL)", "pristine", order_by="id",
                 after=("CREATE INDEX events_created_at ON events (created_at)",))


def my_pristine(engine: sa.Engine, rows: int, expired: int) -> None:
    """The MariaDB pristine table (from the Sequence engine), same shape and ages as PostgreSQL's."""
    cutoff = CUTOFF.strftime("%Y-%m-%d %H:%M:%S")
    run_sql(engine, "DROP TABLE IF EXISTS pristine", f"""
        CREATE TABLE pristine ENGINE=InnoDB AS
        SELECT seq AS id, seq % 50000 AS customer_id,
               IF(seq <= {expired},
                  TIMESTAMP '{cutoff}' - INTERVAL ((({expired} - seq) % 31536000) + 1) SECOND,
                  TIMESTAMP '{cutoff}' + INTERVAL ((seq - {expired}) % 2500000) SECOND) AS created_at,
               RPAD(MD5(seq), 96, 'x') AS note
        FROM seq_1_to_{rows}""")


def my_fresh_copy(engine: sa.Engine) -> None:
    """``events`` as a fresh copy of the pristine table, indexed and analyzed."""
    refill_table(engine, "events", "CREATE TABLE events (id bigint PRIMARY KEY, customer_id int NOT NULL, "
                 "created_at datetime(6) NOT NULL, note varchar(96) NOT NULL, KEY events_created_at (created_at)) "
                 "ENGINE=InnoDB", "pristine", order_by="id")


def check_table(engine: sa.Engine, rows: int, expired: int) -> list[str]:
    """What is wrong with ``events`` after a purge (empty: exactly the expired rows went)."""
    left = scalar(engine, "SELECT count(*) FROM events")
    old = scalar(engine, "SELECT count(*) FROM events WHERE created_at < :cutoff", cutoff=_naive(CUTOFF))
    problems = []
    if old:
        problems.append(f"{old} expired rows left")
    if left != rows - expired:
        problems.append(f"{left} rows left, expected {rows - expired}")
    return problems


def _naive(moment: datetime) -> datetime:
    return moment.replace(tzinfo=None)


# -- the longest transaction -------------------------------------------------------------


class TransactionMonitor:
    """Samples the oldest open transaction in the bench database every 10 ms, from a thread."""

    def __init__(self, engine: sa.Engine, database: str, others: tuple[str, ...] = ()):
        self.engine = engine
        self.database = database
        self.databases = [database, *others]  # whose backends' CPU is summed (PostgreSQL)
        self._cpu: dict[int, list[float]] = {}  # backend pid: [CPU when first seen, CPU last seen]
        self.longest = 0.0
        self.longest_write: float | None = None
        """PostgreSQL: the oldest transaction that holds a transaction id (it wrote: it may hold
        row locks); reads (the plan's counts, the final recount) take none."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            sample = self._postgresql(conn) if self.engine.dialect.name == "postgresql" else self._mariadb(conn)
            while not self._stop.is_set():
                age = sample()
                if isinstance(age, tuple):
                    age, wrote = age
                    self.longest_write = max(self.longest_write or 0.0, wrote)
                self.longest = max(self.longest, age)
                time.sleep(0.01)

    def _postgresql(self, conn: sa.Connection):
        query = sa.text("SELECT coalesce(max(extract(epoch FROM clock_timestamp() - xact_start)), 0), "
                        "coalesce(max(extract(epoch FROM clock_timestamp() - xact_start)) "
                        "FILTER (WHERE backend_xid IS NOT NULL), 0) "
                        "FROM pg_stat_activity WHERE datname = :db AND pid <> pg_backend_pid() "
                        "AND xact_start IS NOT NULL AND backend_type = 'client backend'")

        backends = sa.text("SELECT pid FROM pg_stat_activity WHERE datname = ANY(:dbs) AND pid <> pg_backend_pid()")
        first = True

        def sample() -> tuple[float, float]:
            nonlocal first
            any_, wrote = conn.execute(query, {"db": self.database}).one()
            for (pid,) in conn.execute(backends, {"dbs": self.databases}):
                used = cpu_seconds(pid)
                # A backend there before the method ran (the bench's own pool) counts from now.
                self._cpu.setdefault(pid, [used if first else 0.0, used])[1] = used
            first = False
            return float(any_ or 0), float(wrote or 0)
        return sample

    @property
    def backend_cpu(self) -> float | None:
        """CPU seconds the databases' backends used while the monitor ran (PostgreSQL only)."""
        if self.engine.dialect.name != "postgresql":
            return None
        return sum(last - start for start, last in self._cpu.values())

    def _mariadb(self, conn: sa.Connection):
        # InnoDB keeps a transaction's start to the second only: the running statement's age
        # (a batch is one long DELETE and a few short reads) is the finer figure. Read from SHOW
        # PROCESSLIST, aged here to the sample: selecting information_schema.processlist (time_ms)
        # every 10 ms once crashed MariaDB 10.11.19 (signal 11 freeing its temporary table).
        own = conn.execute(sa.text("SELECT CONNECTION_ID()")).scalar()
        ages = StatementAges()

        def sample() -> float:
            rows = conn.exec_driver_sql("SHOW FULL PROCESSLIST").mappings().all()
            return ages.observe(time.monotonic(), [
                (row["Id"], row["Info"], row["Time"]) for row in rows
                if row["db"] == self.database and row["Command"] == "Query" and row["Id"] != own])
        return sample

    def __enter__(self) -> TransactionMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class StatementAges:
    """How long the statements seen running have run, from samples of (connection id, statement
    text, whole seconds it had run when sampled): a statement is the same one while its connection
    shows the same text; first seen, it is as old as its whole seconds."""

    def __init__(self) -> None:
        self._started: dict[tuple, float] = {}

    def observe(self, now: float, running: list[tuple]) -> float:
        """The oldest running statement's age at ``now``, in seconds (0 for none)."""
        self._started = {(conn_id, text): self._started.get((conn_id, text), now - float(seconds or 0))
                         for conn_id, text, seconds in running}
        return max((now - started for started in self._started.values()), default=0.0)


# -- methods -----------------------------------------------------------------------------


class Setup:
    """What every method of one scenario shares: the database, the rule, the command's environment."""

    def __init__(self, args: argparse.Namespace, kind: str, url: sa.URL, audit_url: sa.URL, workdir: Path,
                 s3_server: dict | None = None):
        self.args = args
        self.kind = kind
        self.url = url
        self.engine = sa.create_engine(url)
        self.audit_url = audit_url
        self.workdir = workdir
        self.s3_server = s3_server  # scenario pg-archive: the rule archives to this moto server
        s3_endpoint = self.s3_endpoint = s3_server["endpoint"] if s3_server else None
        action = "archive" if s3_endpoint else "delete"
        self.rules = workdir / f"rules-{action}"
        self.rules.mkdir(exist_ok=True)
        archive = ARCHIVE_YAML if s3_endpoint else ""
        (self.rules / "bench_events.yaml").write_text(RULE_YAML.format(action=action, archive=archive,
                                                                                   workers=args.workers))
        key = workdir / "keys" / "retention-signing.pem"
        if not key.exists():
            generate_keypair(workdir / "keys")
        connections = {"bench_db": airflow_conn_uri(url), "retention_audit": airflow_conn_uri(audit_url)}
        if s3_endpoint:
            connections["bench_s3"] = json.dumps({
                "conn_type": "aws", "login": CREDENTIALS["aws_access_key_id"],
                "password": CREDENTIALS["aws_secret_access_key"],
                "extra": {"region_name": REGION, "endpoint_url": s3_endpoint}})
        self.env = command_env(connections, key)

    def fresh(self) -> None:
        (pg_fresh_copy if self.kind == "postgresql" else my_fresh_copy)(self.engine)
        if self.s3_endpoint:
            empty_bucket(self.s3_endpoint)

    def measure(self, name: str, work) -> dict:
        """Fresh table, then ``work()`` timed under the transaction monitor, then the checks."""
        self.fresh()
        moto = self.s3_server["pid"] if self.s3_server else None
        with TransactionMonitor(self.engine, self.url.database or "", (self.audit_url.database or "",)) as monitor:
            moto_before, children = cpu_seconds(moto) if moto else 0.0, os.times()
            started = time.perf_counter()
            extra = work() or {}
            # The engine alone is timed from inside (its reflection and journal set-up are the plan's).
            seconds = extra.pop("purge_seconds", time.perf_counter() - started)
            after = os.times()
            # The engine method runs in this process (its figure includes the monitor thread's CPU).
            own = after.user - children.user + after.system - children.system if name == "engine" else 0.0
            cpu = {"client": own + after.children_user - children.children_user
                   + after.children_system - children.children_system,
                   "pg": monitor.backend_cpu, "moto": cpu_seconds(moto) - moto_before if moto else None}
        expired = 0 if self.args.scenario_now == "pg-empty" else self.args.expired
        problems = check_table(self.engine, self.args.rows, expired)
        if self.s3_endpoint:
            archived = extra.get("archived") or archived_in_bucket(self.s3_endpoint)
            if archived != expected_archive(expired):
                problems.append(f"the archive holds {archived[0]} rows (ids summing to {archived[1]}), expected "
                                f"{expired} (ids 1..{expired})")
        write = "" if monitor.longest_write is None else f" (longest writing one {monitor.longest_write:.3f}s)"
        log(f"{name}: {seconds:.3f}s, longest transaction {monitor.longest:.3f}s{write}, CPU s "
            + ", ".join(f"{who} {used:.2f}" for who, used in cpu.items() if used is not None)
            + (f" — WRONG: {'; '.join(problems)}" if problems else ""))
        return {"seconds": seconds, "longest_tx": monitor.longest, "longest_write_tx": monitor.longest_write,
                "cpu_s": cpu, "problems": problems, **extra}

    def command(self) -> dict:
        """``retention run`` as a user types it."""
        out, peak_kib = run_measured(
            retention_run_argv(self.rules, AS_OF.strftime("%Y-%m-%dT%H:%M:%SZ"), "--category", "bench_events",
                               "--json"), env=self.env, cwd=self.workdir)
        if out.returncode != 0:
            raise SystemExit(f"retention run failed ({out.returncode}):\n{out.stderr[-3000:]}")
        payload = json.loads(out.stdout.strip().splitlines()[-1])
        return {"status": payload.get("status"), "peak_rss_kib": peak_kib}

    def raw_archive(self) -> dict:
        """``psql -c "COPY (DELETE ... RETURNING *) TO STDOUT" | gzip -1 > file``: the pipeline a DBA
        would type (psql commits the DELETE when the COPY ends); the file's rows are counted after."""
        url, path = self.url, self.workdir / "raw-archive.tsv.gz"
        statement = f"COPY (DELETE FROM events WHERE created_at < '{CUTOFF.isoformat()}' RETURNING *) TO STDOUT"
        env = {**os.environ, **({"PGPASSWORD": str(url.password)} if url.password else {})}
        with open(path, "wb") as file:
            psql = subprocess.Popen(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(url.host), "-p",
                                     str(url.port or 5432), "-U", str(url.username), "-d", str(url.database),
                                     "-c", statement], stdout=subprocess.PIPE, env=env)
            gzip_1 = subprocess.Popen(["gzip", "-1"], stdin=psql.stdout, stdout=file)
            assert psql.stdout is not None
            psql.stdout.close()  # gzip holds the pipe now: psql sees it close if gzip dies
            gzip_1.wait()
            psql.wait()
        if psql.returncode or gzip_1.returncode:
            raise SystemExit(f"the raw archive pipeline failed (psql exit {psql.returncode}, gzip {gzip_1.returncode})")
        lines = id_sum = 0
        with gzip.open(path, "rt") as rows:
            for line in rows:
                lines += 1
                id_sum += int(line.split("\t", 1)[0])
        path.unlink()
        return {"archived": (lines, id_sum)}

    def engine_only(self) -> dict:
        """``SqlTable.purge`` in this process with a journal ledger (the table reflected beforehand,
        as the plan does): the purge alone."""
        from harness import open_journal_run, retention_engine

        from retention.rules.loader import load_rule_file
        from retention.targets.sql.table import SqlTable

        rule_file = load_rule_file(self.rules / "bench_events.yaml")
        target = rule_file.rule.target("events")
        audit, engine = retention_engine(self.audit_url), retention_engine(self.url)
        try:
            journal, run = open_journal_run(audit, rule_file, target, AS_OF)
            table = SqlTable(target, engine)
            table.check()
            with PeakRss() as memory:
                started = time.perf_counter()
                outcome = table.purge(run.cutoff, journal.ledger(run, target.name))
                seconds = time.perf_counter() - started
            return {"purge_seconds": seconds, "deleted": outcome.deleted,
                    "rss_growth_kib": memory.figures["growth_kib"]}
        finally:
            audit.dispose()
            engine.dispose()

    def raw(self) -> dict:
        """One DELETE of every expired row, in one transaction."""
        with self.engine.begin() as conn:
            deleted = conn.execute(sa.text("DELETE FROM events WHERE created_at < :cutoff"),
                                   {"cutoff": CUTOFF if self.kind == "postgresql" else _naive(CUTOFF)}).rowcount
        return {"deleted": deleted}

    def pt_archiver(self) -> dict:
        """pt-archiver, as its manual suggests for a purge: bulk deletes of 1000, a commit each."""
        url = self.url
        subprocess.run(
            ["pt-archiver", "--source", f"h={url.host},P={url.port or 3306},u={url.username},D={url.database},t=events",
             "--where", f"created_at < '{_naive(CUTOFF):%Y-%m-%d %H:%M:%S}'", "--purge", "--bulk-delete",
             "--limit", "1000", "--commit-each", "--no-check-charset"],
            check=True, capture_output=True)
        return {}


# -- the archive scenario's S3 (a moto server in a child process) -------------------------


def seed_bucket(backend) -> dict:
    """The seed for ``moto_process.serve``: the archive's empty bucket."""
    backend.create_bucket(BUCKET, REGION)
    return {}


def empty_bucket(endpoint: str) -> None:
    client = plain_client(endpoint)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        if page.get("Contents"):
            client.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": o["Key"]} for o in page["Contents"]]})
    client.close()


def archived_in_bucket(endpoint: str) -> tuple[int, int]:
    """(rows, sum of their ids) in the bucket's archive bodies (its manifests left out)."""
    client = plain_client(endpoint)
    rows = id_sum = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for item in page.get("Contents", []):
            if item["Key"].endswith("manifest.json"):
                continue
            body = gzip.decompress(client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read())
            for line in body.splitlines():
                if line:
                    rows += 1
                    id_sum += json.loads(line)["id"]
    client.close()
    return rows, id_sum


FLOOR_SCRIPT = """\
import sys
import pydantic
import sqlalchemy as sa
import sqlalchemy.dialects.postgresql.psycopg2  # noqa: F401


class Probe(pydantic.BaseModel):
    x: int


Probe(x=1)
engine = sa.create_engine(sys.argv[1])
with engine.connect() as conn:
    conn.execute(sa.text("SELECT 1"))
"""


def measure_floor(url: sa.URL, repeat: int) -> float:
    """The stack's own start-up (see the module's docstring): the median of ``repeat`` runs, seconds."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", FLOOR_SCRIPT, url.render_as_string(hide_password=False)], check=True)
        times.append(time.perf_counter() - started)
    floor = statistics.median(times)
    log(f"floor (SQLAlchemy + psycopg2 dialect + pydantic + one SELECT 1, nothing of ours): {floor:.3f}s")
    return floor


def expected_archive(expired: int) -> tuple[int, int]:
    """What archiving the expired rows must give: they are ids 1 to ``expired`` (see the pristine tables)."""
    return expired, expired * (expired + 1) // 2


@contextmanager
def archive_server(name: str):
    """For scenario pg-archive, a fresh moto server's endpoint; otherwise None."""
    if name != "pg-archive":
        yield None
        return
    with moto_process.moto_server([os.path.abspath(__file__), "--serve-moto"], 120) as server:
        yield server


def scenario(args: argparse.Namespace, name: str, audit_url: sa.URL, workdir: Path) -> dict:
    """One scenario's methods, interleaved over ``--repeat`` rounds, and their medians and ratios."""
    args.scenario_now = name
    admin = admin_url(args.pg)
    peers: dict[str, str] = {}
    server = server_url(args.mysql, "--mysql (or $RETENTION_BENCH_MYSQL)", DEFAULT_MYSQL) if name == "mariadb" else admin
    with throwaway_database(server, "bench_cmd") as url, archive_server(name) as s3_server:
        kind = "mysql" if name == "mariadb" else "postgresql"
        setup = Setup(args, kind, url, audit_url, workdir, s3_server)
        expired = 0 if name == "pg-empty" else args.expired
        log(f"{name}: building {args.rows:,} rows, {expired:,} expired")
        (my_pristine if kind == "mysql" else pg_pristine)(setup.engine, args.rows, expired)
        methods = {"command": lambda: setup.measure("command", setup.command)}
        if name == "pg-delete":
            methods["engine"] = lambda: setup.measure("engine", setup.engine_only)
        if name == "pg-archive":
            if shutil.which("psql") and shutil.which("gzip") and not peer_hidden("raw-archive"):
                methods["raw-archive"] = lambda: setup.measure("raw-archive", setup.raw_archive)
            else:
                peer_missing(peers, "raw-archive", "needs psql and gzip on PATH")
        elif name != "pg-empty":
            methods["raw"] = lambda: setup.measure("raw", setup.raw)
        if name == "mariadb":
            if shutil.which("pt-archiver") and not peer_hidden("pt-archiver"):
                methods["pt-archiver"] = lambda: setup.measure("pt-archiver", setup.pt_archiver)
            else:
                peer_missing(peers, "pt-archiver", "apt-get install percona-toolkit")
        try:
            runs = interleave(methods, args.repeat)
            floor = measure_floor(url, max(3, args.repeat)) if name in ("pg-empty", "pg-delete") else None
        finally:
            setup.engine.dispose()
    summary: dict = {"rows": args.rows, "expired": expired, "workers": args.workers, "methods": {},
                     "peers_missing": peers, "floor_seconds": floor}
    for method, results in runs.items():
        summary["methods"][method] = {
            "seconds": median_of(results, lambda r: r["seconds"]),
            "longest_tx": max(r["longest_tx"] for r in results),
            "longest_write_tx": max((r["longest_write_tx"] for r in results if r["longest_write_tx"] is not None),
                                    default=None),
            # The command's whole process (interpreter and imports included); the engine's growth in this one.
            "peak_rss_kib": max((r["peak_rss_kib"] for r in results if "peak_rss_kib" in r), default=None),
            "rss_growth_kib": max((r["rss_growth_kib"] for r in results if "rss_growth_kib" in r), default=None),
            # Median CPU seconds per process kind.
            "cpu_s": {who: median_of(results, lambda r, who=who: r["cpu_s"][who])
                      for who in ("client", "pg", "moto") if all(r["cpu_s"][who] is not None for r in results)},
            "rows_per_s": expired / median_of(results, lambda r: r["seconds"]) if expired else None,
            "correct": not any(r["problems"] for r in results),
            "runs": results,
        }
    seconds = {m: s["seconds"] for m, s in summary["methods"].items()}
    summary["ratios"] = {f"{m}/{peer}": seconds[peer] / seconds[m]
                         for m in ("command", "engine") if m in seconds
                         for peer in ("raw", "pt-archiver", "raw-archive") if peer in seconds}
    if floor is not None and "raw" in seconds:
        summary["best_command_ratio"] = seconds["raw"] / (seconds["raw"] + floor)
    return summary


def print_summary(report: dict) -> None:
    for name, summary in report["scenarios"].items():
        print(f"\n{name}: {summary['expired']:,} expired of {summary['rows']:,} rows, workers {summary['workers']}")
        print(f"  {'method':<12} {'seconds':>8} {'rows/s':>10} {'longest tx':>10} {'writing tx':>10} "
              f"{'peak RSS':>10} {'RSS growth':>10}  {'checks':<6}  CPU s")
        for method, figures in summary["methods"].items():
            rate = f"{figures['rows_per_s']:,.0f}" if figures["rows_per_s"] else "-"
            wrote = "-" if figures["longest_write_tx"] is None else f"{figures['longest_write_tx']:.3f}s"
            print(f"  {method:<12} {figures['seconds']:>8.3f} {rate:>10} {figures['longest_tx']:>9.3f}s {wrote:>10} "
                  f"{kib_as_mib(figures['peak_rss_kib']):>10} {kib_as_mib(figures['rss_growth_kib']):>10}  "
                  f"{'ok' if figures['correct'] else 'WRONG':<6}  "
                  + ", ".join(f"{who} {used:.2f}" for who, used in figures["cpu_s"].items()))
        if summary.get("floor_seconds") is not None:
            share = f" ({summary['floor_seconds'] / summary['methods']['command']['seconds']:.0%} of the command)"
            print(f"  floor (the stack's start-up, nothing of ours): {summary['floor_seconds']:.3f}s{share}")
        for ratio, value in summary["ratios"].items():
            print(f"  {ratio}: {value:.2f}x")
        if summary.get("best_command_ratio") is not None:
            print(f"  best command/raw (raw / (raw + floor)): {summary['best_command_ratio']:.2f}x")
        for peer, why in summary["peers_missing"].items():
            print(f"  {peer}: {why}; no ratio against it")


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--scenario", nargs="+", default=["pg-empty", "pg-delete", "mariadb", "pg-archive"],
                        choices=["pg-empty", "pg-delete", "mariadb", "pg-archive"])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--expired", type=int, default=None, help="expired rows (default: half of --rows)")
    parser.add_argument("--mysql", default=os.environ.get("RETENTION_BENCH_MYSQL", DEFAULT_MYSQL),
                        help=f"MariaDB server URL (default $RETENTION_BENCH_MYSQL or {DEFAULT_MYSQL})")
    parser.add_argument("--workers", type=int, default=1,
                        help="the rule's workers: parallel walkers of the expired rows (default 1, the rule default)")
    add_common(parser, repeat_order="command, engine, peers")
    parser.add_argument("--serve-moto", action="store_true", help=argparse.SUPPRESS)  # the S3 child process
    args = parser.parse_args()
    if args.serve_moto:
        moto_process.serve(seed_bucket)
        return 0
    check_common(parser, args)
    args.expired = args.rows // 2 if args.expired is None else args.expired
    if not 0 < args.expired <= args.rows:
        parser.error("need 0 < --expired <= --rows")
    compileall.compile_dir(str(PLUGINS / "retention"), quiet=1)  # as installing the package does
    report: dict = {"as_of": AS_OF.isoformat(), "scenarios": {}}
    with tempfile.TemporaryDirectory() as tmp, throwaway_database(admin_url(args.pg), "bench_cmd_audit") as audit:
        for name in args.scenario:
            report["scenarios"][name] = scenario(args, name, audit, Path(tmp))
    emit(report, args, print_summary)
    correct = all(m["correct"] for s in report["scenarios"].values() for m in s["methods"].values())
    return 0 if correct else 1


if __name__ == "__main__":
    sys.exit(main())
