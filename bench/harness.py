"""The bench harness: what the benchmarks share, so each script holds only what it measures.

A bench script brings its data setup, its engine run, its peer (the plain way of doing the
same work, measured in the same run) and its checks; this module brings the rest:

* command line: :func:`bench_parser` with ``--repeat``, ``--json``, ``--save`` and ``--pg``
  (:func:`add_common`), checked by :func:`check_common`;
* databases: :func:`admin_url`, :func:`throwaway_database` (PostgreSQL or MariaDB, or a clone
  of a template), :func:`refill_table` (a fresh copy of a pristine table, indexed, vacuumed),
  :func:`retention_engine`, :func:`psycopg2_connect`, :func:`run_sql`, :func:`scalar`;
* the ``customers`` table of the sql, shard and archive benches: :func:`build_pristine`,
  :func:`fresh_copy`, :func:`verify`, :func:`on_fresh_copy` (a method on a fresh copy, checked);
* the engine's side of a run: :func:`rule_cutoff`, :func:`open_journal_run`, the connections
  it would resolve (:func:`postgres_spec`, :func:`aws_spec`, :func:`airflow_conn_uri`), and the
  whole command as a user types it (:func:`command_env`, :func:`retention_run_argv`);
* measuring: :func:`interleave` (every method once per round, rounds repeated),
  :class:`Meter` (wall time, this process's CPU and other processes' CPU), peak RSS
  (:class:`PeakRss` for this process, :func:`run_measured` for a command's whole process;
  :func:`proc_status_kib`, :func:`reset_peak_rss`);
* peers: :func:`peer_missing` records a peer that is not installed (and says so), and
  :func:`peer_hidden` treats one as absent when ``$RETENTION_BENCH_WITHOUT_PEERS`` names it;
* checks: :func:`count_problems` (reported and journaled deletions against what should
  have gone), :func:`wrong` (the tail of a per-run log line);
* figures: :func:`percentile`, :func:`ms`, :func:`median_of`, :func:`summarize_runs`
  (median seconds, pooled batch percentiles, the checks' verdict), :func:`ratio_verdict`,
  :func:`all_correct` (the exit code follows the checks, never the timings);
* output: :func:`print_method_table`, :func:`print_runs`, :func:`print_target`,
  :func:`print_missing_peers`, :func:`kib_as_mib`, and
  :func:`emit` (table or JSON, and the JSON saved under ``bench/.results/`` with ``--save``).

Progress goes to stderr (:func:`log`) so that ``--json`` output stays clean.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

import sqlalchemy as sa
from moto_process import CREDENTIALS, REGION, cpu_seconds
from sqlalchemy.engine import URL, Engine, make_url

DEFAULT_PG = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
RESULTS_DIR = Path(__file__).resolve().parent / ".results"


def log(message: str) -> None:
    """Progress goes to stderr so that --json output stays clean."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def count_problems(result: dict, expected: int, unit: str) -> list[str]:
    """A method's own counts against what should have gone: reported and (if any) journaled deletions."""
    problems = []
    if result["deleted"] != expected:
        problems.append(f"reported {result['deleted']} {unit} deleted, expected {expected}")
    if "journaled" in result and result["journaled"] != expected:
        problems.append(f"journal records {result['journaled']} {unit} deleted, expected {expected}")
    return problems


def wrong(problems: list[str]) -> str:
    """The tail of a per-run log line: empty when the run checked out."""
    return "" if not problems else f" — WRONG: {'; '.join(problems)}"


# -- command line --------------------------------------------------------------------


def bench_parser(doc: str, *, epilog: bool = True) -> argparse.ArgumentParser:
    """A parser described by the first line of the script's docstring."""
    return argparse.ArgumentParser(
        description=doc.split("\n")[0],
        epilog="See the module docstring for how to read the figures." if epilog else None,
    )


def add_common(parser: argparse.ArgumentParser, *, repeat_order: str | None = "", pg: bool = True) -> None:
    """The options every bench shares: ``--repeat`` (unless ``repeat_order`` is None),
    ``--pg`` (with ``pg``), ``--json`` and ``--save``."""
    if repeat_order is not None:
        order = f" ({repeat_order})" if repeat_order else ""
        parser.add_argument("--repeat", type=int, default=1,
                            help=f"runs per method, interleaved{order}; medians are reported")
    if pg:
        parser.add_argument("--pg", help=f"admin SQLAlchemy URL (default $RETENTION_BENCH_PG or {DEFAULT_PG})")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    parser.add_argument("--save", metavar="PATH", nargs="?", const="",
                        help="also write the JSON figures to PATH (no PATH: a new file under bench/.results/)")


def check_common(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse common options that cannot work, through ``parser.error`` (exit 2)."""
    if getattr(args, "repeat", 1) < 1:
        parser.error("need --repeat >= 1")
    save = getattr(args, "save", None)
    if save:
        # Checked now, so that a typo in the path does not throw away a long run's figures at the end.
        path = Path(save)
        if path.is_dir():
            parser.error(f"--save {save}: is a directory; give a file name")
        if not path.parent.is_dir():
            parser.error(f"--save {save}: directory {path.parent} does not exist; create it or give another path")
        existed = path.exists()
        try:
            with open(path, "a"):
                pass
        except OSError as error:
            parser.error(f"--save {save}: cannot write there ({error.strerror}); give another path")
        if not existed:
            path.unlink()


# -- databases -----------------------------------------------------------------------


def server_url(value: str, option: str, example: str) -> URL:
    """``value`` (given as ``option``) as a SQLAlchemy URL, or a one-line error naming the option."""
    try:
        return make_url(value)
    except sa.exc.ArgumentError:
        # Not echoed: the value may hold a password.
        raise SystemExit(f"error: {option} is not a SQLAlchemy URL; give one like {example}") from None


def admin_url(argument: str | None) -> URL:
    """The admin connection URL (any database on the server; used to create/drop)."""
    url = server_url(argument or os.environ.get("RETENTION_BENCH_PG") or DEFAULT_PG, "--pg (or $RETENTION_BENCH_PG)",
                     DEFAULT_PG)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg2")
    return url


@contextmanager
def throwaway_database(admin: URL, prefix: str, *, template: str | None = None) -> Iterator[URL]:
    """Create a uniquely named database (PostgreSQL, or MariaDB/MySQL by the URL's dialect);
    drop it (forcibly) however the block ends. ``template``: a PostgreSQL database to clone."""
    # Names are ours (a fixed prefix and hex), never user input; CREATE DATABASE takes no parameters.
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    mysql = admin.get_backend_name() in ("mysql", "mariadb")
    create = (f"CREATE DATABASE {name} CHARACTER SET utf8mb4" if mysql
              else f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else ""))
    engine = sa.create_engine(admin, isolation_level="AUTOCOMMIT")
    try:
        try:
            with engine.connect() as conn:
                conn.execute(sa.text(create))
        except sa.exc.DBAPIError as error:
            where = admin.render_as_string(hide_password=True)
            first = str(error.orig).strip().splitlines()[0] if error.orig else type(error).__name__
            option = "--mysql/--mariadb" if mysql else "--pg or $RETENTION_BENCH_PG"
            raise SystemExit(f"error: cannot create a bench database through {where}: {first}; "
                             f"check {option}") from None
        log(f"created database {name}")
        try:
            yield admin.set(database=name)
        finally:
            with engine.connect() as conn:
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name}" + ("" if mysql else " WITH (FORCE)")))
            log(f"dropped database {name}")
    finally:
        engine.dispose()


def airflow_conn_uri(url: URL) -> str:
    """The ``AIRFLOW_CONN_*`` URI a run resolves for the database at ``url``."""
    scheme = "postgres" if url.get_backend_name() == "postgresql" else "mysql"
    auth = url.username or ""
    if url.password:
        auth += f":{quote(str(url.password), safe='')}"
    return f"{scheme}://{auth}@{url.host}:{url.port or (5432 if scheme == 'postgres' else 3306)}/{url.database}"


def refill_table(engine: Engine, table: str, create: str, source: str, *, order_by: str = "",
                 after: tuple[str, ...] = ()) -> None:
    """``table`` afresh: ``create`` it, copy ``source`` in (in ``order_by`` order), run ``after``
    (keys, indexes), then analyze it; on PostgreSQL also VACUUM and CHECKPOINT, so that the
    method measured next does not pay for the copy's dead tuples and WAL."""
    # Table names are the benches' own constants, never user input.
    order = f" ORDER BY {order_by}" if order_by else ""
    statements = [f"DROP TABLE IF EXISTS {table}", create, f"INSERT INTO {table} SELECT * FROM {source}{order}",
                  *after]
    if engine.dialect.name == "postgresql":
        statements += [f"VACUUM ANALYZE {table}", "CHECKPOINT"]
    else:
        statements.append(f"ANALYZE TABLE {table}")
    run_sql(engine, *statements)


def postgres_spec(url: URL, conn_id: str = "bench_db"):
    """The Airflow-style connection a run would resolve for the PostgreSQL database at ``url``."""
    from retention.connections import ConnectionSpec

    return ConnectionSpec(
        conn_id=conn_id, conn_type="postgres", host=url.host, port=url.port,
        login=url.username, password=url.password, schema=url.database,
    )


def aws_spec(endpoint: str, conn_id: str):
    """The Airflow-style ``aws`` connection a run would resolve for the moto server at ``endpoint``."""
    from retention.connections import ConnectionSpec

    return ConnectionSpec(
        conn_id=conn_id, conn_type="aws", login=CREDENTIALS["aws_access_key_id"],
        password=CREDENTIALS["aws_secret_access_key"], extra={"region_name": REGION, "endpoint_url": endpoint},
    )


def retention_engine(url: URL) -> Engine:
    """An engine built the way a run builds it (UTC sessions, pre-ping, timeouts)."""
    from retention.connections import create_sql_engine

    return create_sql_engine(postgres_spec(url))


def psycopg2_connect(url: URL):
    """A bare psycopg2 connection (for COPY ... TO STDOUT and other peers below SQLAlchemy)."""
    import psycopg2

    return psycopg2.connect(host=url.host, port=url.port or 5432, user=url.username,
                            password=url.password, dbname=url.database)


def run_sql(engine: Engine, *statements: str, **params) -> None:
    """Run statements outside any transaction (VACUUM and CHECKPOINT need that)."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for statement in statements:
            conn.execute(sa.text(statement), params)


def scalar(engine: Engine, statement: str, **params):
    """The one value a statement returns."""
    with engine.connect() as conn:
        return conn.execute(sa.text(statement), params).scalar()


# -- the customers table (sql_purge, shard_purge, archive_purge) -----------------------

CUSTOMERS_AS_OF = datetime(2026, 1, 1, tzinfo=timezone.utc)


def build_pristine(engine: Engine, rows: int, expired: int, cutoff: datetime) -> None:
    """Generate ``customers_pristine`` on the server, in id order, without indexes.

    Rows are ranked by a noisy score (mostly the id, +-2.5% of the table, and 2% of rows
    anywhere); the ``expired`` lowest-ranked rows get ``closed_at`` before the cutoff,
    spaced by ``step`` seconds with jitter, the rest at or after it. Whole seconds, so
    a few ages repeat and the walk has to break ties on the key.
    """
    step = min(60.0, (CUSTOMERS_AS_OF - cutoff).total_seconds() * 0.9 / max(rows - expired, 1))
    run_sql(
        engine,
        "DROP TABLE IF EXISTS customers_pristine",
        """CREATE TABLE customers_pristine (
               id bigint NOT NULL, email text NOT NULL, status text NOT NULL,
               closed_at timestamptz, payload text NOT NULL)""",
    )
    with engine.begin() as conn:
        conn.execute(sa.text("SELECT setseed(0.42)"))
        conn.execute(
            sa.text(
                """
                INSERT INTO customers_pristine
                WITH scored AS (
                    SELECT i, CASE WHEN random() < 0.02 THEN random() * :rows
                                   ELSE i + (random() - 0.5) * :rows * 0.05 END AS score
                    FROM generate_series(1, :rows) AS i
                ), ranked AS (
                    SELECT i, row_number() OVER (ORDER BY score, i) AS r FROM scored
                )
                SELECT i,
                       'customer' || i || '@example.com',
                       CASE WHEN r <= :expired THEN 'closed'
                            ELSE (ARRAY['active', 'closed', 'suspended'])[1 + i % 3] END,
                       date_trunc('second', CAST(:cutoff AS timestamptz)
                           + make_interval(secs => (r - :expired - 1) * :step + random() * :step)),
                       repeat(md5(i::text), 3) || 'abcd'
                FROM ranked
                ORDER BY i
                """
            ),
            {"rows": rows, "expired": expired, "cutoff": cutoff, "step": step},
        )
    run_sql(engine, "VACUUM ANALYZE customers_pristine")


def fresh_copy(engine: Engine) -> None:
    """(Re)create ``customers`` from the pristine copy: same rows, same heap order."""
    refill_table(engine, "customers", "CREATE TABLE customers (LIKE customers_pristine)", "customers_pristine",
                 after=("ALTER TABLE customers ADD PRIMARY KEY (id)",
                        "CREATE INDEX customers_closed_at_idx ON customers (closed_at)"))


def verify(engine: Engine, rows: int, expired: int, cutoff: datetime) -> list[str]:
    """What is wrong with ``customers`` after a purge (empty when it is right)."""
    with engine.connect() as conn:
        left, left_sum = conn.execute(sa.text("SELECT count(*), coalesce(sum(id), 0) FROM customers")).one()
        stale = conn.execute(
            sa.text("SELECT count(*) FROM customers WHERE closed_at < :c"), {"c": cutoff}
        ).scalar()
        kept, kept_sum = conn.execute(
            sa.text("SELECT count(*), coalesce(sum(id), 0) FROM customers_pristine WHERE closed_at >= :c"),
            {"c": cutoff},
        ).one()
    problems = []
    if kept != rows - expired:
        problems.append(f"pristine data has {kept} unexpired rows, expected {rows - expired}")
    if left != rows - expired:
        problems.append(f"{left} rows remain, expected {rows - expired} ({rows - left} gone, expected {expired})")
    if stale:
        problems.append(f"{stale} expired rows remain")
    if left_sum != kept_sum:
        problems.append("the remaining ids differ from the unexpired ids of the pristine copy")
    return problems


def on_fresh_copy(name: str, bench: Engine, measure: Callable[[], dict], rows: int, expired: int,
                  cutoff: datetime) -> dict:
    """One method run on a fresh copy of ``customers``, then the table checked: ``measure()``'s
    result with the table's ``problems`` (the caller adds its own checks)."""
    log(f"{name}: fresh copy of customers")
    fresh_copy(bench)
    log(f"{name}: purging")
    result = measure()
    result["problems"] = verify(bench, rows, expired, cutoff)
    return result


# -- the engine's side of a run ------------------------------------------------------


def rule_cutoff(rule_yaml: str, as_of: datetime) -> datetime:
    """The cutoff a bench rule gives at ``as_of`` (loading it validates the rule text too)."""
    from retention.rules.loader import load_rule_file

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "rule.yaml"
        path.write_text(rule_yaml)
        return load_rule_file(path).rule.cutoff(as_of)


def open_journal_run(audit_engine: Engine, rule_file, target, as_of: datetime):
    """A :class:`RunJournal` with one run open and its target planned, as a run's start leaves it.

    Returns ``(journal, run)``; the ledger is the caller's (some benches time it)."""
    from retention.evidence.audit import ensure_schema
    from retention.plan.model import PlannedTarget
    from retention.run.journal import RunJournal

    ensure_schema(audit_engine)
    journal = RunJournal(audit_engine)
    run = journal.open_run(rule_file, run_id=f"bench-{uuid.uuid4().hex[:8]}", as_of=as_of, code_version="bench")
    journal.plan_target(run, PlannedTarget(target, None, position=0))  # no context: a delete
    return journal, run


PLUGINS = Path(__file__).resolve().parent.parent / "plugins"


def command_env(connections: dict[str, str], signing_key: Path) -> dict[str, str]:
    """The environment of a ``retention run`` subprocess as production gives it: this engine's
    code on the path, ``connections`` (conn id to URI or JSON) as ``AIRFLOW_CONN_*``, the key."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # an installed package has its bytecode
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PLUGINS), env.get("PYTHONPATH", "")) if p)
    env.update({f"AIRFLOW_CONN_{conn_id.upper()}": uri for conn_id, uri in connections.items()})
    env["RETENTION_SIGNING_KEY"] = str(signing_key)
    return env


def retention_run_argv(rules: Path, as_of: str, *options: str) -> list[str]:
    """``retention run`` over the rule files in ``rules`` at ``as_of``, as a user types it."""
    return [sys.executable, "-m", "retention.interfaces.cli", "run", "--rules", str(rules), "--as-of", as_of,
            *options]


# -- measuring -----------------------------------------------------------------------


def interleave(measures: dict[str, Callable[[], dict]], repeat: int) -> dict[str, list[dict]]:
    """Run every method once per round, ``repeat`` rounds: each method's results, in order.

    Interleaving (raw, engine, raw, engine, ...) spreads the shared machine's slow
    moments over all methods instead of over whichever ran last."""
    runs: dict[str, list[dict]] = {name: [] for name in measures}
    for round_no in range(repeat):
        if repeat > 1:
            log(f"round {round_no + 1} of {repeat}")
        for name, measure in measures.items():
            runs[name].append(measure())
    return runs


class Meter:
    """Wall time and CPU time of this process, and of other processes, over a timed section.

    ``others`` maps a figure's name to a process id (a moto server, a PostgreSQL backend);
    after :meth:`stop`, ``figures`` holds ``seconds``, ``client_cpu_s`` and one CPU-seconds
    figure per other process.
    """

    def __init__(self, others: dict[str, int] | None = None):
        self.others = dict(others or {})
        self.figures: dict[str, float] = {}

    def start(self) -> None:
        """Start the clocks."""
        self._others = {name: cpu_seconds(pid) for name, pid in self.others.items()}
        self._cpu = time.process_time()
        self._wall = time.perf_counter()

    def stop(self) -> float:
        """Stop the clocks; the wall seconds since :meth:`start`."""
        seconds = time.perf_counter() - self._wall
        self.figures = {"seconds": seconds, "client_cpu_s": time.process_time() - self._cpu}
        for name, pid in self.others.items():
            self.figures[name] = cpu_seconds(pid) - self._others[name]
        return seconds


def proc_status_kib(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return proc_status_kib("VmHWM") <= proc_status_kib("VmRSS") + 64


class PeakRss:
    """Peak RSS growth of this process over a ``with`` block, in KiB: the peak (VmHWM, reset at
    the start through ``/proc/self/clear_refs``; where that is not allowed, ``ru_maxrss``, which
    then includes everything before the block) minus the RSS at the start (after ``gc.collect``).

    After the block, ``figures`` holds ``baseline_kib``, ``peak_kib``, ``growth_kib`` and ``method``.
    """

    def __init__(self) -> None:
        self.figures: dict = {}

    def __enter__(self) -> PeakRss:
        gc.collect()
        self._baseline = proc_status_kib("VmRSS")
        self._reset = reset_peak_rss()
        return self

    def __exit__(self, *exc: object) -> None:
        peak = proc_status_kib("VmHWM") if self._reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.figures = {"baseline_kib": self._baseline, "peak_kib": peak, "growth_kib": peak - self._baseline,
                        "method": "VmHWM reset by clear_refs" if self._reset else "ru_maxrss"}


def run_measured(argv: list[str], *, env: dict[str, str] | None = None,
                 cwd: str | Path | None = None) -> tuple[subprocess.CompletedProcess, int]:
    """Run a command to its end: its output, and its peak RSS in KiB (the child's own
    ``ru_maxrss``, from ``wait4``: the whole process, interpreter and imports included)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=err, text=True)
        try:
            _pid, status, usage = os.wait4(process.pid, 0)
        except BaseException:
            process.kill()
            process.wait()
            raise
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(argv, process.returncode, out.read(), err.read()), usage.ru_maxrss


def kib_as_mib(kib: int | float | None) -> str:
    """KiB as ``12.3 MiB`` (``-`` for no figure)."""
    return "-" if kib is None else f"{kib / 1024:.1f} MiB"


# -- peers ---------------------------------------------------------------------------

PEER_NOT_INSTALLED = "peer not installed"


def peer_hidden(name: str) -> bool:
    """Whether ``$RETENTION_BENCH_WITHOUT_PEERS`` (comma-separated) names peer ``name``: treated as
    not installed, to see (and test) what a machine without it gets."""
    return name in {p.strip() for p in os.environ.get("RETENTION_BENCH_WITHOUT_PEERS", "").split(",")}


def peer_missing(peers: dict[str, str], name: str, install: str) -> None:
    """Record (in a report's ``peers_missing``) and say that peer ``name`` is absent: the bench
    still measures the engine side, and says so rather than dropping the comparison silently."""
    peers[name] = f"{PEER_NOT_INSTALLED} ({install})"
    log(f"{name}: {PEER_NOT_INSTALLED} ({install}); measuring without it")


def print_missing_peers(report: dict) -> None:
    """One line per absent peer, under the figures."""
    for name, why in report.get("peers_missing", {}).items():
        print(f"{name}: {why}; no ratio against it")


# -- figures -------------------------------------------------------------------------


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def ms(seconds: float) -> float:
    """Seconds as milliseconds, to 0.1 ms."""
    return round(seconds * 1000, 1)


def median_of(runs: list[dict], pick: Callable[[dict], float]) -> float:
    """The median of one figure over a method's runs."""
    return statistics.median(pick(r) for r in runs)


def summarize_runs(name: str, runs: list[dict], done: int, *, rate: str = "rows_per_s",
                   longest: str = "longest_batch_ms", extra: dict | None = None) -> dict:
    """One method's figures over its runs: median seconds, ``done`` items per second,
    batch times (``batch_seconds`` of each run) pooled, and whether every run checked out.

    ``rate`` and ``longest`` name the per-second and longest-batch figures (a script's JSON
    keeps its own names); ``extra`` figures go before the verdict of the checks."""
    seconds = median_of(runs, lambda r: r["seconds"])
    batches = [s for r in runs for s in r["batch_seconds"]]
    out = {
        "method": name,
        "runs": len(runs),
        "seconds": round(seconds, 3),
        "seconds_each_run": [round(r["seconds"], 3) for r in runs],
        rate: round(done / seconds) if seconds else None,
        "batches": int(median_of(runs, lambda r: len(r["batch_seconds"]))),
        longest: ms(max(batches, default=0.0)),
        "p50_batch_ms": ms(percentile(batches, 0.50)),
        "p95_batch_ms": ms(percentile(batches, 0.95)),
        **(extra or {}),
        "correct": not any(r["problems"] for r in runs),
        "problems": [f"run {i + 1}: {p}" for i, r in enumerate(runs) for p in r["problems"]],
    }
    return out


def ratio_verdict(methods: dict[str, dict], target: float, *, method: str = "engine", peer: str = "raw") -> dict:
    """The method against its peer (median times: peer seconds over method seconds), and PASS/FAIL."""
    seconds = methods[method]["seconds"]
    ratio = methods[peer]["seconds"] / seconds if seconds else 0.0
    return {f"ratio_{method}_over_{peer}": round(ratio, 3), "ratio_target": target, "ratio_pass": ratio >= target}


def all_correct(methods: dict[str, dict]) -> bool:
    """Whether every method's every run checked out (the exit code follows this, not timings)."""
    return all(m["correct"] for m in methods.values())


# -- output --------------------------------------------------------------------------


def print_method_table(methods: dict[str, dict], columns: list[tuple[str, str, object]]) -> None:
    """One line per method under a header.

    ``columns`` are (title, format spec, key or function of the method's figures); the
    width is the spec's, the title aligned the same way. A last column says whether the
    method's result was checked correct.
    """
    width = max(len(name) for name in methods) + 1
    cells = []
    for title, spec, _ in columns:
        align, size = spec[0], int(re.match(r"[<>]?(\d+)", spec).group(1))
        cells.append(f"{title:{align}{size}}")
    header = f"{'method':<{width}} " + " ".join(cells) + "  check"
    print(header)
    print("-" * len(header))
    for m in methods.values():
        values = [(value(m) if callable(value) else m[value]) for _, _, value in columns]
        check = "ok" if m["correct"] else "WRONG: " + "; ".join(m["problems"])
        print(f"{m['method']:<{width}} " + " ".join(f"{v:{spec}}" for v, (_, spec, _) in zip(values, columns))
              + f"  {check}")


def print_runs(methods: dict[str, dict], width: int) -> None:
    """With --repeat, every run's seconds under the table."""
    if next(iter(methods.values()))["runs"] <= 1:
        return
    print()
    for m in methods.values():
        print(f"{m['method']:<{width}} seconds per run: {', '.join(f'{s:.2f}' for s in m['seconds_each_run'])}")


def print_target(label: str, value: float, spec: str, relation: str, target: float, passed: bool,
                 width: int = 4) -> None:
    """One verdict line: ``label  value   target >= T  PASS``."""
    print(f"{label:<19}{value:{spec}}   target {relation} {target:<{width}}  {'PASS' if passed else 'FAIL'}")


def emit(report: dict, args: argparse.Namespace, print_summary: Callable[[dict], None]) -> None:
    """The report as a table (``print_summary``) or as JSON (``--json``); with ``--save``
    also as JSON in a file (its path goes to stderr)."""
    save = getattr(args, "save", None)
    if save is not None:
        if save:
            path = Path(save)
        else:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            path = RESULTS_DIR / f"{Path(sys.argv[0]).stem}-{stamp}.json"
            path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
        log(f"figures saved to {path}")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_summary(report)
