"""Benchmark: how fast does the engine anonymize rows in place, on PostgreSQL and MariaDB?

On each backend a throwaway database gets an ``invoices`` table of ``--rows`` rows
(default 200,000); odd ids were issued before the cutoff (one second apart), even ids
recently, so expired and live rows interleave. An ``anonymize`` rule hashes the email
with HMAC-SHA256, nulls the name, redacts the phone to its last two characters and sets a
marker column. Three methods run on freshly seeded, identical data, ``--repeat`` rounds
interleaved:

* ``engine``: ``Runner.run`` as ``retention run`` would (journal and certificate in a
  throwaway SQLite audit database): one UPDATE per batch, computed in the database;
* ``python``: the same run on the per-row Python path (read and lock the batch, compute
  each value in Python, write it back by key), which every batch took before;
* ``raw``: the hand-written set-based statement a DBA would run, ``UPDATE … SET … WHERE
  issued_at < cutoff AND anonymized_at IS NULL``, in one transaction (no batches, no
  journal, no holds): the ceiling.

Every method's result is checked: each expired row holds exactly the values Python's
HMAC and redaction give, every other row is untouched (and the engine's certificate counts
every expired row); a failed check exits 1. Printed per backend: seconds and rows/s per
method, batches and the longest one (a transaction holding row locks), the engine's speed
against the Python path and against the raw statement, and the rows/s target (PostgreSQL
≥ 100,000, MariaDB ≥ 50,000).

Run::

    .venv/bin/python bench/anonymize_purge.py [--rows 200000] [--backends postgresql,mariadb] [--repeat 1]
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
    """What differs between PostgreSQL and MariaDB: DDL, seeding, the raw statement, connection URIs."""

    def __init__(self, name: str, admin: sa.URL):
        self.name = name
        self.admin = admin

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
        with engine.begin() as conn:
            conn.execute(sa.text("DROP TABLE IF EXISTS invoices"))
            if self.name == "postgresql":
                conn.execute(sa.text(
                    "CREATE TABLE invoices (id BIGINT PRIMARY KEY, email VARCHAR(100), billing_name VARCHAR(100), "
                    "phone VARCHAR(30), issued_at TIMESTAMPTZ NOT NULL, anonymized_at TIMESTAMPTZ)"))
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

    def raw_update(self) -> str:
        """The hand-written set-based statement (HMAC over the key pads, bound as parameters)."""
        if self.name == "postgresql":
            return ("UPDATE invoices SET email = encode(sha256(:outer || sha256(:inner || convert_to(email, 'UTF8'))), "
                    "'hex'), billing_name = NULL, phone = repeat('*', greatest(char_length(phone) - 2, 0)) "
                    "|| right(phone, 2), anonymized_at = :as_of WHERE issued_at < :cutoff AND anonymized_at IS NULL")
        return ("UPDATE invoices SET email = SHA2(CONCAT(UNHEX(:outer), UNHEX(SHA2(CONCAT(UNHEX(:inner), "
                "CAST(CONVERT(email USING utf8mb4) AS BINARY)), 256))), 256), billing_name = NULL, "
                "phone = CONCAT(REPEAT('*', GREATEST(CHAR_LENGTH(phone) - 2, 0)), RIGHT(phone, 2)), "
                "anonymized_at = :as_of WHERE issued_at < :cutoff AND anonymized_at IS NULL")

    def raw_params(self) -> dict:
        """The raw statement's parameters: pads as bytes (PostgreSQL) or hex (MariaDB's UNHEX)."""
        pads = HmacPads.of(HASH_KEY.encode())
        if self.name == "postgresql":
            return {"inner": pads.inner, "outer": pads.outer, "as_of": AS_OF, "cutoff": CUTOFF}
        return {"inner": pads.inner.hex(), "outer": pads.outer.hex(), "as_of": self._moment(AS_OF),
                "cutoff": self._moment(CUTOFF)}

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


def engine_run(backend: Backend, url: sa.URL, rows: int, scratch: Path, *, set_based: bool) -> dict:
    """Seed, then one ``Runner.run`` (set-based or on the per-row Python path), checked."""
    backend.seed(url, rows)
    audit = scratch / f"audit-{uuid.uuid4().hex[:8]}.db"
    os.environ.update({
        "AIRFLOW_CONN_BENCH_DB": backend.airflow_uri(url),
        "AIRFLOW_CONN_RETENTION_AUDIT": json.dumps({"conn_type": "sqlite", "host": str(audit)}),
    })
    batches: list[float] = []
    previous = AnonymizeRows.set_based
    AnonymizeRows.set_based = set_based
    try:
        with Targets(from_environment) as targets:
            runner = Runner(RunJournal(open_audit(from_environment)), targets, Signer.from_environment())
            rule_file = load_rule_file(scratch / "rules" / "bench_billing.yaml")
            with PeakRss() as memory:
                started = time.perf_counter()
                certificate = runner.run(rule_file, run_id="bench", as_of=AS_OF,
                                         progress=lambda _t, _d, _m, _rows, seconds: batches.append(seconds))
                seconds = time.perf_counter() - started
    finally:
        AnonymizeRows.set_based = previous
    problems = check(backend, url)
    anonymized = certificate.data["totals"].get("anonymized", 0)
    if anonymized != (rows + 1) // 2:
        problems.append(f"certificate says {anonymized} anonymized, expected {(rows + 1) // 2}")
    method = "engine" if set_based else "python"
    log(f"{backend.label} {method}: {seconds:.2f} s, {len(batches)} batches, peak RSS growth "
        f"{kib_as_mib(memory.figures['growth_kib'])}{' — WRONG' if problems else ''}")
    return {"seconds": seconds, "batch_seconds": batches, "problems": problems,
            "rss_growth_kib": memory.figures["growth_kib"]}


def raw_run(backend: Backend, url: sa.URL, rows: int) -> dict:
    """Seed, then the hand-written UPDATE in one transaction, checked."""
    backend.seed(url, rows)
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        started = time.perf_counter()
        with conn.begin():
            changed = conn.execute(sa.text(backend.raw_update()), backend.raw_params()).rowcount
        seconds = time.perf_counter() - started
    engine.dispose()
    problems = check(backend, url)
    if changed != (rows + 1) // 2:
        problems.append(f"updated {changed} rows, expected {(rows + 1) // 2}")
    log(f"{backend.label} raw: {seconds:.2f} s")
    return {"seconds": seconds, "batch_seconds": [seconds], "problems": problems}


def _memory(runs: list[dict]) -> dict:
    """The largest peak RSS growth of a method's runs (the engine's; the raw UPDATE has none here)."""
    growth = [r["rss_growth_kib"] for r in runs if "rss_growth_kib" in r]
    return {"rss_growth_kib": max(growth)} if growth else {}


def measure(backend: Backend, rows: int, repeat: int, scratch: Path) -> dict:
    """Every method on one backend, interleaved; the figures, ratios and target verdict."""
    with backend.database() as url:
        measures: dict[str, Callable[[], dict]] = {
            "engine": lambda: engine_run(backend, url, rows, scratch, set_based=True),
            "python": lambda: engine_run(backend, url, rows, scratch, set_based=False),
            "raw": lambda: raw_run(backend, url, rows),
        }
        runs = interleave(measures, repeat)
    expired = (rows + 1) // 2
    methods = {name: summarize_runs(name, method_runs, expired, extra=_memory(method_runs))
               for name, method_runs in runs.items()}
    engine_s = methods["engine"]["seconds"]
    target = TARGET_ROWS_PER_S[backend.name]
    return {
        "backend": backend.name, "rows": rows, "anonymized": expired, "methods": methods,
        "engine_over_python": round(methods["python"]["seconds"] / engine_s, 2) if engine_s else None,
        "engine_over_raw": round(methods["raw"]["seconds"] / engine_s, 3) if engine_s else None,
        "target_rows_per_s": target, "target_pass": (methods["engine"]["rows_per_s"] or 0) >= target,
    }


def main(argv: list[str] | None = None) -> int:
    """Measure every method on every backend asked for; 1 if a check failed."""
    parser = bench_parser(__doc__)
    parser.add_argument("--rows", type=int, default=200_000, help="rows in the table; half expire (default 200,000)")
    parser.add_argument("--backends", default="postgresql,mariadb",
                        help="comma-separated: postgresql, mariadb (default both)")
    parser.add_argument("--mariadb", help=f"MariaDB admin URL (default $RETENTION_BENCH_MARIADB or {DEFAULT_MARIADB})")
    add_common(parser, repeat_order="engine, python, raw")
    args = parser.parse_args(argv)
    check_common(parser, args)
    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    if args.rows < 1:
        parser.error("need --rows >= 1")
    if not names or set(names) - set(TARGET_ROWS_PER_S):
        parser.error("--backends takes postgresql and/or mariadb")
    admins = {"postgresql": admin_url(args.pg),
              "mariadb": server_url(args.mariadb or os.environ.get("RETENTION_BENCH_MARIADB") or DEFAULT_MARIADB,
                                    "--mariadb (or $RETENTION_BENCH_MARIADB)", DEFAULT_MARIADB)}
    report: dict = {"rows": args.rows, "repeat": args.repeat, "backends": {}}
    with tempfile.TemporaryDirectory(prefix="retention-bench-anon-") as scratch:
        os.environ.update({
            "RETENTION_SIGNING_KEY": str(generate_keypair(Path(scratch) / "keys")[0]),
            "RETENTION_HASH_KEY": HASH_KEY,
        })
        (Path(scratch) / "rules").mkdir()
        (Path(scratch) / "rules" / "bench_billing.yaml").write_text(RULE)
        for name in names:
            log(f"{name}: {args.rows:,} invoices, {args.repeat} round(s)")
            report["backends"][name] = measure(Backend(name, admins[name]), args.rows, args.repeat, Path(scratch))
    report["correct"] = all(all_correct(b["methods"]) for b in report["backends"].values())
    emit(report, args, print_summary)
    return 0 if report["correct"] else 1


def print_summary(report: dict) -> None:
    """One table per backend, the ratios and the target."""
    for name, figures in report["backends"].items():
        label = "PostgreSQL" if name == "postgresql" else "MariaDB"
        print(f"\n{label}: anonymize {figures['anonymized']:,} of {figures['rows']:,} rows")
        methods = figures["methods"]
        print_method_table(methods, [
            ("seconds", ">8.2f", "seconds"), ("rows/s", ">9,", "rows_per_s"), ("batches", ">8", "batches"),
            ("longest ms", ">11,.0f", "longest_batch_ms"), ("p95 ms", ">8,.0f", "p95_batch_ms"),
        ])
        print_runs(methods, max(len(m) for m in methods) + 1)
        print(f"engine / python    {figures['engine_over_python']:.2f}x faster than the per-row Python path")
        print(f"engine / raw       {figures['engine_over_raw']:.2f}x the hand-written set-based UPDATE")
        print(f"engine peak RSS growth {kib_as_mib(methods['engine'].get('rss_growth_kib'))} during the run")
        print_target("engine rows/s", methods["engine"]["rows_per_s"], ",", ">=", figures["target_rows_per_s"],
                     figures["target_pass"], width=7)


if __name__ == "__main__":
    sys.exit(main())
