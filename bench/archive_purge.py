"""Benchmark: how fast does the engine archive expired PostgreSQL rows to S3 and delete them,
next to one raw ``COPY (DELETE ... RETURNING *)``, and does its memory stay flat?

What it measures
----------------
A throwaway database gets the ``customers`` table of ``bench/sql_purge.py`` (built by
``bench/harness.py``): ``--rows`` rows (default 2,000,000), exactly ``--expired``
(default 1,000,000) closed before the cutoff, primary key on ``id``, index on
``closed_at``. Each method runs on an identical fresh copy of the table.

* ``raw``    ``COPY (DELETE FROM customers WHERE closed_at < cutoff RETURNING *) TO STDOUT``
             through psycopg2 ``copy_expert``, in one transaction, into Python's
             ``gzip.GzipFile(compresslevel=1)`` writing a real file in a temporary
             directory (fed through a 1 MiB buffer, since ``copy_expert`` writes once per
             row). Timed end to end: statement, compression, commit, file closed. The
             speed limit for "archive then delete": no JSON, no S3, no proof, one
             transaction holding a million row locks.
* ``engine`` ``Targets(resolver).open(target, RunContext(action="archive", ...))``: a
             ``SqlTable`` with ``ArchiveRows(ArchiveStore(spec, s3_client))``, from a rule
             YAML (``action: archive``, ``archive: {connection: aws_default, bucket: ...,
             format: jsonl.gz}``), ``purge(cutoff, ledger, progress=...)`` with a real
             :class:`RunJournal` ledger in a second throwaway PostgreSQL database. The S3
             endpoint is a moto server in a child process of its own (a fresh one per
             run), so its CPU does not share the client's GIL. The engine itself runs in a
             fresh child process per run, which also gives a clean memory figure. On
             PostgreSQL the engine archives in one pass: each batch's ``COPY (DELETE ...
             RETURNING) TO STDOUT`` as JSON Lines is its archive body, uploaded and verified
             before that batch's transaction commits; ``--workers`` (default 2, the rule's
             ``workers``) walks two shares of the expired rows at once.

After each method: exactly ``--expired`` rows gone and every other row there (count and
sum of ids against the pristine copy, no expired row left). For ``raw`` the gzip file
is decompressed: it must hold ``--expired`` lines whose ids sum like the expired rows.
For ``engine`` the archive is checked the expensive way: every object under the run's
prefix is listed, downloaded, decompressed and parsed; the lines must number exactly
``--expired`` and their ids must have the count, sum and sum of squares of the expired
ids of the pristine copy; the listed keys must be exactly the objects the journal
records (no debris), whose row counts must also add up to ``--expired``; the purge's
returned and journaled counts must match, with no batch left pending. A failed check
makes the script exit 1; otherwise it exits 0 whatever the timings.

Memory
------
The engine's peak RSS growth is measured in a fresh child process per size: the peak
(VmHWM, reset through ``/proc/self/clear_refs`` just before ``purge``; if that is not
allowed, ``ru_maxrss``) minus the RSS just before ``purge`` (after imports, reflection,
journal and S3 client set-up). Sizes are 1M and 3M expired rows (``--memory-sizes``),
each in a table of twice as many rows (2M and 6M): the same data shape and the same
50% expired as the timing run, so the per-batch work is alike and only the total
grows. (3M rows all expired would change the shape: every batch window would cover the
whole table.) The target: the peak does not grow with rows, i.e. it is bounded by the
batch (``max_batch_rows``, default 100,000). PASS when growth(3M) <= max(1.25 x
growth(1M), growth(1M) + 16 MiB): allowance for allocator noise and for the adaptive
batch sizer settling on slightly different sizes. The RSS after each batch is also
kept (``--json``), to show a drift if there is one. If the timing run has the default
sizes, its first engine run is the 1M point.

How to read the summary
-----------------------
``seconds`` is wall time (engine: the whole ``purge`` call). ``rows/s`` is expired rows
archived and deleted per second; ``ratio`` is engine rows/s over raw rows/s (target
>= 0.5). For the engine, "batch" is what ``progress`` reports: the batch's transaction
(one pass: the DELETE streamed into gzip, the upload and its check; what the sizer aims at
0.25 s). "Whole batch" is the ledger's pending-to-done time. The breakdown wraps
``upper_bound``, ``encode_rows`` (the two-phase path only: 0 in one pass),
``put_verified`` (upload + HEAD) and the ledger writes; with two workers the steps add up
to more than the wall time. CPU seconds of the engine process, its PostgreSQL backends
and the moto server show who was busy.

Experiments (not needed for the verdict; their code is in ``bench/archive_experiments.py``)
------------------------------------------------------------------------------------------
* ``--profile`` times the pieces separately on one batch of the first ``--profile-rows``
  (default 100,000) expired rows of a fresh copy, best of 3, with alternatives (psycopg2
  tuples, orjson if importable, ``row_to_json`` in PostgreSQL over the sorted columns and
  whether it gives the same bytes as ``canonical_line``, row versions ``xmin, ctid``
  instead of content digests); its DELETEs are rolled back, each after a CHECKPOINT.
* ``--sketch`` adds a third method, ``onepass``: NOT the engine, a sketch of a design in
  which each batch's ``COPY (DELETE ... RETURNING ...) TO STDOUT`` is its archive body,
  uploaded and verified before that transaction commits (see ``archive_experiments.measure_onepass``);
  ``--sketch-format csv`` writes COPY's CSV instead of JSON lines, to show what JSON costs.
* ``--fixed-batch-rows N`` replaces the engine's adaptive ``BatchSizer`` with a fixed size
  (in the engine's child process only): how time and peak memory follow the batch size.

Timings on a shared machine are noisy; ``--repeat K`` runs raw and engine K times,
interleaved, and reports medians and pooled batch percentiles.

Run::

    /work/main/.venv/bin/python bench/archive_purge.py [--rows 2000000] [--expired 1000000]
        [--repeat 1] [--json] [--memory-only] [--no-memory] [--memory-sizes 1000000,3000000]
        [--max-batch-rows N] [--fixed-batch-rows N] [--profile] [--sketch] [--save [PATH]]
        [--pg postgresql://postgres@127.0.0.1:5432/postgres]

Databases, servers and temporary files are removed at the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import moto_process  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from harness import (  # noqa: E402
    CUSTOMERS_AS_OF as AS_OF,
)
from harness import (
    Meter,
    add_common,
    admin_url,
    aws_spec,
    bench_parser,
    build_pristine,
    check_common,
    count_problems,
    emit,
    fresh_copy,
    interleave,
    log,
    median_of,
    ms,
    on_fresh_copy,
    open_journal_run,
    percentile,
    postgres_spec,
    print_method_table,
    print_runs,
    print_target,
    proc_status_kib,
    psycopg2_connect,
    ratio_verdict,
    reset_peak_rss,
    retention_engine,
    rule_cutoff,
    scalar,
    summarize_runs,
    throwaway_database,
    wrong,
)
from moto_process import REGION, cpu_seconds, plain_client  # noqa: E402
from sqlalchemy.engine import URL, make_url  # noqa: E402

from retention.rules.loader import load_rule_file  # noqa: E402

BUCKET = "retention-archive-bench"
RULE_YAML = """\
category: bench_customers
description: Benchmark of archiving closed customer accounts to S3 before deleting them
owner: bench
legal_basis: Benchmark only
retain_for: P2Y
schedule: null
action: archive
archive:
  connection: aws_default
  bucket: {bucket}
  format: jsonl.gz
targets:
  - name: customers
    kind: sql
    connection: bench_db
    table: customers
    key: [id]
    age_column: closed_at
{extra}"""
TARGET_RATIO = 0.5
MEMORY_SLACK_FACTOR = 1.25
MEMORY_SLACK_KIB = 16 * 1024
SERVER_START_TIMEOUT_S = 120
SINK_BUFFER = 1 << 20
def rule_text(max_batch_rows: int | None, workers: int = 1) -> str:
    """The bench rule, with the rule's ``max_batch_rows`` (if given) and ``workers``."""
    extra = f"    max_batch_rows: {max_batch_rows}\n" if max_batch_rows else ""
    extra += f"    workers: {workers}\n"
    return RULE_YAML.format(bucket=BUCKET, extra=extra)


# -- the moto server (child process) -------------------------------------------------


def seed_bucket(backend) -> dict:
    """The seed for ``moto_process.serve``: an empty bench bucket."""
    backend.create_bucket(BUCKET, REGION)
    return {}


def moto_server():
    """A fresh moto server in a child process: its endpoint and pid."""
    return moto_process.moto_server([os.path.abspath(__file__), "--serve-moto"], SERVER_START_TIMEOUT_S)


# -- raw -----------------------------------------------------------------------------


class BufferedSink:
    """Collects copy_expert's one-write-per-row into 1 MiB writes to the gzip stream."""

    def __init__(self, stream):
        self.stream = stream
        self.buffer = bytearray()
        self.bytes = 0

    def write(self, data) -> int:
        if isinstance(data, str):
            data = data.encode("utf-8")
        self.buffer += data
        self.bytes += len(data)
        if len(self.buffer) >= SINK_BUFFER:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self.buffer:
            self.stream.write(self.buffer)
            self.buffer = bytearray()


def measure_raw(bench_url: URL, cutoff: datetime, scratch: Path) -> dict:
    """COPY (DELETE ... RETURNING *) TO STDOUT into gzip -1 (Python) writing a file."""
    path = scratch / f"raw-{uuid.uuid4().hex[:8]}.tsv.gz"
    conn = psycopg2_connect(bench_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            backend = cur.fetchone()[0]
            statement = cur.mogrify(
                "COPY (DELETE FROM customers WHERE closed_at < %s RETURNING *) TO STDOUT", (cutoff,)
            ).decode()
        conn.commit()
        meter = Meter({"pg_cpu_s": backend})
        meter.start()
        with open(path, "wb") as file, gzip.GzipFile(fileobj=file, mode="wb", compresslevel=1, mtime=0) as gz:
            sink = BufferedSink(gz)
            with conn.cursor() as cur:
                cur.copy_expert(statement, sink)
                deleted = cur.rowcount
            sink.flush()
        conn.commit()
        seconds = meter.stop()
    finally:
        conn.close()
    lines, id_sum = 0, 0
    with gzip.open(path, "rb") as stream:
        for line in stream:
            lines += 1
            id_sum += int(line.split(b"\t", 1)[0])
    size = path.stat().st_size
    path.unlink()
    return {"deleted": deleted, **meter.figures, "batch_seconds": [seconds],
            "archive": {"lines": lines, "id_sum": id_sum, "bytes": size, "text_bytes": sink.bytes}}


# -- engine (child process) ----------------------------------------------------------


def engine_child(params: dict) -> dict:
    """Child process: one engine purge, instrumented; its figures as a dict."""
    from retention.run.journal import JournalLedger
    from retention.targets import RunContext, Targets
    from retention.targets.sql import archive as sql_actions
    from retention.targets.sql import batch as sql_batch

    bench_url, audit_url = make_url(params["bench_url"]), make_url(params["audit_url"])
    rule_file = load_rule_file(Path(params["rule_path"]))
    rule = rule_file.rule
    target = rule.target("customers")
    specs = {
        "bench_db": postgres_spec(bench_url),
        "aws_default": aws_spec(params["endpoint"], "aws_default"),
    }
    spent: dict[str, float] = {"upper_bound": 0.0, "read_encode": 0.0, "upload": 0.0, "journal": 0.0}

    def timed(name, function):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - t0
        return wrapper

    class TimedLedger(JournalLedger):
        def pending(self, *args, **kwargs):
            return timed("journal", super().pending)(*args, **kwargs)

        def done(self, *args, **kwargs):
            return timed("journal", super().done)(*args, **kwargs)

        def resolve(self, *args, **kwargs):
            return timed("journal", super().resolve)(*args, **kwargs)

    if params.get("fixed_batch_rows"):
        from retention.targets.sql import walk as sql_walk

        class FixedSizer:
            """--fixed-batch-rows: every batch this size (instead of the adaptive sizer)."""

            def __init__(self, _maximum, **_kwargs):
                self.size = params["fixed_batch_rows"]

            def observe(self, _rows, _seconds):
                pass

        sql_walk.BatchSizer = FixedSizer  # the walker makes its sizers by this name

    audit_engine = retention_engine(audit_url)
    targets = Targets(specs.__getitem__)
    try:
        journal, run = open_journal_run(audit_engine, rule_file, target, AS_OF)
        ledger = TimedLedger(journal, run, target.name)
        context = RunContext(action=rule.action, category=rule.category, run_id=run.run_id, as_of=run.as_of,
                             archive=rule.archive)
        table = targets.open(target, context)
        table.check()  # reflect before the clock starts, as planning does
        assert isinstance(table.action, sql_actions.ArchiveRows), type(table.action)
        # Coarse, per-batch wrappers (negligible cost): where the time of a batch goes.
        sql_batch.upper_bound = timed("upper_bound", sql_batch.upper_bound)
        sql_actions.encode_rows = timed("read_encode", sql_actions.encode_rows)
        store = table.action.store
        store.put_verified = timed("upload", store.put_verified)
        backends: set[int] = set()

        @sa.event.listens_for(table.engine, "connect")
        def _remember_backend(dbapi_connection, _record):
            with dbapi_connection.cursor() as cur:
                cur.execute("SELECT pg_backend_pid()")
                backends.add(cur.fetchone()[0])
            dbapi_connection.commit()

        table.engine.dispose()  # so that every connection the purge uses goes through the hook
        batches: list[dict] = []
        last = [0.0]

        def progress(deleted: int, rows: int, seconds: float) -> None:
            now = time.perf_counter()
            batches.append({"rows": rows, "delete_s": seconds, "whole_s": now - last[0], "deleted": deleted,
                            "rss_kib": proc_status_kib("VmRSS")})
            last[0] = now

        import gc

        gc.collect()
        baseline = proc_status_kib("VmRSS")
        maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        hwm_reset = reset_peak_rss()
        cpu0 = time.process_time()
        started = last[0] = time.perf_counter()
        outcome = table.purge(run.cutoff, ledger, progress=progress)
        seconds = time.perf_counter() - started
        client_cpu = time.process_time() - cpu0
        peak_hwm = proc_status_kib("VmHWM")
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        end_rss = proc_status_kib("VmRSS")
        pg_cpu = sum(cpu_seconds(pid) for pid in backends)  # backends started after the hook
        journaled = ledger.deleted()
        unresolved = len(ledger.unresolved())
        objects = [obj for descriptor in ledger.descriptors() for obj in json.loads(descriptor).get("objects", [])]
    finally:
        targets.close()
        audit_engine.dispose()
    peak = peak_hwm if hwm_reset else maxrss
    return {
        "deleted": outcome.deleted, "remaining": outcome.remaining, "journaled": journaled,
        "unresolved": unresolved, "seconds": seconds, "client_cpu_s": client_cpu, "pg_cpu_s": pg_cpu,
        "batches": batches, "spent": spent, "run_id": run.run_id, "category": rule.category,
        "objects": [{"key": o["key"], "rows": o["rows"], "bytes": o["bytes"], "table": o["table"]} for o in objects],
        "memory": {"baseline_kib": baseline, "peak_kib": peak, "growth_kib": peak - baseline, "end_kib": end_rss,
                   "method": "VmHWM reset by clear_refs" if hwm_reset else "ru_maxrss",
                   "maxrss_before_kib": maxrss_before},
    }


def measure_engine(bench_url: URL, audit_url: URL, rule_path: Path, expired_ids: dict,
                   fixed_batch_rows: int | None = None) -> dict:
    """One engine run in a fresh child process against a fresh moto server; archive checked."""
    with moto_server() as server:
        params = {"bench_url": bench_url.render_as_string(hide_password=False),
                  "audit_url": audit_url.render_as_string(hide_password=False),
                  "endpoint": server["endpoint"], "rule_path": str(rule_path),
                  "fixed_batch_rows": fixed_batch_rows}
        moto_cpu0 = cpu_seconds(server["pid"])
        child = subprocess.run([sys.executable, os.path.abspath(__file__), "--engine-child", json.dumps(params)],
                               stdout=subprocess.PIPE, text=True)
        moto_cpu = cpu_seconds(server["pid"]) - moto_cpu0
        if child.returncode != 0:
            raise RuntimeError(f"engine child process failed (exit code {child.returncode})")
        result = json.loads(child.stdout.strip().splitlines()[-1])
        result["moto_cpu_s"] = moto_cpu
        t0 = time.perf_counter()
        result["archive"] = check_archive(server["endpoint"], result, expired_ids)
        log(f"engine: archive checked in {time.perf_counter() - t0:.1f} s")
    result["batch_seconds"] = [b["delete_s"] for b in result["batches"]]
    return result


def check_archive(endpoint: str, result: dict, expired_ids: dict) -> dict:
    """Download every object of the run, count its lines and sum its ids; compare."""
    client = plain_client(endpoint)
    # The store's layout (ArchiveStore._run_prefix), spelled out here so the check does not trust it.
    prefix = f"{result['category']}/run={urllib.parse.quote(result['run_id'], safe='-_.~')}/"
    listed: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for item in page.get("Contents", []):
            listed[item["Key"]] = item["Size"]
    lines = id_sum = id_sq = 0
    problems = []
    for key in sorted(listed):
        body = gzip.decompress(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
        if result.get("format") == "csv":
            records = (int(fields[result["id_field"]]) for fields in csv.reader(io.StringIO(body.decode())))
        else:
            records = (json.loads(line)["id"] for line in body.splitlines() if line)
        for ident in records:
            lines += 1
            id_sum += ident
            id_sq += ident * ident
    client.close()
    journal_keys = {o["key"] for o in result["objects"]}
    journal_rows = sum(o["rows"] for o in result["objects"])
    if set(listed) != journal_keys:
        problems.append(f"bucket holds {len(listed)} objects under {prefix}, the journal records "
                        f"{len(journal_keys)} ({len(set(listed) - journal_keys)} not journaled, "
                        f"{len(journal_keys - set(listed))} missing)")
    if journal_rows != expired_ids["count"]:
        problems.append(f"journaled objects hold {journal_rows} rows, expected {expired_ids['count']}")
    if (lines, id_sum, id_sq) != (expired_ids["count"], expired_ids["sum"], expired_ids["sumsq"]):
        problems.append(f"archive holds {lines} lines (ids sum {id_sum}), expected {expired_ids['count']} "
                        f"(ids sum {expired_ids['sum']}) or the ids differ")
    return {"objects": len(listed), "bytes": sum(listed.values()), "lines": lines, "journal_rows": journal_rows,
            "problems": problems}


def pristine_expired_ids(bench, cutoff: datetime) -> dict:
    with bench.connect() as conn:
        count, total, squares = conn.execute(sa.text(
            "SELECT count(*), coalesce(sum(id), 0), coalesce(sum(id::numeric * id), 0) "
            "FROM customers_pristine WHERE closed_at < :c"), {"c": cutoff}).one()
    return {"count": int(count), "sum": int(total), "sumsq": int(squares)}


# -- report --------------------------------------------------------------------------


def summarize(name: str, runs: list[dict], expired: int) -> dict:
    """One method's figures over its runs: median times and sizes, batch times pooled."""
    out = summarize_runs(name, runs, expired, extra={
        "client_cpu_s": round(median_of(runs, lambda r: r["client_cpu_s"]), 2),
        "pg_cpu_s": round(median_of(runs, lambda r: r["pg_cpu_s"]), 2),
        "archive_bytes": int(median_of(runs, lambda r: r["archive"]["bytes"])),
    })
    if name == "engine":
        whole = [b["whole_s"] for r in runs for b in r["batches"]]
        rows = [b["rows"] for r in runs for b in r["batches"]]
        out.update({
            "longest_whole_batch_ms": ms(max(whole)), "p50_whole_batch_ms": ms(percentile(whole, 0.5)),
            "batch_rows_p50": int(percentile(rows, 0.5)), "batch_rows_max": max(rows),
            "moto_cpu_s": round(median_of(runs, lambda r: r["moto_cpu_s"]), 2),
            "objects": int(median_of(runs, lambda r: r["archive"]["objects"])),
            "breakdown_s": {k: round(median_of(runs, lambda r, k=k: r["spent_all"][k]), 3)
                            for k in runs[0]["spent_all"]},
            "batch_ms_each_run": [[[b["rows"], ms(b["delete_s"]), ms(b["whole_s"])] for b in r["batches"]]
                                  for r in runs],
        })
    return out


def breakdown(result: dict) -> dict:
    """The engine's wall time split by step (delete = the transactions progress reports)."""
    spent = dict(result["spent"])
    spent["delete_txn"] = sum(b["delete_s"] for b in result["batches"])
    spent["other"] = result["seconds"] - sum(spent.values())
    return spent


def memory_verdict(points: dict[int, dict]) -> dict:
    """The memory points by size, and whether growth at the largest stays within the slack of the smallest."""
    sizes = sorted(points)
    out = {"points": {str(n): points[n] for n in sizes}}
    if len(sizes) >= 2:
        small, large = points[sizes[0]]["growth_kib"], points[sizes[-1]]["growth_kib"]
        limit = max(small * MEMORY_SLACK_FACTOR, small + MEMORY_SLACK_KIB)
        out.update({"growth_small_kib": small, "growth_large_kib": large, "limit_kib": round(limit),
                    "flat": large <= limit})
    return out


def print_summary(report: dict) -> None:
    """The figures as a table, the engine's breakdown, the verdict lines, memory and profile."""
    methods, v = report.get("methods"), report.get("verdict", {})
    print()
    if methods:
        print(f"table customers: {report['rows']:,} rows, {report['expired']:,} expired (cutoff {report['cutoff']}), "
              f"PostgreSQL {report['server_version']}, {os.cpu_count()} CPUs; moto {report['moto_version']} "
              f"in its own process")
        print("raw: COPY (DELETE ... RETURNING *) TO STDOUT → Python gzip level 1 → a file in a temp dir")
        code = report["engine_code"]
        print(f"engine at {code['commit']}{' + uncommitted ' + ', '.join(code['modified']) if code['modified'] else ''}; "
              f"load average {report['load_average_start'][0]} at start, {report['load_average_end'][0]} at end "
              f"(the machine is shared)")
        runs = methods["raw"]["runs"]
        if runs > 1:
            print(f"{runs} runs per method, each on a fresh copy; seconds are medians, batch figures pooled")
        print()
        print_method_table(methods, [
            ("seconds", ">8.2f", "seconds"), ("rows/s", ">9,", "rows_per_s"), ("batches", ">8,", "batches"),
            ("longest ms", ">11,.1f", "longest_batch_ms"), ("p50 ms", ">8.1f", "p50_batch_ms"),
            ("p95 ms", ">8.1f", "p95_batch_ms"), ("cpu s", ">6.1f", "client_cpu_s"), ("pg cpu s", ">8.1f", "pg_cpu_s"),
            ("archive MB", ">10.1f", lambda m: m["archive_bytes"] / 1e6),
        ])
        print_runs(methods, 7)
        e = methods["engine"]
        print()
        print(f"engine: {e['objects']} objects; rows per batch p50 {e['batch_rows_p50']:,}, max {e['batch_rows_max']:,}; "
              f"whole batch p50 {e['p50_whole_batch_ms']:,.0f} ms, max {e['longest_whole_batch_ms']:,.0f} ms; "
              f"moto cpu {e['moto_cpu_s']:.1f} s")
        b = e["breakdown_s"]
        total = sum(b.values())
        print("engine time by step: " + ", ".join(
            f"{k.replace('_', ' ')} {s:.1f} s ({s / total:.0%})" for k, s in b.items()))
        print_target("ratio engine/raw", v["ratio_engine_over_raw"], ">8.2f", ">=", TARGET_RATIO, v["ratio_pass"],
                     width=6)
        if "ratio_onepass_over_raw" in v:
            print(f"ratio onepass/raw  {v['ratio_onepass_over_raw']:>8.2f}   (the sketch, not the engine; "
                  f"batches of {report['sketch_batch_rows']:,} rows, whole batch = its transaction)")
        print(f"longest batch (s)  {v['longest_batch_s']:>8.3f}   (delete transaction; "
              f"whole batch {e['longest_whole_batch_ms'] / 1000:.3f} s)")
    memory = report.get("memory")
    if memory:
        for size, point in memory["points"].items():
            print(f"peak RSS growth at {int(size) / 1e6:g}M expired ({int(size) * 2 / 1e6:g}M rows)   "
                  f"{point['growth_kib'] / 1024:>7.1f} MiB   (baseline {point['baseline_kib'] / 1024:.0f} MiB, "
                  f"batch rows max {point['batch_rows_max']:,}, {point['method']})")
        if "flat" in memory:
            print(f"memory flat in rows    {memory['growth_large_kib'] / 1024:>7.1f} MiB <= "
                  f"{memory['limit_kib'] / 1024:.1f} MiB   {'PASS' if memory['flat'] else 'FAIL'}")
    if report.get("profile"):
        from archive_experiments import print_profile

        print_profile(report["profile"])


# -- main ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, checked (the child processes' own flags skip the checks)."""
    parser = bench_parser(__doc__)
    parser.add_argument("--rows", type=int, default=2_000_000, help="rows in the table (default 2,000,000)")
    parser.add_argument("--expired", type=int, default=1_000_000, help="rows expired (default 1,000,000)")
    add_common(parser, repeat_order="raw, engine, raw, ...")
    parser.add_argument("--memory-only", action="store_true", help="only the peak-memory measurement")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--memory-sizes", default="1000000,3000000",
                        help="expired rows per memory point, each in a table of twice as many (default 1M,3M)")
    parser.add_argument("--max-batch-rows", type=int, help="the rule's max_batch_rows (default: the rule default)")
    parser.add_argument("--workers", type=int, default=2,
                        help="the rule's workers: walkers in parallel, one connection each (default 2, "
                             "one per core of this machine)")
    parser.add_argument("--fixed-batch-rows", type=int, metavar="N",
                        help="engine batches of exactly N rows (replaces the adaptive BatchSizer; an experiment)")
    parser.add_argument("--sketch", action="store_true",
                        help="also time the 'onepass' sketch: each batch's COPY (DELETE ... RETURNING json) is its "
                             "archive, uploaded and verified before COMMIT (not the engine)")
    parser.add_argument("--sketch-batch-rows", type=int, default=50_000, help="rows per onepass batch")
    parser.add_argument("--sketch-format", choices=["jsonl", "csv"], default="jsonl",
                        help="onepass body: row_to_json lines (default) or COPY's CSV (to show what JSON costs)")
    parser.add_argument("--profile", action="store_true", help="also time the pieces of one batch separately")
    parser.add_argument("--profile-rows", type=int, default=100_000, help="rows of the profiled batch")
    parser.add_argument("--serve-moto", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine-child", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_moto or args.engine_child:
        return args
    if not 0 < args.expired <= args.rows:
        parser.error("need 0 < --expired <= --rows")
    check_common(parser, args)
    try:
        args.memory_sizes = sorted({int(s) for s in args.memory_sizes.split(",") if s.strip()})
    except ValueError:
        parser.error("--memory-sizes takes comma-separated row counts")
    if args.memory_only and args.no_memory:
        parser.error("--memory-only and --no-memory exclude each other")
    return args


def engine_code() -> dict:
    """Which engine was measured (others edit it concurrently): commit and file hashes."""
    root = Path(__file__).resolve().parent.parent
    files = ["plugins/retention/targets/sql/archive.py", "plugins/retention/targets/sql/walk.py",
             "plugins/retention/archive/store.py", "plugins/retention/archive/codec.py",
             "plugins/retention/run/journal.py"]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", *files], cwd=root, capture_output=True,
                               text=True).stdout.split()
    except OSError:
        commit, dirty = "?", []
    return {"commit": commit, "modified": [f for f in files if f in dirty],
            "sha256": {f: hashlib.sha256((root / f).read_bytes()).hexdigest()[:12] for f in files}}


def checked_raw(bench, bench_url: URL, rows: int, expired: int, cutoff: datetime, scratch: Path) -> dict:
    """One timed run of the raw peer on a fresh copy; the table and its COPY output checked."""
    ids = pristine_expired_ids(bench, cutoff)
    raw = on_fresh_copy("raw", bench, lambda: measure_raw(bench_url, cutoff, scratch), rows, expired, cutoff)
    if (raw["archive"]["lines"], raw["archive"]["id_sum"]) != (ids["count"], ids["sum"]):
        raw["problems"].append(f"the COPY output holds {raw['archive']['lines']} rows "
                               f"(ids sum {raw['archive']['id_sum']}), expected {ids['count']}")
    log(f"raw: {raw['seconds']:.2f} s" + wrong(raw["problems"]))
    return raw


def checked_engine(bench, bench_url, audit_url, rule_path, rows, expired, cutoff, label,
                   fixed_batch_rows: int | None = None) -> dict:
    """One engine run on a fresh copy (in a child process); table, journal and archive checked."""
    ids = pristine_expired_ids(bench, cutoff)
    result = on_fresh_copy(label, bench, lambda: measure_engine(bench_url, audit_url, rule_path, ids, fixed_batch_rows),
                           rows, expired, cutoff)  # the engine runs in a child process
    problems = result["problems"] + count_problems(result, expired, "rows")
    if result["remaining"] or result["unresolved"]:
        problems.append(f"{result['remaining']} expired rows remaining, {result['unresolved']} batches pending")
    problems += result["archive"]["problems"]
    result["problems"] = problems
    result["spent_all"] = breakdown(result)
    mem = result["memory"]
    log(f"{label}: {result['seconds']:.2f} s, {len(result['batches'])} batches, peak RSS growth "
        f"{mem['growth_kib'] / 1024:.1f} MiB" + wrong(problems))
    return result


def memory_point(result: dict) -> dict:
    """An engine run's memory figures, with its batch sizes and RSS after each batch."""
    mem = result["memory"]
    return {**mem, "batch_rows_max": max(b["rows"] for b in result["batches"]),
            "batches": len(result["batches"]), "seconds": round(result["seconds"], 2),
            "correct": not result["problems"],
            "rss_after_batch_kib": [[b["deleted"], b["rss_kib"]] for b in result["batches"]]}


def main(argv: list[str] | None = None) -> int:
    """Time raw and engine (and the extras asked for), then memory; print the figures; 1 if a check failed."""
    args = parse_args(argv)
    if args.serve_moto:
        moto_process.serve(seed_bucket)
        return 0
    if args.engine_child:
        print(json.dumps(engine_child(json.loads(args.engine_child))), flush=True)
        return 0
    import moto

    admin = admin_url(args.pg)
    cutoff = rule_cutoff(rule_text(None), AS_OF)
    report: dict = {"rows": args.rows, "expired": args.expired, "as_of": AS_OF.isoformat(),
                    "cutoff": cutoff.isoformat(), "moto_version": moto.__version__, "engine_code": engine_code(),
                    "load_average_start": [round(x, 2) for x in os.getloadavg()],
                    "fixed_batch_rows": args.fixed_batch_rows, "max_batch_rows": args.max_batch_rows,
                    "sketch_batch_rows": args.sketch_batch_rows if args.sketch else None}
    all_correct = True
    with throwaway_database(admin, "retention_bench") as bench_url, \
            throwaway_database(admin, "retention_bench_audit") as audit_url, \
            tempfile.TemporaryDirectory(prefix="retention-bench-archive-") as scratch_dir:
        scratch = Path(scratch_dir)
        rule_path = scratch / "bench_customers.yaml"
        rule_path.write_text(rule_text(args.max_batch_rows, args.workers))
        bench = sa.create_engine(bench_url)
        try:
            report["server_version"] = scalar(bench, "SHOW server_version")
            memory_points: dict[int, dict] = {}
            if not args.memory_only:
                log(f"building {args.rows:,} rows, {args.expired:,} expired")
                t0 = time.perf_counter()
                build_pristine(bench, args.rows, args.expired, cutoff)
                log(f"built in {time.perf_counter() - t0:.1f} s")
                measures = {
                    "raw": lambda: checked_raw(bench, bench_url, args.rows, args.expired, cutoff, scratch),
                    "engine": lambda: checked_engine(bench, bench_url, audit_url, rule_path, args.rows,
                                                     args.expired, cutoff, "engine", args.fixed_batch_rows),
                }
                if args.sketch:
                    from archive_experiments import checked_onepass

                    measures["onepass"] = lambda: checked_onepass(bench, bench_url, args, cutoff)
                runs = interleave(measures, args.repeat)
                methods = {name: summarize(name, results, args.expired) for name, results in runs.items()}
                report["methods"] = methods
                report["verdict"] = {**ratio_verdict(methods, TARGET_RATIO),
                                     "longest_batch_s": round(methods["engine"]["longest_batch_ms"] / 1000, 3)}
                if "onepass" in methods:
                    raw_s = methods["raw"]["seconds"]
                    report["verdict"]["ratio_onepass_over_raw"] = round(raw_s / methods["onepass"]["seconds"], 3)
                all_correct &= all(m["correct"] for m in methods.values())
                if args.rows == 2 * args.expired:
                    memory_points[args.expired] = memory_point(runs["engine"][0])
                if args.profile:
                    log(f"profile: fresh copy; timing the pieces of one batch of {args.profile_rows:,} rows")
                    fresh_copy(bench)
                    from archive_experiments import profile_pieces

                    report["profile"] = profile_pieces(bench_url, cutoff, min(args.profile_rows, args.expired))
            if not args.no_memory:
                for size in args.memory_sizes:
                    if size in memory_points:
                        continue
                    log(f"memory: building {2 * size:,} rows, {size:,} expired")
                    build_pristine(bench, 2 * size, size, cutoff)
                    result = checked_engine(bench, bench_url, audit_url, rule_path, 2 * size, size, cutoff,
                                            f"memory {size / 1e6:g}M", args.fixed_batch_rows)
                    memory_points[size] = memory_point(result)
                    all_correct &= not result["problems"]
                    if result["problems"]:
                        memory_points[size]["problems"] = result["problems"]
                report["memory"] = memory_verdict(memory_points)
        finally:
            bench.dispose()
    report["correct"] = all_correct
    report["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    emit(report, args, print_summary)
    return 0 if all_correct else 1


if __name__ == "__main__":
    # The experiments import this module by name: let that be this very module, not a second copy.
    sys.modules.setdefault("archive_purge", sys.modules[__name__])
    sys.exit(main())
