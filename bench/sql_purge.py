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
        [--repeat 3] [--pg postgresql://postgres@127.0.0.1:5432/postgres] [--no-ctid] [--json] [--save [PATH]]

The admin URL may also come from RETENTION_BENCH_PG. ``--save`` also writes the JSON figures
to PATH (without one, to a new file under bench/.results/). Options, databases, rounds,
summaries and output come from ``bench/harness.py``. Both databases are dropped at
the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sqlalchemy as sa  # noqa: E402
from harness import (  # noqa: E402
    CUSTOMERS_AS_OF,
    PeakRss,
    add_common,
    admin_url,
    all_correct,
    bench_parser,
    build_pristine,
    check_common,
    count_problems,
    emit,
    interleave,
    kib_as_mib,
    log,
    median_of,
    ms,
    on_fresh_copy,
    open_journal_run,
    percentile,
    print_method_table,
    print_runs,
    print_target,
    ratio_verdict,
    retention_engine,
    rule_cutoff,
    scalar,
    summarize_runs,
    throwaway_database,
    wrong,
)
from sqlalchemy.engine import URL, Engine  # noqa: E402

from retention.rules.loader import load_rule_file  # noqa: E402
from retention.targets.sql.table import SqlTable  # noqa: E402

AS_OF = CUSTOMERS_AS_OF
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
        journal, run = open_journal_run(audit_engine, rule_file, target, AS_OF)
        ledger = journal.ledger(run, target.name)
        table = SqlTable(target, engine)
        table.check()  # reflect before the clock starts, as Runner.start does when planning
        batches: list[tuple[int, float]] = []

        def progress(_deleted: int, rows: int, seconds: float) -> None:
            batches.append((rows, seconds))

        with PeakRss() as memory:
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
        "memory": memory.figures,
    }


# -- report --------------------------------------------------------------------------


def summarize(name: str, runs: list[dict], expired: int) -> dict:
    """One method's figures over its runs: median time, batch times pooled, worst batch."""
    out = summarize_runs(name, runs, expired)
    if name == "engine":
        rows = [n for r in runs for n in r["batch_rows"]]
        out["batch_rows_p50"] = int(percentile(rows, 0.50))
        out["batch_rows_max"] = max(rows)
        # Time spent outside batch transactions: reconciling, and recounting what is left.
        out["outside_batches_s"] = round(median_of(runs, lambda r: r["seconds"] - sum(r["batch_seconds"])), 3)
        out["batch_ms_each_run"] = [[ms(s) for s in r["batch_seconds"]] for r in runs]
        # The largest of the runs: flat from 1M to 5M rows means bounded by the batch, not the table.
        out["rss_growth_kib"] = max(r["memory"]["growth_kib"] for r in runs)
        out["rss_method"] = runs[0]["memory"]["method"]
    return out


def verdict(methods: dict[str, dict]) -> dict:
    """Engine vs raw (median times), and PASS/FAIL against the targets."""
    longest_s = methods["engine"]["longest_batch_ms"] / 1000
    return {
        **ratio_verdict(methods, TARGET_RATIO),
        "longest_batch_s": round(longest_s, 3),
        "longest_batch_target_s": TARGET_LONGEST_BATCH_S,
        "longest_batch_pass": longest_s <= TARGET_LONGEST_BATCH_S,
    }


def print_summary(report: dict) -> None:
    """The figures as a table, the engine's batch sizes, and the verdict lines."""
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
    print(f"engine: peak RSS growth during purge {kib_as_mib(engine['rss_growth_kib'])} ({engine['rss_method']})")
    print_target("ratio engine/raw", v["ratio_engine_over_raw"], ">6.2f", ">=", TARGET_RATIO, v["ratio_pass"])
    print_target("longest batch (s)", v["longest_batch_s"], ">6.3f", "<=", TARGET_LONGEST_BATCH_S,
                 v["longest_batch_pass"])


# -- main ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, checked."""
    parser = bench_parser(__doc__)
    parser.add_argument("--rows", type=int, default=2_000_000, help="rows in the table (default 2,000,000)")
    parser.add_argument("--expired", type=int, default=1_000_000, help="rows expired at as_of (default 1,000,000)")
    add_common(parser, repeat_order="raw, engine, ctid, raw, ...")
    parser.add_argument("--no-ctid", action="store_true", help="skip the naive ctid reference loop")
    args = parser.parse_args(argv)
    if not 0 < args.expired <= args.rows:
        parser.error("need 0 < --expired <= --rows")
    check_common(parser, args)
    return args


def run_method(name: str, bench: Engine, args: argparse.Namespace, cutoff: datetime, measure) -> dict:
    """One timed run of a method on a fresh copy, checked afterwards."""
    result = on_fresh_copy(name, bench, measure, args.rows, args.expired, cutoff)
    problems = result["problems"] + count_problems(result, args.expired, "rows")
    if result.get("remaining"):
        problems.append(f"purge reported {result['remaining']} expired rows remaining")
    result["problems"] = problems
    log(f"{name}: {result['seconds']:.2f} s, {len(result['batch_seconds'])} batches, "
        f"longest {max(result['batch_seconds']) * 1000:.1f} ms" + wrong(problems))
    return result


def main(argv: list[str] | None = None) -> int:
    """Build the table, run every method on fresh copies, print the figures; 1 if a check failed."""
    args = parse_args(argv)
    admin = admin_url(args.pg)
    cutoff = rule_cutoff(RULE_YAML, AS_OF)
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
            runs = interleave({name: (lambda name=name, measure=measure:
                                      run_method(name, bench, args, cutoff, measure))
                               for name, measure in measures.items()}, args.repeat)
            version = scalar(bench, "SHOW server_version")
        finally:
            bench.dispose()
    methods = {name: summarize(name, results, args.expired) for name, results in runs.items()}
    report = {
        "rows": args.rows, "expired": args.expired, "as_of": AS_OF.isoformat(),
        "cutoff": cutoff.isoformat(), "server_version": version,
        "methods": methods, "verdict": verdict(methods),
    }
    emit(report, args, print_summary)
    return 0 if all_correct(methods) else 1


if __name__ == "__main__":
    sys.exit(main())
