"""Benchmark: how fast does the engine purge a PostgreSQL table, and how long are its batches?

What it measures
----------------
A throwaway database gets a ``customers`` table of ``--rows`` rows (default 2,000,000),
exactly ``--expired`` of them (default 1,000,000) closed before the cutoff of a fixed
``as_of``. Expired rows are mostly the older ids, but not perfectly: ids are ranked by a
noisy score, and a few percent of rows get an age unrelated to their id. The table has
a primary key on ``id`` and an index on ``closed_at``, and is VACUUM ANALYZEd.

Each method then runs on an identical fresh copy of that table (rebuilt from a pristine
copy, re-indexed, vacuumed, checkpointed):

* ``raw``    one ``DELETE FROM customers WHERE closed_at < cutoff`` in one transaction:
             the speed limit, but one long transaction holding a million row locks.
* ``engine`` ``SqlTable.purge`` with a real :class:`RunJournal` ledger in a second
             throwaway PostgreSQL database, exactly as a run would use it. Every batch's
             duration (the whole batch: walk, delete, journal writes, commit) is recorded.
* ``ctid``   (reference, skip with ``--no-ctid``) the naive loop from REFERENCES.md:
             ``DELETE ... WHERE ctid = ANY(ARRAY(SELECT ctid ... LIMIT 10000))``, one
             transaction per batch, no journal.

After each method the table is checked: exactly ``--expired`` rows gone, the others all
there (count and sum of ids match the pristine copy), no expired row left. A failed
check makes the script exit 1; otherwise it exits 0 whatever the timings.

How to read the summary
-----------------------
``seconds`` is the wall time of the whole method (for the engine: the whole
``purge`` call, final recount included). ``rows/s`` is expired rows deleted per second.
``ratio`` is engine rows/s over raw rows/s (1.0 = as fast as one big DELETE). The
targets are ratio >= 0.5 and longest batch <= 0.5 s (a batch is one transaction, so its
length is how long the engine holds locks and holds back vacuum at a stretch).
``p50``/``p95`` are of batch times. "outside batches" is engine time not spent in a
batch transaction: mostly the recount of expired rows after the walk.

Timings on a shared machine are noisy (+-25% run to run here); ``--repeat K`` runs
every method K times, interleaved, and reports median seconds, pooled batch
percentiles and the worst batch of all runs.

Run::

    /work/main/.venv/bin/python bench/sql_purge.py [--rows 2000000] [--expired 1000000]
        [--repeat 3] [--pg postgresql://postgres@127.0.0.1:5432/postgres] [--no-ctid] [--json]

The admin URL may also come from RETENTION_BENCH_PG. Both databases are dropped at
the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url

from retention.audit import ensure_schema
from retention.connections import ConnectionSpec, create_sql_engine
from retention.journal import RunJournal
from retention.rules import load_rule_file
from retention.targets.sql import SqlTable

DEFAULT_PG = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
AS_OF = datetime(2026, 1, 1, tzinfo=timezone.utc)
RULE_YAML = """\
category: bench_customers
description: Benchmark of the SQL purge on closed customer accounts
owner: bench
legal_basis: Benchmark only
retain_for: P2Y
schedule: null
action: delete
targets:
  - name: customers
    kind: sql
    connection: bench_db
    table: customers
    key: [id]
    age_column: closed_at
"""
TARGET_RATIO = 0.5
TARGET_LONGEST_BATCH_S = 0.5
CTID_BATCH = 10_000


def log(message: str) -> None:
    """Progress goes to stderr so that --json output stays clean."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# -- databases -----------------------------------------------------------------------


def admin_url(argument: str | None) -> URL:
    """The admin connection URL (any database on the server; used to create/drop)."""
    url = make_url(argument or os.environ.get("RETENTION_BENCH_PG") or DEFAULT_PG)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg2")
    return url


@contextmanager
def throwaway_database(admin: URL, prefix: str) -> Iterator[URL]:
    """Create a uniquely named database; drop it (forcibly) however the block ends."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    engine = sa.create_engine(admin, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(sa.text(f"CREATE DATABASE {name}"))
        log(f"created database {name}")
        try:
            yield admin.set(database=name)
        finally:
            with engine.connect() as conn:
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            log(f"dropped database {name}")
    finally:
        engine.dispose()


def retention_engine(url: URL) -> Engine:
    """An engine built the way a run builds it (UTC sessions, pre-ping, timeouts)."""
    spec = ConnectionSpec(
        conn_id="bench_db", conn_type="postgres", host=url.host, port=url.port,
        login=url.username, password=url.password, schema=url.database,
    )
    return create_sql_engine(spec)


def run_sql(engine: Engine, *statements: str, **params) -> None:
    """Run statements outside any transaction (VACUUM and CHECKPOINT need that)."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for statement in statements:
            conn.execute(sa.text(statement), params)


def scalar(engine: Engine, statement: str, **params):
    with engine.connect() as conn:
        return conn.execute(sa.text(statement), params).scalar()


# -- data ----------------------------------------------------------------------------


def build_pristine(engine: Engine, rows: int, expired: int, cutoff: datetime) -> None:
    """Generate ``customers_pristine`` on the server, in id order, without indexes.

    Rows are ranked by a noisy score (mostly the id, +-2.5% of the table, and 2% of rows
    anywhere); the ``expired`` lowest-ranked rows get ``closed_at`` before the cutoff,
    spaced by ``step`` seconds with jitter, the rest at or after it. Whole seconds, so
    a few ages repeat and the walk has to break ties on the key.
    """
    step = min(60.0, (AS_OF - cutoff).total_seconds() * 0.9 / max(rows - expired, 1))
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
    run_sql(
        engine,
        "DROP TABLE IF EXISTS customers",
        "CREATE TABLE customers (LIKE customers_pristine)",
        "INSERT INTO customers SELECT * FROM customers_pristine",
        "ALTER TABLE customers ADD PRIMARY KEY (id)",
        "CREATE INDEX customers_closed_at_idx ON customers (closed_at)",
        "VACUUM ANALYZE customers",
        "CHECKPOINT",
    )


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


# -- methods -------------------------------------------------------------------------


def measure_raw(engine: Engine, cutoff: datetime) -> dict:
    """One DELETE of every expired row, one transaction."""
    started = time.perf_counter()
    with engine.begin() as conn:
        deleted = conn.execute(sa.text("DELETE FROM customers WHERE closed_at < :c"), {"c": cutoff}).rowcount
    seconds = time.perf_counter() - started
    return {"deleted": deleted, "seconds": seconds, "batch_seconds": [seconds]}


def measure_ctid(engine: Engine, cutoff: datetime, batch: int = CTID_BATCH) -> dict:
    """The naive reference loop: delete ``batch`` expired rows by ctid per transaction."""
    statement = sa.text(
        "DELETE FROM customers WHERE ctid = ANY(ARRAY("
        "SELECT ctid FROM customers WHERE closed_at < :c LIMIT :n))"
    )
    batches, deleted = [], 0
    started = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        with engine.begin() as conn:
            rows = conn.execute(statement, {"c": cutoff, "n": batch}).rowcount
        batches.append(time.perf_counter() - t0)
        deleted += rows
        if rows < batch:
            break
    return {"deleted": deleted, "seconds": time.perf_counter() - started, "batch_seconds": batches}


def measure_engine(bench_url: URL, audit_url: URL, rule_dir: Path, cutoff: datetime) -> dict:
    """SqlTable.purge with a RunJournal ledger in the audit database, as a run does it."""
    rule_path = rule_dir / "bench_customers.yaml"
    rule_path.write_text(RULE_YAML)
    rule_file = load_rule_file(rule_path)
    target = rule_file.rule.target("customers")
    assert rule_file.rule.cutoff(AS_OF) == cutoff

    audit_engine = retention_engine(audit_url)
    engine = retention_engine(bench_url)
    try:
        ensure_schema(audit_engine)
        journal = RunJournal(audit_engine)
        run = journal.open_run(rule_file, run_id=f"bench-{uuid.uuid4().hex[:8]}", as_of=AS_OF, code_version="bench")
        journal.plan_target(
            run, position=0, name=target.name, kind=target.kind, location=target.location,
            definition=target.model_dump(mode="json"),
        )
        ledger = journal.ledger(run, target.name)
        table = SqlTable(target, engine)
        table.check()  # reflect before the clock starts, as Runner.start does when planning
        batches: list[tuple[int, float]] = []

        def progress(_deleted: int, rows: int, seconds: float) -> None:
            batches.append((rows, seconds))

        started = time.perf_counter()
        outcome = table.purge(run.cutoff, ledger, progress=progress)
        seconds = time.perf_counter() - started
        journaled = ledger.deleted()
    finally:
        engine.dispose()
        audit_engine.dispose()
    return {
        "deleted": outcome.deleted,
        "remaining": outcome.remaining,
        "journaled": journaled,
        "seconds": seconds,
        "batch_seconds": [s for _, s in batches],
        "batch_rows": [r for r, _ in batches],
    }


# -- report --------------------------------------------------------------------------


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def summarize(name: str, runs: list[dict], expired: int) -> dict:
    """One method's figures over its runs: median time, batch times pooled, worst batch."""
    seconds = statistics.median(r["seconds"] for r in runs)
    batches = [s for r in runs for s in r["batch_seconds"]]
    out = {
        "method": name,
        "runs": len(runs),
        "seconds": round(seconds, 3),
        "seconds_each_run": [round(r["seconds"], 3) for r in runs],
        "rows_per_s": round(expired / seconds) if seconds else None,
        "batches": int(statistics.median(len(r["batch_seconds"]) for r in runs)),
        "longest_batch_ms": ms(max(batches)),
        "p50_batch_ms": ms(percentile(batches, 0.50)),
        "p95_batch_ms": ms(percentile(batches, 0.95)),
        "correct": not any(r["problems"] for r in runs),
        "problems": [f"run {i + 1}: {p}" for i, r in enumerate(runs) for p in r["problems"]],
    }
    if name == "engine":
        rows = [n for r in runs for n in r["batch_rows"]]
        out["batch_rows_p50"] = int(percentile(rows, 0.50))
        out["batch_rows_max"] = max(rows)
        # Time spent outside batch transactions: reconciling, and recounting what is left.
        out["outside_batches_s"] = round(
            statistics.median(r["seconds"] - sum(r["batch_seconds"]) for r in runs), 3
        )
        out["batch_ms_each_run"] = [[ms(s) for s in r["batch_seconds"]] for r in runs]
    return out


def verdict(methods: dict[str, dict]) -> dict:
    """Engine vs raw (median times), and PASS/FAIL against the targets."""
    raw, engine = methods["raw"], methods["engine"]
    ratio = raw["seconds"] / engine["seconds"] if engine["seconds"] else 0.0
    longest_s = engine["longest_batch_ms"] / 1000
    return {
        "ratio_engine_over_raw": round(ratio, 3),
        "ratio_target": TARGET_RATIO,
        "ratio_pass": ratio >= TARGET_RATIO,
        "longest_batch_s": round(longest_s, 3),
        "longest_batch_target_s": TARGET_LONGEST_BATCH_S,
        "longest_batch_pass": longest_s <= TARGET_LONGEST_BATCH_S,
    }


def print_summary(report: dict) -> None:
    rows, expired, methods, v = report["rows"], report["expired"], report["methods"], report["verdict"]
    runs = methods["raw"]["runs"]
    print()
    print(f"table customers: {rows:,} rows, {expired:,} expired (cutoff {report['cutoff']}), "
          f"PostgreSQL {report['server_version']}")
    if runs > 1:
        print(f"{runs} runs per method, each on a fresh copy; seconds are medians, batch figures pooled")
    print()
    print_method_table(methods, [
        ("seconds", ">8.2f", "seconds"), ("rows/s", ">10,", "rows_per_s"), ("batches", ">8,", "batches"),
        ("longest ms", ">11,.1f", "longest_batch_ms"), ("p50 ms", ">8.1f", "p50_batch_ms"),
        ("p95 ms", ">8.1f", "p95_batch_ms"),
    ])
    print_runs(methods, 8)
    engine = methods["engine"]
    print()
    print(f"engine: rows per batch p50 {engine['batch_rows_p50']:,}, max {engine['batch_rows_max']:,}; "
          f"{engine['outside_batches_s']:.2f} s outside batches (final recount, reconcile)")
    print(f"ratio engine/raw   {v['ratio_engine_over_raw']:>6.2f}   target >= {TARGET_RATIO:<4}  "
          f"{'PASS' if v['ratio_pass'] else 'FAIL'}")
    print(f"longest batch (s)  {v['longest_batch_s']:>6.3f}   target <= {TARGET_LONGEST_BATCH_S:<4}  "
          f"{'PASS' if v['longest_batch_pass'] else 'FAIL'}")


def print_method_table(methods: dict[str, dict], columns: list[tuple[str, str, object]]) -> None:
    """One line per method under a header (shared by the benchmarks).

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
    """With --repeat, every run's seconds under the table (shared by the benchmarks)."""
    if next(iter(methods.values()))["runs"] <= 1:
        return
    print()
    for m in methods.values():
        print(f"{m['method']:<{width}} seconds per run: {', '.join(f'{s:.2f}' for s in m['seconds_each_run'])}")


# -- main ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], epilog="See the module docstring for how to read the figures."
    )
    parser.add_argument("--rows", type=int, default=2_000_000, help="rows in the table (default 2,000,000)")
    parser.add_argument("--expired", type=int, default=1_000_000, help="rows expired at as_of (default 1,000,000)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per method, interleaved (raw, engine, ctid, raw, ...); medians are reported")
    parser.add_argument("--pg", help=f"admin SQLAlchemy URL (default $RETENTION_BENCH_PG or {DEFAULT_PG})")
    parser.add_argument("--no-ctid", action="store_true", help="skip the naive ctid reference loop")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    args = parser.parse_args(argv)
    if not 0 < args.expired <= args.rows:
        parser.error("need 0 < --expired <= --rows")
    if args.repeat < 1:
        parser.error("need --repeat >= 1")
    return args


def run_method(name: str, bench: Engine, args: argparse.Namespace, cutoff: datetime, measure) -> dict:
    """One timed run of a method on a fresh copy, checked afterwards."""
    log(f"{name}: fresh copy of customers")
    fresh_copy(bench)
    log(f"{name}: purging")
    result = measure()
    problems = verify(bench, args.rows, args.expired, cutoff)
    if result["deleted"] != args.expired:
        problems.append(f"reported {result['deleted']} rows deleted, expected {args.expired}")
    if "journaled" in result and result["journaled"] != args.expired:
        problems.append(f"journal records {result['journaled']} rows deleted, expected {args.expired}")
    if result.get("remaining"):
        problems.append(f"purge reported {result['remaining']} expired rows remaining")
    result["problems"] = problems
    log(f"{name}: {result['seconds']:.2f} s, {len(result['batch_seconds'])} batches, "
        f"longest {max(result['batch_seconds']) * 1000:.1f} ms"
        + ("" if not problems else f" — WRONG: {'; '.join(problems)}"))
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    admin = admin_url(args.pg)
    cutoff = load_rule_cutoff()
    with throwaway_database(admin, "retention_bench") as bench_url, \
            throwaway_database(admin, "retention_bench_audit") as audit_url, \
            tempfile.TemporaryDirectory(prefix="retention-bench-") as rule_dir:
        bench = sa.create_engine(bench_url)
        try:
            log(f"building {args.rows:,} rows, {args.expired:,} expired")
            t0 = time.perf_counter()
            build_pristine(bench, args.rows, args.expired, cutoff)
            log(f"built in {time.perf_counter() - t0:.1f} s")
            measures = {
                "raw": lambda: measure_raw(bench, cutoff),
                "engine": lambda: measure_engine(bench_url, audit_url, Path(rule_dir), cutoff),
            }
            if not args.no_ctid:
                measures["ctid"] = lambda: measure_ctid(bench, cutoff)
            runs: dict[str, list[dict]] = {name: [] for name in measures}
            for round_no in range(args.repeat):
                if args.repeat > 1:
                    log(f"round {round_no + 1} of {args.repeat}")
                for name, measure in measures.items():
                    runs[name].append(run_method(name, bench, args, cutoff, measure))
            version = scalar(bench, "SHOW server_version")
        finally:
            bench.dispose()
    methods = {name: summarize(name, results, args.expired) for name, results in runs.items()}
    report = {
        "rows": args.rows, "expired": args.expired, "as_of": AS_OF.isoformat(),
        "cutoff": cutoff.isoformat(), "server_version": version,
        "methods": methods, "verdict": verdict(methods),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_summary(report)
    return 0 if all(m["correct"] for m in methods.values()) else 1


def load_rule_cutoff() -> datetime:
    """The cutoff the benchmark rule gives at AS_OF (validates the rule text too)."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "rule.yaml"
        path.write_text(RULE_YAML)
        return load_rule_file(path).rule.cutoff(AS_OF)


if __name__ == "__main__":
    sys.exit(main())
