"""Benchmark: how fast does the engine anonymize rows in place, on PostgreSQL and MariaDB?

On each backend a throwaway database gets an ``invoices`` table of ``--rows`` rows
(default 200,000); odd ids were issued before the cutoff (one second apart), even ids
recently, so expired and live rows interleave. An ``anonymize`` rule hashes the email
with HMAC-SHA256, nulls the name, redacts the phone to its last two characters and sets a
marker column. These methods run on freshly seeded, identical data, ``--repeat`` rounds
interleaved:

* ``engine``: ``Runner.run`` as ``retention run`` would (journal and certificate in a
  throwaway SQLite audit database): one UPDATE per batch, computed in the database;
* ``engine_wN`` (with ``--workers N`` > 1): the same run with the rule's ``workers: N``
  (N walkers over shares of the expired rows, each on its own connection);
* ``python``: the same run on the per-row Python path (read and lock the batch, compute
  each value in Python, write it back by key), which every batch took before;
* ``raw``: the hand-written set-based statement a DBA would run, ``UPDATE … SET … WHERE
  issued_at < cutoff AND anonymized_at IS NULL``, in one transaction (no batches, no
  journal, no holds), the HMAC as the engine computes it (two ``sha256()`` over the key
  pads): the ceiling;
* ``pgcrypto`` (PostgreSQL, when the server has the extension): the same one statement with
  pgcrypto's ``encode(hmac(email, key, 'sha256'), 'hex')``, as a DBA with pgcrypto would
  write it. Without pgcrypto this peer is left out, said so in the output.

Every method's result is checked: each expired row holds exactly the values Python's
HMAC and redaction give, every other row is untouched (and the engine's certificate counts
every expired row); a failed check exits 1. Printed per backend: seconds and rows/s per
method, batches and the longest one (a transaction holding row locks), on PostgreSQL the CPU
seconds its backends spent (``db cpu s``: steadier than wall time on a shared machine) and
the CPU seconds of the engine's own process (``client cpu s``), the
engine's speed against the Python path and against the one-statement peers, the load average
before and after, and the rows/s target (PostgreSQL ≥ 100,000, MariaDB ≥ 50,000).

``--fillfactor N`` seeds the table with that storage parameter: pages with room let
PostgreSQL update a row in place (a HOT update, no index entries), the case of a table that
has seen updates or deletes; the default is a freshly loaded, full table, the slow case.

Run::

    .venv/bin/python bench/anonymize_purge.py [--rows 200000] [--backends postgresql,mariadb] [--repeat 1]
        [--workers N] [--fillfactor N] [--no-python]
        [--pg postgresql://postgres@127.0.0.1:5432/postgres] [--mariadb mysql+pymysql://root@127.0.0.1:3306/mysql]
        [--json] [--save [PATH]]
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sqlalchemy as sa  # noqa: E402
from harness import (  # noqa: E402
    PeakRss,
    add_common,
    admin_url,
    airflow_conn_uri,
    all_correct,
    bench_parser,
    check_common,
    emit,
    interleave,
    kib_as_mib,
    log,
    print_method_table,
    print_runs,
    print_target,
    server_url,
    summarize_runs,
    throwaway_database,
)
from moto_process import cpu_seconds  # noqa: E402

from retention.connections import from_environment  # noqa: E402
from retention.evidence.audit import open_audit  # noqa: E402
from retention.evidence.signing import Signer, generate_keypair  # noqa: E402
from retention.rules.loader import load_rule_file  # noqa: E402
from retention.run.journal import RunJournal  # noqa: E402
from retention.run.runner import Runner  # noqa: E402
from retention.targets import Targets  # noqa: E402
from retention.targets.sql.anonymize import AnonymizeRows  # noqa: E402
from retention.targets.sql.anonymize_sql import HmacPads  # noqa: E402

AS_OF = datetime(2026, 6, 1, tzinfo=timezone.utc)
CUTOFF = datetime(2023, 6, 1, tzinfo=timezone.utc)  # P3Y before AS_OF
OLD = datetime(2019, 1, 1, tzinfo=timezone.utc)
HASH_KEY = "bench-hash-key-0123456789abcdef"
DEFAULT_MARIADB = "mysql+pymysql://root@127.0.0.1:3306/mysql"
TARGET_ROWS_PER_S = {"postgresql": 100_000, "mariadb": 50_000}
RULE = """\
category: bench_billing
description: Benchmark of anonymizing invoice contacts in place
owner: bench
legal_basis: Benchmark only
retain_for: P3Y
schedule: null
action: anonymize
targets:
  - name: invoices
    kind: sql
    connection: bench_db
    table: invoices
    key: [id]
    age_column: issued_at
    max_fraction: 0.6
    workers: {workers}
    anonymize:
      marker: anonymized_at
      columns:
        email: hash
        billing_name: "null"
        phone: {redact: {keep_last: 2}}
"""
PHONE = "+44 20 7946 0018"
REDACTED = "*" * (len(PHONE) - 2) + PHONE[-2:]


class Backend:
    """What differs between PostgreSQL and MariaDB: DDL, seeding, the raw statements, connection URIs."""

    def __init__(self, name: str, admin: sa.URL, fillfactor: int | None = None):
        self.name = name
        self.admin = admin
        self.fillfactor = fillfactor

    @property
    def label(self) -> str:
        return "PostgreSQL" if self.name == "postgresql" else "MariaDB"

    def database(self):
        """A throwaway database on the backend, dropped however the block ends."""
        return throwaway_database(self.admin, "retention_bench_anon")

    def airflow_uri(self, url: sa.URL) -> str:
        """The connection a run resolves for the bench database."""
        return airflow_conn_uri(url)

    def seed(self, url: sa.URL, rows: int) -> None:
        """A fresh ``invoices`` table: odd ids expired (a second apart), even ids recent, indexed on ``issued_at``."""
        engine = sa.create_engine(url)
        params = {"phone": PHONE, "rows": rows, "old": self._moment(OLD), "new": self._moment(AS_OF - timedelta(days=30))}
        # An int from the command line (checked 10-100), never text.
        storage = f" WITH (fillfactor = {int(self.fillfactor)})" if self.fillfactor else ""
        with engine.begin() as conn:
            conn.execute(sa.text("DROP TABLE IF EXISTS invoices"))
            if self.name == "postgresql":
                conn.execute(sa.text(
                    "CREATE TABLE invoices (id BIGINT PRIMARY KEY, email VARCHAR(100), billing_name VARCHAR(100), "
                    f"phone VARCHAR(30), issued_at TIMESTAMPTZ NOT NULL, anonymized_at TIMESTAMPTZ){storage}"))
                conn.execute(sa.text(
                    "INSERT INTO invoices (id, email, billing_name, phone, issued_at) "
                    "SELECT i, 'p' || i || '@example.com', 'Person ' || i, :phone, "
                    "CASE WHEN i % 2 = 1 THEN :old + make_interval(secs => i) ELSE :new END "
                    "FROM generate_series(1, :rows) AS i"), params)
            else:
                conn.execute(sa.text(
                    "CREATE TABLE invoices (id BIGINT PRIMARY KEY, email VARCHAR(100), billing_name VARCHAR(100), "
                    "phone VARCHAR(30), issued_at DATETIME(6) NOT NULL, anonymized_at DATETIME(6) NULL) ENGINE=InnoDB"))
                # The sequence engine's table names carry the bound: an int from the command line.
                conn.execute(sa.text(
                    "INSERT INTO invoices (id, email, billing_name, phone, issued_at) "
                    "SELECT seq, CONCAT('p', seq, '@example.com'), CONCAT('Person ', seq), :phone, "
                    "IF(seq % 2 = 1, :old + INTERVAL seq SECOND, :new) "
                    f"FROM seq_1_to_{int(rows)}"), params)
            conn.execute(sa.text("CREATE INDEX invoices_issued_at ON invoices (issued_at)"))
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text("VACUUM ANALYZE invoices" if self.name == "postgresql" else "ANALYZE TABLE invoices"))
        engine.dispose()

    def has_pgcrypto(self, url: sa.URL) -> bool:
        """Whether pgcrypto is (or could be made) available in the bench database."""
        if self.name != "postgresql":
            return False
        engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("CREATE EXTENSION IF NOT EXISTS pgcrypto"))
            return True
        except sa.exc.DBAPIError as error:
            log(f"no pgcrypto peer: {str(error.orig).strip().splitlines()[0]}")
            return False
        finally:
            engine.dispose()

    def raw_update(self, peer: str = "raw") -> str:
        """A hand-written set-based statement: ``raw`` hashes over the key pads (bound as
        parameters) as the engine does; ``pgcrypto`` calls pgcrypto's ``hmac()`` with the key."""
        where = "anonymized_at = :as_of WHERE issued_at < :cutoff AND anonymized_at IS NULL"
        if self.name == "postgresql":
            email = ("encode(hmac(convert_to(email, 'UTF8'), :key, 'sha256'), 'hex')" if peer == "pgcrypto" else
                     "encode(sha256(:outer || sha256(:inner || convert_to(email, 'UTF8'))), 'hex')")
            return (f"UPDATE invoices SET email = {email}, billing_name = NULL, "
                    f"phone = repeat('*', greatest(char_length(phone) - 2, 0)) || right(phone, 2), {where}")
        return ("UPDATE invoices SET email = SHA2(CONCAT(UNHEX(:outer), UNHEX(SHA2(CONCAT(UNHEX(:inner), "
                "CAST(CONVERT(email USING utf8mb4) AS BINARY)), 256))), 256), billing_name = NULL, "
                f"phone = CONCAT(REPEAT('*', GREATEST(CHAR_LENGTH(phone) - 2, 0)), RIGHT(phone, 2)), {where}")

    def raw_params(self, peer: str = "raw") -> dict:
        """The raw statement's parameters: pads as bytes (PostgreSQL) or hex (MariaDB's UNHEX); pgcrypto's key."""
        pads = HmacPads.of(HASH_KEY.encode())
        if self.name == "postgresql":
            secret = {"key": HASH_KEY.encode()} if peer == "pgcrypto" else {"inner": pads.inner, "outer": pads.outer}
            return {**secret, "as_of": AS_OF, "cutoff": CUTOFF}
        return {"inner": pads.inner.hex(), "outer": pads.outer.hex(), "as_of": self._moment(AS_OF),
                "cutoff": self._moment(CUTOFF)}

    def backend_pids(self, url: sa.URL) -> list[int]:
        """PostgreSQL: the backends connected to this bench database (the engine's pool), asked
        from a connection of its own."""
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as conn:
                return list(conn.execute(sa.text(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )).scalars())
        finally:
            engine.dispose()

    def _moment(self, moment: datetime) -> datetime:
        # MariaDB's DATETIME is naive and holds UTC, as the engine's sessions do.
        return moment if self.name == "postgresql" else moment.replace(tzinfo=None)


def check(backend: Backend, url: sa.URL) -> list[str]:
    """Every expired row holds exactly the anonymized values; every other row is untouched."""
    problems = []
    engine = sa.create_engine(url)
    marker = backend._moment(AS_OF)
    with engine.connect() as conn:
        for row in conn.execute(sa.text("SELECT id, email, billing_name, phone, anonymized_at FROM invoices")):
            original = f"p{row.id}@example.com"
            if row.id % 2:
                expected = (hmac.new(HASH_KEY.encode(), original.encode(), hashlib.sha256).hexdigest(), None,
                            REDACTED, marker)
            else:
                expected = (original, f"Person {row.id}", PHONE, None)
            if (row.email, row.billing_name, row.phone, row.anonymized_at) != expected:
                problems.append(f"row {row.id}: {tuple(row)[1:]} is not {expected}")
                if len(problems) >= 5:
                    break
    engine.dispose()
    return problems


def engine_run(backend: Backend, url: sa.URL, rows: int, scratch: Path, *, set_based: bool,
               workers: int = 1) -> dict:
    """Seed, then one ``Runner.run`` (set-based or on the per-row Python path), checked."""
    backend.seed(url, rows)
    audit = scratch / f"audit-{uuid.uuid4().hex[:8]}.db"
    rule_path = scratch / f"rules-{workers}" / "bench_billing.yaml"
    rule_path.parent.mkdir(exist_ok=True)
    rule_path.write_text(RULE.replace("{workers}", str(workers)))
    os.environ.update({
        "AIRFLOW_CONN_BENCH_DB": backend.airflow_uri(url),
        "AIRFLOW_CONN_RETENTION_AUDIT": json.dumps({"conn_type": "sqlite", "host": str(audit)}),
    })
    batches: list[float] = []
    previous = AnonymizeRows.set_based
    AnonymizeRows.set_based = set_based
    db_cpu = None
    try:
        with Targets(from_environment) as targets:
            runner = Runner(RunJournal(open_audit(from_environment)), targets, Signer.from_environment())
            with PeakRss() as memory:
                cpu, started = time.process_time(), time.perf_counter()
                certificate = runner.run(load_rule_file(rule_path), run_id="bench", as_of=AS_OF,
                                         progress=lambda _t, _d, _m, _rows, seconds: batches.append(seconds))
                seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
            if backend.name == "postgresql":  # the pool's backends, still open: every one this run used
                db_cpu = sum(cpu_seconds(pid) for pid in backend.backend_pids(url))
    finally:
        AnonymizeRows.set_based = previous
    problems = check(backend, url)
    anonymized = certificate.data["totals"].get("anonymized", 0)
    if anonymized != (rows + 1) // 2:
        problems.append(f"certificate says {anonymized} anonymized, expected {(rows + 1) // 2}")
    method = ("engine" if workers == 1 else f"engine_w{workers}") if set_based else "python"
    log(f"{backend.label} {method}: {seconds:.2f} s, {len(batches)} batches, peak RSS growth "
        f"{kib_as_mib(memory.figures['growth_kib'])}{' — WRONG' if problems else ''}")
    return {"seconds": seconds, "batch_seconds": batches, "db_cpu_s": db_cpu, "client_cpu_s": cpu,
            "problems": problems, "rss_growth_kib": memory.figures["growth_kib"]}


def raw_run(backend: Backend, url: sa.URL, rows: int, peer: str = "raw") -> dict:
    """Seed, then a hand-written UPDATE in one transaction, checked."""
    backend.seed(url, rows)
    engine = sa.create_engine(url)
    db_cpu = None
    with engine.connect() as conn:
        pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar() if backend.name == "postgresql" else None
        conn.rollback()
        before = cpu_seconds(pid) if pid else 0.0
        started = time.perf_counter()
        with conn.begin():
            changed = conn.execute(sa.text(backend.raw_update(peer)), backend.raw_params(peer)).rowcount
        seconds = time.perf_counter() - started
        if pid:
            db_cpu = cpu_seconds(pid) - before
    engine.dispose()
    problems = check(backend, url)
    if changed != (rows + 1) // 2:
        problems.append(f"updated {changed} rows, expected {(rows + 1) // 2}")
    log(f"{backend.label} {peer}: {seconds:.2f} s")
    return {"seconds": seconds, "batch_seconds": [seconds], "db_cpu_s": db_cpu, "client_cpu_s": None,
            "problems": problems}


def _memory(runs: list[dict]) -> dict:
    """The largest peak RSS growth of a method's runs (the engine's; the raw UPDATE has none here)."""
    growth = [r["rss_growth_kib"] for r in runs if "rss_growth_kib" in r]
    return {"rss_growth_kib": max(growth)} if growth else {}


def measure(backend: Backend, rows: int, repeat: int, scratch: Path, workers: int = 1, *,
            python: bool = True) -> dict:
    """Every method on one backend, interleaved; the figures, ratios, target verdict and load."""
    load_before = os.getloadavg()
    with backend.database() as url:
        measures: dict[str, Callable[[], dict]] = {
            "engine": lambda: engine_run(backend, url, rows, scratch, set_based=True),
        }
        if workers > 1:
            measures[f"engine_w{workers}"] = lambda: engine_run(backend, url, rows, scratch, set_based=True,
                                                                workers=workers)
        if python:
            measures["python"] = lambda: engine_run(backend, url, rows, scratch, set_based=False)
        measures["raw"] = lambda: raw_run(backend, url, rows)
        if backend.has_pgcrypto(url):
            measures["pgcrypto"] = lambda: raw_run(backend, url, rows, "pgcrypto")
        runs = interleave(measures, repeat)
    expired = (rows + 1) // 2
    methods = {name: summarize_runs(name, method_runs, expired, extra={"db_cpu_s": _median(method_runs, "db_cpu_s"),
                                                          "client_cpu_s": _median(method_runs, "client_cpu_s"),
                                                          **_memory(method_runs)})
               for name, method_runs in runs.items()}
    engine_s = methods["engine"]["seconds"]
    best = min((m for m in methods.values() if m["method"].startswith("engine")), key=lambda m: m["seconds"])
    target = TARGET_ROWS_PER_S[backend.name]
    peers = [name for name in ("raw", "pgcrypto") if name in methods]
    return {
        "backend": backend.name, "rows": rows, "anonymized": expired, "fillfactor": backend.fillfactor,
        "methods": methods,
        "engine_over_python": round(methods["python"]["seconds"] / engine_s, 2) if engine_s and python else None,
        "engine_over_raw": round(methods["raw"]["seconds"] / engine_s, 3) if engine_s else None,
        "over_peers": {f"{m}/{peer}": round(methods[peer]["seconds"] / methods[m]["seconds"], 3)
                       for m in methods if m.startswith("engine") for peer in peers if methods[m]["seconds"]},
        "target_rows_per_s": target, "best_engine": best["method"],
        "target_pass": (best["rows_per_s"] or 0) >= target,
        "load_average": {"before": [round(x, 2) for x in load_before],
                         "after": [round(x, 2) for x in os.getloadavg()]},
    }


def _median(runs: list[dict], figure: str) -> float | None:
    values = sorted(r[figure] for r in runs if r.get(figure) is not None)
    return round(values[len(values) // 2], 2) if values else None


def main(argv: list[str] | None = None) -> int:
    """Measure every method on every backend asked for; 1 if a check failed."""
    parser = bench_parser(__doc__)
    parser.add_argument("--rows", type=int, default=200_000, help="rows in the table; half expire (default 200,000)")
    parser.add_argument("--backends", default="postgresql,mariadb",
                        help="comma-separated: postgresql, mariadb (default both)")
    parser.add_argument("--mariadb", help=f"MariaDB admin URL (default $RETENTION_BENCH_MARIADB or {DEFAULT_MARIADB})")
    parser.add_argument("--workers", type=int, default=1,
                        help="also run the engine with the rule's workers: N (N > 1; default: only workers: 1)")
    parser.add_argument("--fillfactor", type=int,
                        help="PostgreSQL: seed the table WITH (fillfactor = N), 10-100 (default: none, full pages)")
    parser.add_argument("--no-python", action="store_true",
                        help="leave out the per-row Python path (the longest runs by far)")
    add_common(parser, repeat_order="engine, [engine_wN,] python, raw[, pgcrypto]")
    args = parser.parse_args(argv)
    check_common(parser, args)
    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    if args.rows < 1:
        parser.error("need --rows >= 1")
    if not 1 <= args.workers <= 16:
        parser.error("--workers takes 1 to 16")
    if args.fillfactor is not None and not 10 <= args.fillfactor <= 100:
        parser.error("--fillfactor takes 10 to 100")
    if not names or set(names) - set(TARGET_ROWS_PER_S):
        parser.error("--backends takes postgresql and/or mariadb")
    admins = {"postgresql": admin_url(args.pg),
              "mariadb": server_url(args.mariadb or os.environ.get("RETENTION_BENCH_MARIADB") or DEFAULT_MARIADB,
                                    "--mariadb (or $RETENTION_BENCH_MARIADB)", DEFAULT_MARIADB)}
    report: dict = {"rows": args.rows, "repeat": args.repeat, "workers": args.workers, "backends": {}}
    with tempfile.TemporaryDirectory(prefix="retention-bench-anon-") as scratch:
        os.environ.update({
            "RETENTION_SIGNING_KEY": str(generate_keypair(Path(scratch) / "keys")[0]),
            "RETENTION_HASH_KEY": HASH_KEY,
        })
        for name in names:
            log(f"{name}: {args.rows:,} invoices, {args.repeat} round(s)")
            fillfactor = args.fillfactor if name == "postgresql" else None
            report["backends"][name] = measure(Backend(name, admins[name], fillfactor), args.rows, args.repeat,
                                               Path(scratch), args.workers, python=not args.no_python)
    report["correct"] = all(all_correct(b["methods"]) for b in report["backends"].values())
    emit(report, args, print_summary)
    return 0 if report["correct"] else 1


def print_summary(report: dict) -> None:
    """One table per backend, the ratios, the load and the target."""
    for name, figures in report["backends"].items():
        label = "PostgreSQL" if name == "postgresql" else "MariaDB"
        storage = f", fillfactor {figures['fillfactor']}" if figures.get("fillfactor") else ""
        print(f"\n{label}: anonymize {figures['anonymized']:,} of {figures['rows']:,} rows{storage}")
        methods = figures["methods"]
        columns: list[tuple[str, str, object]] = [
            ("seconds", ">8.2f", "seconds"), ("rows/s", ">9,", "rows_per_s"), ("batches", ">8", "batches"),
            ("longest ms", ">11,.0f", "longest_batch_ms"), ("p95 ms", ">8,.0f", "p95_batch_ms"),
        ]
        columns.append(("client cpu s", ">13", lambda m: _seconds(m["client_cpu_s"])))
        if name == "postgresql":
            columns.append(("db cpu s", ">9", lambda m: _seconds(m["db_cpu_s"])))
        print_method_table(methods, columns)
        print_runs(methods, max(len(m) for m in methods) + 1)
        if figures["engine_over_python"] is not None:
            print(f"engine / python    {figures['engine_over_python']:.2f}x faster than the per-row Python path")
        for pair, ratio in figures["over_peers"].items():
            print(f"{pair:<19}{ratio:.2f}x the one-statement UPDATE (its seconds / the engine's)")
        if name == "postgresql" and "pgcrypto" not in methods:
            print("pgcrypto           not available on this server: no pgcrypto peer")
        print(f"engine peak RSS growth {kib_as_mib(methods['engine'].get('rss_growth_kib'))} during the run")
        load = figures["load_average"]
        print(f"load average       before {', '.join(map(str, load['before']))}; "
              f"after {', '.join(map(str, load['after']))}")
        print_target(f"{figures['best_engine']} rows/s", methods[figures["best_engine"]]["rows_per_s"], ",", ">=",
                     figures["target_rows_per_s"], figures["target_pass"], width=7)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    sys.exit(main())
