"""Benchmark: a sharded purge by two worker processes against the single-task purge of the same table.

What it measures
----------------
A throwaway PostgreSQL database gets the ``customers`` table of ``bench/sql_purge.py``
(``--rows`` rows, default 2,000,000, of which ``--expired``, default 1,000,000, expired;
primary key on ``id``, index on ``closed_at``), and a second throwaway database is the
audit journal. Each method is a whole run through the engine's :class:`Runner` (start:
lease, plan, count; purge; certify with a real signature) on an identical fresh copy:

* ``single``  the rule without ``shard_rows``: one purge of the whole target, in this
              process (one mapped purge task in Airflow).
* ``sharded`` the same rule with ``shard_rows`` (default 125,000: 8 shards). The plan cuts
              the shards in this process; then ``--workers`` (default 2) worker processes,
              as LocalExecutor with ``parallelism`` 2 runs mapped tasks, each purge their
              shards (worker *w* takes shards *w*, *w + workers*, …) through
              ``Runner.purge(shard=…)``; then this process certifies.

Checked after each run: exactly the expired rows are gone (count, sum and an MD5 of the
remaining ids against the pristine copy's unexpired ids), the run has one certificate,
complete, and its target's counts (matched, deleted, held, failed) equal the other
method's. A failed check makes the script exit 1.

How to read the summary
-----------------------
``purge s`` is the wall time from the end of the plan to the last batch (for ``sharded``:
the worker processes' span, process start included); ``run s`` adds start and certify
(and, for ``sharded``, cutting the shards). ``rows/s`` is expired rows over ``purge s``.
``span s`` leaves out the workers' start-up (spawning Python, importing the engine, which
an executor pays per task too): from the first worker's first batch to the last one's end.
``speed-up`` is sharded rows/s over single rows/s. Two workers on one PostgreSQL on a
small shared machine are bounded by its cores and WAL, so expect less than 2x here; on
a fleet the workers are other hosts and the database is the limit.

Run::

    /work/main/.venv/bin/python bench/shard_purge.py [--rows 2000000] [--expired 1000000]
        [--workers 2] [--shard-rows 125000] [--repeat 1] [--pg URL] [--json] [--save [PATH]]
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sqlalchemy as sa  # noqa: E402
from harness import (
    CUSTOMERS_AS_OF as AS_OF,
)
from harness import (  # noqa: E402
    PeakRss,
    add_common,
    admin_url,
    bench_parser,
    build_pristine,
    check_common,
    emit,
    interleave,
    kib_as_mib,
    log,
    median_of,
    on_fresh_copy,
    postgres_spec,
    rule_cutoff,
    scalar,
    throwaway_database,
    wrong,
)
from sqlalchemy.engine import Engine  # noqa: E402

RULE_YAML = """\
category: bench_shards
description: Benchmark of a sharded SQL purge against one task
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
    max_fraction: 0.6
"""
COMPARED = ("status", "matched", "deleted", "held", "failed", "unconfirmed")


def _runner(bench_url: str, audit_url: str, key: str):
    """A Runner on the bench database and the audit journal, signing with ``key``."""
    from retention.evidence.signing import Signer
    from retention.run.runner import Runner

    specs = {"bench_db": postgres_spec(sa.make_url(bench_url), "bench_db"),
             "retention_audit": postgres_spec(sa.make_url(audit_url), "retention_audit")}
    return Runner.from_environment(connections=specs.__getitem__, signer=Signer.from_pem_file(key), checkpoints=None)


def _worker(bench_url: str, audit_url: str, key: str, rule: str, run_id: str, shards: list[int], spans) -> None:
    """One worker process: purge ``shards`` of the run, one after the other (as one executor slot
    does); puts the wall-clock span of its purges (after its imports and start-up) and its peak
    RSS (the whole process) on ``spans``."""
    from retention.rules.loader import load_rule_file

    rule_file = load_rule_file(rule)
    with _runner(bench_url, audit_url, key) as runner:
        run = runner.journal.get_run(rule_file.rule.category, run_id)
        assert run is not None
        began = time.time()
        for shard in shards:
            runner.purge(rule_file, run, "customers", shard=shard)
        spans.put((began, time.time(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))


def write_rule(directory: Path, name: str, shard_rows: int | None) -> Path:
    path = directory / name / "bench_shards.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(RULE_YAML + (f"    shard_rows: {shard_rows}\n" if shard_rows else ""))
    return path


def measure(urls: tuple[str, str, str], rule: Path, run_id: str, workers: int) -> dict[str, Any]:
    """One run: start, purge (here, or by ``workers`` processes over the shards), certify."""
    from retention.rules.loader import load_rule_file
    from retention.run.shards import shard_records

    rule_file = load_rule_file(rule)
    started = time.perf_counter()
    with _runner(*urls) as runner:
        run, _plan = runner.start(rule_file, run_id=run_id, as_of=AS_OF)
        shards = len(shard_records(runner.journal, run, "customers"))
        purging, began = time.perf_counter(), time.time()
        if shards:
            spawn = multiprocessing.get_context("spawn")
            spans = spawn.Queue()
            processes = [spawn.Process(target=_worker, args=(*urls, str(rule), run_id,
                                                             list(range(w, shards, workers)), spans))
                         for w in range(workers)]
            for process in processes:
                process.start()
            for process in processes:
                process.join()
            failed = [p.exitcode for p in processes if p.exitcode]
            if failed:
                raise SystemExit(f"a worker process failed (exit codes {failed})")
            ends = [spans.get(timeout=10) for _ in processes]
            span = max(e[1] for e in ends) - min(e[0] for e in ends)
            memory = {"worker_peak_rss_kib": max(e[2] for e in ends)}
        purged = time.perf_counter()
        if not shards:
            with PeakRss() as peak:
                runner.purge(rule_file, run, "customers")
            purged = time.perf_counter()
            span = time.time() - began
            memory = {"rss_growth_kib": peak.figures["growth_kib"]}
        certificate = runner.certify(run)
        certificates = scalar(runner.journal.engine, "SELECT count(*) FROM purge_certificates WHERE run_id = :r",
                              r=run_id)
    finished = time.perf_counter()
    (target,) = certificate.data["targets"]
    return {"run_id": run_id, "shards": shards, "workers": workers if shards else 1,
            "purge_seconds": purged - purging, "span_seconds": span, "seconds": finished - started,
            "certificates": certificates, "certificate": {k: target[k] for k in COMPARED},
            "deleted": target["deleted"], **memory}


def remaining_ids_md5(engine: Engine, table: str, cutoff=None) -> str:
    """MD5 of the ids left (of ``customers``), or of the pristine copy's unexpired ids."""
    where = "" if cutoff is None else "WHERE closed_at >= :c"
    return scalar(engine, f"SELECT md5(string_agg(id::text, ',' ORDER BY id)) FROM {table} {where}", c=cutoff)


def run_method(name: str, bench: Engine, args: argparse.Namespace, cutoff, do) -> dict[str, Any]:
    result = on_fresh_copy(name, bench, do, args.rows, args.expired, cutoff)
    problems = result["problems"]
    if remaining_ids_md5(bench, "customers") != remaining_ids_md5(bench, "customers_pristine", cutoff):
        problems.append("the ids left are not exactly the pristine copy's unexpired ids")
    if result["certificates"] != 1:
        problems.append(f"{result['certificates']} certificates for the run, expected 1")
    if result["certificate"]["status"] != "complete" or result["deleted"] != args.expired:
        problems.append(f"certificate says {result['certificate']}, expected complete with {args.expired:,} deleted")
    result["problems"] = problems
    log(f"{name}: purge {result['purge_seconds']:.2f} s, run {result['seconds']:.2f} s, "
        f"{result['shards'] or 'no'} shards" + wrong(problems))
    return result


def summarize(runs: list[dict[str, Any]], expired: int) -> dict[str, Any]:
    purge = median_of(runs, lambda r: r["purge_seconds"])
    span = median_of(runs, lambda r: r["span_seconds"])
    return {"runs": runs, "purge_seconds": purge, "span_seconds": span,
            "seconds": median_of(runs, lambda r: r["seconds"]),
            "rows_per_s": expired / purge if purge else 0.0, "span_rows_per_s": expired / span if span else 0.0, "shards": runs[0]["shards"],
            "workers": runs[0]["workers"], "correct": all(not r["problems"] for r in runs),
            **{figure: max(r[figure] for r in runs) for figure in ("worker_peak_rss_kib", "rss_growth_kib")
               if figure in runs[0]}}


def print_summary(report: dict[str, Any]) -> None:
    print(f"\n{report['rows']:,} rows, {report['expired']:,} expired, PostgreSQL {report['server_version']}")
    print(f"{'method':<8} {'shards':>6} {'workers':>7} {'purge s':>8} {'rows/s':>10} {'span s':>7} "
          f"{'span rows/s':>11} {'run s':>7}  checks")
    for name, m in report["methods"].items():
        print(f"{name:<8} {m['shards']:>6} {m['workers']:>7} {m['purge_seconds']:>8.2f} {m['rows_per_s']:>10,.0f} "
              f"{m['span_seconds']:>7.2f} {m['span_rows_per_s']:>11,.0f} {m['seconds']:>7.2f}  "
              f"{'ok' if m['correct'] else 'FAILED'}")
    methods = report["methods"]
    print(f"memory: single purge peak RSS growth {kib_as_mib(methods['single'].get('rss_growth_kib'))} "
          f"(in this process); sharded workers' peak RSS {kib_as_mib(methods['sharded'].get('worker_peak_rss_kib'))} "
          "(each worker's whole process)")
    print(f"speed-up (sharded rows/s over single): {report['speed_up']:.2f}x; "
          f"same certificate counts: {report['same_certificate']}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = bench_parser(__doc__)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--expired", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=2, help="worker processes purging shards at once")
    parser.add_argument("--shard-rows", type=int, default=125_000, help="the rule's shard_rows")
    add_common(parser, repeat_order="single, then sharded")
    args = parser.parse_args(argv)
    if not 0 < args.expired <= args.rows:
        parser.error("need 0 < --expired <= --rows")
    if args.workers < 1 or args.shard_rows < 1:
        parser.error("need --workers >= 1 and --shard-rows >= 1")
    check_common(parser, args)
    return args


def main(argv: list[str] | None = None) -> int:
    """Build the table, run both methods on fresh copies, print the figures; 1 if a check failed."""
    from retention.evidence.audit import ensure_schema
    from retention.evidence.signing import generate_keypair

    args = parse_args(argv)
    admin = admin_url(args.pg)
    cutoff = rule_cutoff(RULE_YAML, AS_OF)
    with throwaway_database(admin, "retention_bench") as bench_url, \
            throwaway_database(admin, "retention_bench_audit") as audit_url, \
            tempfile.TemporaryDirectory(prefix="retention-bench-") as scratch:
        key, _public = generate_keypair(Path(scratch) / "keys")
        urls = (bench_url.render_as_string(hide_password=False), audit_url.render_as_string(hide_password=False),
                str(key))
        audit = sa.create_engine(audit_url)
        ensure_schema(audit)
        audit.dispose()
        rules = {"single": write_rule(Path(scratch), "single", None),
                 "sharded": write_rule(Path(scratch), "sharded", args.shard_rows)}
        bench = sa.create_engine(bench_url)
        try:
            log(f"building {args.rows:,} rows, {args.expired:,} expired")
            build_pristine(bench, args.rows, args.expired, cutoff)
            counter = iter(range(10**6))
            runs = interleave({name: (lambda name=name: run_method(
                name, bench, args, cutoff, lambda: measure(urls, rules[name], f"{name}-{next(counter)}", args.workers)))
                for name in rules}, args.repeat)
            version = scalar(bench, "SHOW server_version")
        finally:
            bench.dispose()
    methods = {name: summarize(results, args.expired) for name, results in runs.items()}
    certificates = {name: [r["certificate"] for r in m["runs"]] for name, m in methods.items()}
    same = all(c == certificates["single"][0] for runs_ in certificates.values() for c in runs_)
    report = {"rows": args.rows, "expired": args.expired, "as_of": AS_OF.isoformat(), "cutoff": cutoff.isoformat(),
              "server_version": version, "methods": methods, "same_certificate": same,
              "speed_up": methods["sharded"]["rows_per_s"] / methods["single"]["rows_per_s"]}
    emit(report, args, print_summary)
    return 0 if same and all(m["correct"] for m in methods.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
