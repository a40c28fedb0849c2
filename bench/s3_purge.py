"""Benchmark: how fast does the engine purge an S3 bucket, next to a plain boto3 loop?

What it measures
----------------
A moto S3 server runs in a child process of its own (so its Python does not share a
GIL with the client being measured). Before it starts serving, the child puts
``--objects`` small objects (default 100,000, 32 bytes each, keys
``exports/0000000.json`` ...) into an unversioned bucket straight through moto's
in-process backend (``moto.s3.models.s3_backends``): ~5 s, where 100k HTTP PUTs would
take ~10 minutes. Every object is expired: the rule keeps P30D by LastModified and the
benchmark's ``as_of`` is 60 days after seeding. Before a method runs, the parent checks
over HTTP that the first and last keys are listed (``--check-seed``: lists and counts
them all, which costs as long as a purge).

Each method runs against a fresh server, freshly seeded with identical data:

* ``raw``    a plain boto3 loop: ``list_objects_v2`` paginator, and for each page one
             serial ``delete_objects`` of that page's (up to 1000) keys, Quiet=True.
* ``engine`` ``S3Objects.purge`` exactly as a run calls it: the client comes from
             ``Targets(resolver).s3_client`` (an Airflow ``aws`` connection with
             ``endpoint_url`` in its extra), the target from a YAML rule file
             (``concurrency`` from ``--concurrency``), and the ledger is a real
             :class:`RunJournal` ledger in a throwaway SQLite audit database (two small
             transactions per batch, part of the engine's cost). The ledger is a
             subclass that only adds timestamps around ``pending`` and ``done``.

After each method the bucket must list empty over HTTP, and the engine's returned and
journaled deleted counts must equal ``--objects``. A failed check makes the script
exit 1; otherwise it exits 0 whatever the timings.

How to read the summary
-----------------------
``seconds`` is the wall time of the whole method (for the engine: the whole ``purge``
call, reconcile and bucket probes included). ``keys/s`` is objects deleted per second.
``ratio`` is engine keys/s over raw keys/s; the target is >= 1.0 (the engine's thread
pool should at least pay for its journal). Batch times: for ``raw`` one DeleteObjects
request; for ``engine`` what the engine reports through ``progress``: the batch's own
work on its worker thread (hold check, pending, DeleteObjects, done). "worker" batch
times (``pending`` start to ``done`` end) are measured by the ledger wrapper.

The breakdown counts requests and the seconds spent inside them (summed over threads,
so concurrent requests add up to more than the wall time), of which waiting on the
wire and the server (the rest is client CPU: signing, parsing), journal seconds, and
CPU seconds of the client process and of the moto server process. A server CPU time
close to the wall time means the server, not the client, set the pace.

Moto is not S3. Its server is one Python process, so concurrent requests take turns
on its GIL. It answers every ListObjectsV2 page by walking and sorting the whole
bucket and serializing the 1000 entries slowly (each timestamp goes through dateutil),
about 0.4 s of server CPU a page at 100k objects; it ignores Quiet=True and lists
every deleted key in the DeleteObjects response. Listing therefore dominates both
methods here, and deletes the engine overlaps with listing on the client are
serialized again in the server. ``--latency-ms`` adds a fixed delay to every request
(sleeping outside the GIL), a crude stand-in for the network and S3's own latency.

Timings on a shared machine are noisy (+-10% run to run here); ``--repeat K`` runs
every method K times, interleaved (raw, engine, raw, ...), and reports median seconds
and pooled batch percentiles.

Run::

    /work/main/.venv/bin/python bench/s3_purge.py [--objects 100000] [--repeat 1]
        [--concurrency 8] [--latency-ms 0] [--check-seed] [--json] [--save [PATH]]

Server processes and temporary files are removed at the end, also on error or Ctrl-C
(a server also exits by itself when its parent goes away).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import moto_process  # noqa: E402
from harness import (  # noqa: E402
    Meter,
    PeakRss,
    add_common,
    all_correct,
    aws_spec,
    bench_parser,
    check_common,
    count_problems,
    emit,
    interleave,
    kib_as_mib,
    log,
    median_of,
    ms,
    open_journal_run,
    percentile,
    print_method_table,
    print_runs,
    print_target,
    ratio_verdict,
    summarize_runs,
    wrong,
)
from moto_process import REGION, plain_client  # noqa: E402

BUCKET = "retention-bench"
BODY = b"x" * 32
RULE_YAML = """\
category: bench_exports
description: Benchmark of the S3 purge on expired exports
owner: bench
legal_basis: Benchmark only
retain_for: P30D
schedule: null
action: delete
targets:
  - name: exports
    kind: s3
    connection: bench_s3
    bucket: {bucket}
    age_from: last_modified
    concurrency: {concurrency}
"""
AS_OF_AFTER_SEED = timedelta(days=60)
TARGET_RATIO = 1.0
SERVER_START_TIMEOUT_S = 300


def key_name(i: int) -> str:
    """The key of the i-th seeded object (zero-padded, so listing order is seeding order)."""
    return f"exports/{i:07d}.json"


# -- the server (child process) ------------------------------------------------------


def seed_bucket(objects: int):
    """The seed for ``moto_process.serve``: the bench bucket with ``objects`` keys."""

    def seed(backend) -> dict:
        started = time.perf_counter()
        backend.create_bucket(BUCKET, REGION)
        for i in range(objects):
            backend.put_object(BUCKET, key_name(i), BODY, disable_notification=True)
        seeded = time.perf_counter() - started
        return {"objects": len(backend.get_bucket(BUCKET).keys), "seed_seconds": round(seeded, 2)}

    return seed


def moto_server(objects: int, latency_ms: float = 0.0):
    """A freshly seeded moto server in a child process; its endpoint, pid and seed figures."""
    argv = [os.path.abspath(__file__), "--serve-moto", str(objects), "--latency-ms", str(latency_ms)]
    return moto_process.moto_server(argv, SERVER_START_TIMEOUT_S)


# -- clients and checks --------------------------------------------------------------


class RequestTimer:
    """Counts S3 requests and the seconds spent in them, per operation.

    ``seconds`` runs from botocore's before-call to after-call (send, wait, read, parse);
    ``wait`` from before-send until the response body is read (the wire and the server);
    the rest is client CPU for signing and parsing (stretched by GIL contention).
    """

    def __init__(self, client):
        self._local = threading.local()
        self.seconds: dict[str, float] = defaultdict(float)
        self.wait: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        events = client.meta.events
        events.register("before-call.s3", self._before_call)
        events.register("before-send.s3", self._before_send)
        events.register("before-parse.s3", self._before_parse)
        events.register("after-call.s3", self._after_call)

    def _before_call(self, **_kwargs) -> None:
        self._local.call = time.perf_counter()
        self._local.wait = 0.0

    def _before_send(self, **_kwargs) -> None:
        self._local.send = time.perf_counter()

    def _before_parse(self, **_kwargs) -> None:
        self._local.wait += time.perf_counter() - self._local.send

    def _after_call(self, model, **_kwargs) -> None:
        elapsed = time.perf_counter() - self._local.call
        with self._lock:
            self.seconds[model.name] += elapsed
            self.wait[model.name] += self._local.wait
            self.calls[model.name] += 1

    def figures(self) -> dict:
        return {"calls": dict(self.calls), "call_seconds": dict(self.seconds), "call_wait": dict(self.wait)}


def check_seed(client, objects: int, full: bool) -> list[str]:
    """Problems with the seeded bucket as seen over HTTP (empty when it is right)."""
    problems = []
    first = client.list_objects_v2(Bucket=BUCKET, MaxKeys=1).get("Contents", [])
    if [o["Key"] for o in first] != [key_name(0)]:
        problems.append(f"first listed key is {first[:1]}, expected {key_name(0)}")
    if objects > 1:
        last = client.list_objects_v2(Bucket=BUCKET, StartAfter=key_name(objects - 2)).get("Contents", [])
        if [o["Key"] for o in last] != [key_name(objects - 1)]:
            problems.append(f"keys after {key_name(objects - 2)} are {[o['Key'] for o in last]}")
    if full:
        listed = sum(p.get("KeyCount", 0) for p in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET))
        if listed != objects:
            problems.append(f"{listed} objects listed, expected {objects}")
    return problems


def check_empty(client) -> list[str]:
    """Problems with the bucket after a purge (empty when it is right)."""
    left = client.list_objects_v2(Bucket=BUCKET)
    if left.get("KeyCount", 0):
        more = "+" if left.get("IsTruncated") else ""
        return [f"{left['KeyCount']}{more} objects remain, e.g. {left['Contents'][0]['Key']}"]
    return []


# -- methods -------------------------------------------------------------------------


def measure_raw(endpoint: str, meter: Meter, _args: argparse.Namespace, _scratch: Path) -> dict:
    """Paginate list_objects_v2; one serial DeleteObjects per page."""
    client = plain_client(endpoint)
    timer = RequestTimer(client)
    batches: list[float] = []
    deleted = failed = 0
    try:
        meter.start()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if not keys:
                continue
            t0 = time.perf_counter()
            response = client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys, "Quiet": True})
            batches.append(time.perf_counter() - t0)
            failed += len(response.get("Errors", []))
            deleted += len(keys) - len(response.get("Errors", []))
        meter.stop()
    finally:
        client.close()
    return {"deleted": deleted, "failed": failed, **meter.figures, "batch_seconds": batches, **timer.figures()}


def measure_engine(endpoint: str, meter: Meter, args: argparse.Namespace, scratch: Path) -> dict:
    """S3Objects.purge with a RunJournal ledger in a throwaway SQLite audit database."""
    from retention.connections import ConnectionSpec, create_sql_engine
    from retention.rules.loader import load_rule_file
    from retention.run.journal import JournalLedger
    from retention.targets import Targets
    from retention.targets.s3.objects import S3Objects

    class TimedLedger(JournalLedger):
        """The journal ledger, with timestamps around each batch's two writes."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.times: dict[int, list[float]] = {}

        def pending(self, batch_no, *args, **kwargs):
            t0 = time.perf_counter()
            super().pending(batch_no, *args, **kwargs)
            self.times[batch_no] = [t0, time.perf_counter()]

        def done(self, batch_no, *args, **kwargs):
            t0 = time.perf_counter()
            super().done(batch_no, *args, **kwargs)
            self.times[batch_no] += [t0, time.perf_counter()]

    run_dir = scratch / uuid.uuid4().hex[:8]
    run_dir.mkdir()
    rule_path = run_dir / "bench_exports.yaml"
    rule_path.write_text(RULE_YAML.format(bucket=BUCKET, concurrency=args.concurrency))
    rule_file = load_rule_file(rule_path)
    target = rule_file.rule.target("exports")
    as_of = datetime.now(timezone.utc) + AS_OF_AFTER_SEED

    specs = {
        "bench_s3": aws_spec(endpoint, "bench_s3"),
        "bench_audit": ConnectionSpec(conn_id="bench_audit", conn_type="sqlite", host=str(run_dir / "audit.db")),
    }
    audit_engine = create_sql_engine(specs["bench_audit"])
    targets = Targets(specs.__getitem__)
    try:
        journal, run = open_journal_run(audit_engine, rule_file, target, as_of)
        ledger = TimedLedger(journal, run, target.name)
        client = targets.s3_client(target.connection, concurrency=target.concurrency)
        timer = RequestTimer(client)
        objects = S3Objects(target, client)
        batches: list[tuple[int, float]] = []

        def progress(_deleted: int, keys: int, seconds: float) -> None:
            batches.append((keys, seconds))

        with PeakRss() as memory:
            meter.start()
            outcome = objects.purge(run.cutoff, ledger, progress=progress)
            meter.stop()
        journaled = ledger.deleted()
        unresolved = len(ledger.unresolved())
    finally:
        targets.close()
        audit_engine.dispose()
    times = [t for t in ledger.times.values() if len(t) == 4]
    return {
        "deleted": outcome.deleted,
        "failed": outcome.remaining,
        "held": outcome.held,
        "failures": list(outcome.failures),
        "journaled": journaled,
        "unresolved": unresolved,
        **meter.figures,
        "batch_seconds": [s for _, s in batches],
        "batch_keys": [k for k, _ in batches],
        "worker_batch_seconds": [t[3] - t[0] for t in times],
        "journal_seconds": sum((t[1] - t[0]) + (t[3] - t[2]) for t in times),
        "between_journal_seconds": sum(t[2] - t[1] for t in times),
        **timer.figures(),
        "cutoff": run.cutoff.isoformat(),
        "rss_growth_kib": memory.figures["growth_kib"],
    }


MEASURES = {"raw": measure_raw, "engine": measure_engine}


# -- report --------------------------------------------------------------------------


def summarize(name: str, runs: list[dict], objects: int) -> dict:
    """One method's figures over its runs: median times, batch times pooled."""
    out = summarize_runs(name, runs, objects, rate="keys_per_s", longest="max_batch_ms", extra={
        "client_cpu_s": round(median_of(runs, lambda r: r["client_cpu_s"]), 2),
        "server_cpu_s": round(median_of(runs, lambda r: r["server_cpu_s"]), 2),
        "requests": {
            op: {"calls": int(median_of(runs, lambda r, op=op: r["calls"].get(op, 0))),
                 "seconds": round(median_of(runs, lambda r, op=op: r["call_seconds"].get(op, 0.0)), 3),
                 "wait_s": round(median_of(runs, lambda r, op=op: r["call_wait"].get(op, 0.0)), 3)}
            for op in sorted({op for r in runs for op in r["calls"]})
        },
    })
    if name == "engine":
        worker = [s for r in runs for s in r["worker_batch_seconds"]]
        keys = [k for r in runs for k in r["batch_keys"]]
        out["batch_keys_p50"] = int(percentile(keys, 0.50))
        out["batch_keys_max"] = max(keys, default=0)
        out["p50_worker_batch_ms"] = ms(percentile(worker, 0.50))
        out["p95_worker_batch_ms"] = ms(percentile(worker, 0.95))
        out["max_worker_batch_ms"] = ms(max(worker, default=0.0))
        out["journal_s"] = round(median_of(runs, lambda r: r["journal_seconds"]), 3)
        out["journal_ms_per_batch"] = ms(
            median_of(runs, lambda r: r["journal_seconds"] / max(1, len(r["worker_batch_seconds"])))
        )
        out["delete_step_s"] = round(median_of(runs, lambda r: r["between_journal_seconds"]), 3)
        out["rss_growth_kib"] = max(r["rss_growth_kib"] for r in runs)
    return out


def verdict(methods: dict[str, dict]) -> dict:
    """Engine vs raw (median times), and PASS/FAIL against the target."""
    return ratio_verdict(methods, TARGET_RATIO)


def print_summary(report: dict) -> None:
    """The figures as a table, the request breakdown, the engine's batches and the verdict."""
    methods, v = report["methods"], report["verdict"]
    runs = methods["raw"]["runs"]
    print()
    print(f"bucket {BUCKET}: {report['objects']:,} objects of {len(BODY)} bytes, all expired "
          f"(cutoff {report['cutoff']}); moto {report['moto_version']} server in its own process, "
          f"seeded in {report['seed_seconds']:.1f} s")
    delay = f"; the server adds {report['latency_ms']:g} ms to every request" if report["latency_ms"] else ""
    print(f"engine concurrency {report['concurrency']}; {os.cpu_count()} CPUs{delay}")
    if runs > 1:
        print(f"{runs} runs per method, each on a fresh server; seconds are medians, batch figures pooled")
    print()
    print_method_table(methods, [
        ("objects", ">8,", lambda m: report["objects"]), ("seconds", ">8.2f", "seconds"),
        ("keys/s", ">8,", "keys_per_s"), ("batches", ">8,", "batches"), ("p50 ms", ">8.1f", "p50_batch_ms"),
        ("p95 ms", ">8.1f", "p95_batch_ms"), ("max ms", ">8.1f", "max_batch_ms"),
        ("cpu s", ">6.2f", "client_cpu_s"), ("srv cpu s", ">9.2f", "server_cpu_s"),
    ])
    print_runs(methods, 8)
    print()
    print("requests: calls, seconds inside them (of which waiting on the wire and server), summed over threads")
    for m in methods.values():
        parts = [f"{op} {r['calls']:,}: {r['seconds']:.2f} s ({r['wait_s']:.2f})"
                 for op, r in m["requests"].items() if op in ("ListObjectsV2", "DeleteObjects")]
        print(f"  {m['method']:<8} " + "; ".join(parts))
    engine = methods["engine"]
    print()
    print(f"engine: keys per batch p50 {engine['batch_keys_p50']:,}, max {engine['batch_keys_max']:,}; "
          f"worker batch (pending..done) p50 {engine['p50_worker_batch_ms']:.1f} ms, "
          f"p95 {engine['p95_worker_batch_ms']:.1f} ms, max {engine['max_worker_batch_ms']:.1f} ms")
    print(f"engine: journal {engine['journal_s']:.2f} s over all batches ({engine['journal_ms_per_batch']:.1f} ms "
          f"a batch, 2 transactions), delete step {engine['delete_step_s']:.2f} s (both summed over threads)")
    print(f"engine: peak RSS growth during purge {kib_as_mib(engine['rss_growth_kib'])}")
    print_target("ratio engine/raw", v["ratio_engine_over_raw"], ">6.2f", ">=", TARGET_RATIO, v["ratio_pass"])


# -- main ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, checked (the moto child's own flag skips the checks)."""
    parser = bench_parser(__doc__)
    parser.add_argument("--objects", type=int, default=100_000, help="objects in the bucket (default 100,000)")
    add_common(parser, repeat_order="raw, engine, raw, ...", pg=False)
    parser.add_argument("--concurrency", type=int, default=8, help="the rule's concurrency for the engine (default 8)")
    parser.add_argument("--check-seed", action="store_true",
                        help="list and count every seeded object over HTTP before each method (slow)")
    parser.add_argument("--latency-ms", type=float, default=0.0,
                        help="delay the server adds to every request (default 0: moto's own speed)")
    parser.add_argument("--serve-moto", type=int, metavar="N", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.serve_moto is None:
        if args.objects < 1:
            parser.error("need --objects >= 1")
        check_common(parser, args)
        if args.latency_ms < 0:
            parser.error("need --latency-ms >= 0")
        if not 1 <= args.concurrency <= 64:
            parser.error("need 1 <= --concurrency <= 64 (the rule's limits)")
    return args


def run_method(name: str, args: argparse.Namespace, scratch: Path, seeds: list[float]) -> dict:
    """One timed run of a method against a freshly seeded server, checked afterwards."""
    log(f"{name}: starting a moto server with {args.objects:,} objects")
    with moto_server(args.objects, args.latency_ms) as server:
        seeds.append(server["seed_seconds"])
        problems = []
        if server["objects"] != args.objects:
            problems.append(f"server seeded {server['objects']} objects, expected {args.objects}")
        probe = plain_client(server["endpoint"])
        try:
            problems += check_seed(probe, args.objects, args.check_seed)
            if problems:
                raise RuntimeError(f"seeding went wrong: {'; '.join(problems)}")
            listed = f"all {args.objects:,} listed" if args.check_seed else "first and last keys listed"
            log(f"{name}: seeded in {server['seed_seconds']:.1f} s ({listed}), serving at {server['endpoint']}; purging")
            result = MEASURES[name](server["endpoint"], Meter({"server_cpu_s": server["pid"]}), args, scratch)
            problems += check_empty(probe)
        finally:
            probe.close()
    problems += count_problems(result, args.objects, "objects")
    if result.get("failed") or result.get("held") or result.get("unresolved"):
        problems.append(f"{result.get('failed')} failed, {result.get('held')} held, "
                        f"{result.get('unresolved')} batches left pending {result.get('failures')}")
    result["problems"] = problems
    log(f"{name}: {result['seconds']:.2f} s, {len(result['batch_seconds'])} batches, "
        f"client cpu {result['client_cpu_s']:.1f} s, server cpu {result['server_cpu_s']:.1f} s" + wrong(problems))
    return result


def main(argv: list[str] | None = None) -> int:
    """Run every method against fresh servers, print the figures; 1 if a check failed."""
    args = parse_args(argv)
    if args.serve_moto is not None:
        moto_process.serve(seed_bucket(args.serve_moto), args.latency_ms)
        return 0
    import moto

    seeds: list[float] = []
    with tempfile.TemporaryDirectory(prefix="retention-bench-s3-") as scratch:
        runs = interleave({name: (lambda name=name: run_method(name, args, Path(scratch), seeds))
                           for name in MEASURES}, args.repeat)
    methods = {name: summarize(name, results, args.objects) for name, results in runs.items()}
    report = {
        "objects": args.objects, "concurrency": args.concurrency, "latency_ms": args.latency_ms,
        "cutoff": runs["engine"][-1]["cutoff"], "moto_version": moto.__version__,
        "seed_seconds": round(statistics.median(seeds), 2),
        "methods": methods, "verdict": verdict(methods),
    }
    emit(report, args, print_summary)
    return 0 if all_correct(methods) else 1


if __name__ == "__main__":
    sys.exit(main())
