"""Benchmark: how fast does the engine anonymize rows in place in PostgreSQL?

A throwaway database gets an ``invoices`` table of ``--rows`` rows (default 200,000), half
of them issued before the cutoff. A run of an ``anonymize`` rule (email hashed with
HMAC-SHA256, name nulled, phone redacted to its last two characters, a marker column
set) goes through ``Runner.run`` exactly as ``retention run`` would, with its journal
and certificate in a throwaway SQLite audit database. There is no raw reference: the
values are computed in Python (the HMAC key never reaches the database), so the figure
is the engine's rows/s and its longest batch (one transaction holding row locks).

Afterwards every expired row is checked against the expected values and every other
row is checked untouched; a failed check exits 1.

Run::

    .venv/bin/python bench/anonymize_purge.py [--rows 200000] [--pg postgresql://postgres@127.0.0.1:5432/postgres]
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
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sqlalchemy as sa  # noqa: E402
from harness import add_common, admin_url, bench_parser, emit, log, throwaway_database  # noqa: E402

from retention.connections import from_environment  # noqa: E402
from retention.evidence.audit import open_audit  # noqa: E402
from retention.evidence.signing import Signer, generate_keypair  # noqa: E402
from retention.rules.loader import load_rule_file  # noqa: E402
from retention.run.journal import RunJournal  # noqa: E402
from retention.run.runner import Runner  # noqa: E402
from retention.targets import Targets  # noqa: E402

AS_OF = datetime(2026, 6, 1, tzinfo=timezone.utc)
HASH_KEY = "bench-hash-key-0123456789abcdef"
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


def seed(url: sa.URL, rows: int) -> None:
    """The ``invoices`` table: odd ids expired, even ids recent, indexed on ``issued_at``."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(
            "CREATE TABLE invoices (id BIGINT PRIMARY KEY, email VARCHAR(100), billing_name VARCHAR(100), "
            "phone VARCHAR(30), issued_at TIMESTAMPTZ NOT NULL, anonymized_at TIMESTAMPTZ)"))
        # Odd ids are old (expired), even ids recent: expired rows interleave with live ones.
        conn.execute(sa.text(
            "INSERT INTO invoices (id, email, billing_name, phone, issued_at) "
            "SELECT i, 'p' || i || '@example.com', 'Person ' || i, :phone, "
            "CASE WHEN i % 2 = 1 THEN TIMESTAMPTZ '2019-01-01Z' ELSE TIMESTAMPTZ '2026-01-01Z' END "
            "FROM generate_series(1, :rows) AS i"), {"phone": PHONE, "rows": rows})
        conn.execute(sa.text("CREATE INDEX invoices_issued_at ON invoices (issued_at)"))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE invoices"))
    engine.dispose()


def check(url: sa.URL, rows: int) -> list[str]:
    """Every expired row holds exactly the anonymized values; every other row is untouched."""
    problems = []
    engine = sa.create_engine(url)
    redacted = "*" * (len(PHONE) - 2) + PHONE[-2:]
    with engine.connect() as conn:
        for row in conn.execute(sa.text("SELECT id, email, billing_name, phone, anonymized_at FROM invoices")):
            original = f"p{row.id}@example.com"
            if row.id % 2:
                expected = (hmac.new(HASH_KEY.encode(), original.encode(), hashlib.sha256).hexdigest(), None,
                            redacted, AS_OF)
            else:
                expected = (original, f"Person {row.id}", PHONE, None)
            if (row.email, row.billing_name, row.phone, row.anonymized_at) != expected:
                problems.append(f"row {row.id}: {tuple(row)[1:]} is not {expected}")
                if len(problems) >= 5:
                    break
    engine.dispose()
    return problems


def main(argv: list[str] | None = None) -> int:
    """Seed the table, anonymize through ``Runner.run``, check every row; 1 if a check failed."""
    parser = bench_parser(__doc__, epilog=False)
    parser.add_argument("--rows", type=int, default=200_000, help="rows in the table; half expire (default 200,000)")
    add_common(parser, repeat_order=None)
    args = parser.parse_args(argv)
    if args.rows < 1:
        parser.error("need --rows >= 1")
    with throwaway_database(admin_url(args.pg), "retention_bench_anon") as url, \
            tempfile.TemporaryDirectory(prefix="retention-bench-anon-") as scratch:
        log(f"seeding {args.rows:,} invoices")
        seed(url, args.rows)
        os.environ.update({
            "RETENTION_SIGNING_KEY": str(generate_keypair(Path(scratch) / "keys")[0]),
            "RETENTION_HASH_KEY": HASH_KEY,
            "AIRFLOW_CONN_BENCH_DB": f"postgres://{url.username}@{url.host}:{url.port or 5432}/{url.database}",
            "AIRFLOW_CONN_RETENTION_AUDIT": json.dumps({"conn_type": "sqlite", "host": f"{scratch}/audit.db"}),
        })
        (Path(scratch) / "rules").mkdir()
        rule_path = Path(scratch) / "rules" / "bench_billing.yaml"
        rule_path.write_text(RULE)
        batches: list[tuple[int, float]] = []
        with Targets(from_environment) as targets:
            runner = Runner(RunJournal(open_audit(from_environment)), targets, Signer.from_environment())
            log("anonymizing")
            started = time.perf_counter()
            certificate = runner.run(load_rule_file(rule_path), run_id="bench", as_of=AS_OF,
                                     progress=lambda _t, _done, _m, rows, seconds: batches.append((rows, seconds)))
            seconds = time.perf_counter() - started
        problems = check(url, args.rows)
    anonymized = certificate.data["totals"].get("anonymized", 0)
    if anonymized != (args.rows + 1) // 2:
        problems.append(f"certificate says {anonymized} anonymized, expected {(args.rows + 1) // 2}")
    figures = {
        "rows": args.rows, "anonymized": anonymized, "seconds": round(seconds, 2),
        "rows_per_s": round(anonymized / seconds), "batches": len(batches),
        "longest_batch_ms": round(max(s for _, s in batches) * 1000, 1),
        "rows_per_batch_max": max(r for r, _ in batches), "problems": problems,
    }
    emit(figures, args, print_summary)
    return 1 if problems else 0


def print_summary(figures: dict) -> None:
    """The figures as one line."""
    anonymized, rows, seconds, problems = figures["anonymized"], figures["rows"], figures["seconds"], figures["problems"]
    print(f"anonymized {anonymized:,} of {rows:,} rows in {seconds:.2f} s: {figures['rows_per_s']:,} rows/s; "
          f"{figures['batches']} batches (up to {figures['rows_per_batch_max']:,} rows), longest "
          f"{figures['longest_batch_ms']:,.0f} ms; check {'ok' if not problems else 'WRONG: ' + '; '.join(problems)}")


if __name__ == "__main__":
    sys.exit(main())
