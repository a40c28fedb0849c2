"""Benchmark: the whole `retention run` command on a PostgreSQL table range-partitioned by month,
against a raw DELETE and pg_partman's retention, on identical data in one run.

A template database gets an ``events`` table of ``--rows`` rows (default 7,200,000: id,
customer_id, created_at, a 96-character note) spread evenly over 24 monthly partitions
(July 2024 to June 2026); the cutoff (as of 2026-06-16, retain P1Y) is 2025-06-16, so 11
partitions lie wholly before it and June 2025 is the boundary: about half the rows expire.
Every method gets its own copy (``CREATE DATABASE … TEMPLATE``), VACUUM ANALYZEd:

* ``engine``: ``python -m retention.interfaces.cli run`` in a subprocess, exactly as a user
  types it (start-up, plan, the drops, the boundary partition's batches, the certificate);
* ``raw``: ``DELETE FROM events WHERE created_at < cutoff`` in one statement;
* ``partman``: pg_partman's ``run_maintenance`` with the parent registered beforehand (not
  timed) and ``retention`` set to the same cutoff. Its retention drops whole partitions only:
  the boundary partition's expired rows stay (reported as ``left_expired``).

The engine's fixed cost is measured beside it (printed as the ``floor`` line): the same
command run again on its own copy once purged (nothing left to purge: start-up, the plan's
count of the rows left, the certificate), and the import of SQLAlchemy, its psycopg2
dialect and pydantic alone (the interpreter and libraries no run can do without). No
engine can beat the raw DELETE by more than raw / floor.

Checks: after ``engine`` and ``raw`` no row before the cutoff is left and every other row is;
the engine's certificate counts exactly the expired rows. A failed check exits 1. Without
the pg_partman extension on the server that peer is reported as unavailable.

With ``--archive`` the rule archives (``action: archive``, jsonl.gz, to a moto S3 server in
a child process of its own, a fresh one per run) and the methods are:

* ``archive``: the same command: whole partitions streamed to verified objects, then dropped;
* ``batches``: the same command with whole partitions switched off
  (``partitions._may_drop_whole`` made false in the child): every expired row archived and
  deleted in batches, as archive runs did before whole partitions;
* ``raw_copy``: ``COPY (DELETE … WHERE created_at < cutoff RETURNING *) TO STDOUT`` into
  ``gzip -1`` (a local file), one transaction: no JSON, no S3, no proof.

Their checks add the archive's: the manifest's objects are exactly the objects listed under
the run (no debris) and hold exactly the expired rows (every object read and its lines
counted). Each engine run also reports its peak RSS (the child's ``ru_maxrss``).

Run::

    .venv/bin/python bench/partition_purge.py [--rows 7200000] [--repeat 1] [--archive] [--pg URL] [--json] [--save [PATH]]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sqlalchemy as sa  # noqa: E402
from harness import (  # noqa: E402
    PLUGINS,
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
    peer_hidden,
    peer_missing,
    print_missing_peers,
    retention_run_argv,
    run_measured,
    run_sql,
    throwaway_database,
)

AS_OF = "2026-06-16T00:00:00Z"
CUTOFF = datetime(2025, 6, 16, tzinfo=timezone.utc)
FIRST_MONTH = (2024, 7)
MONTHS = 24
RULE = """\
category: bench_events
description: Benchmark of purging a partitioned events table
owner: bench
legal_basis: Benchmark only
retain_for: P1Y
schedule: null
action: delete
targets:
  - name: events
    kind: sql
    connection: bench_db
    table: events
    key: [id, created_at]
    age_column: created_at
    max_fraction: 0.6
"""


def _month(offset: int) -> str:
    year, month = divmod(FIRST_MONTH[1] - 1 + offset, 12)
    return f"{FIRST_MONTH[0] + year:04d}-{month + 1:02d}-01"


def seed(url: sa.URL, rows: int) -> None:
    """``events`` partitioned by month (pg_partman's child names), rows spread evenly in time."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(
            "CREATE TABLE events (id BIGINT NOT NULL, customer_id INT NOT NULL, created_at TIMESTAMPTZ NOT NULL, "
            "note TEXT, PRIMARY KEY (id, created_at)) PARTITION BY RANGE (created_at)"))
        for i in range(MONTHS):
            name = "events_p" + _month(i)[:7].replace("-", "_")
            conn.execute(sa.text(f"CREATE TABLE {name} PARTITION OF events FOR VALUES "
                                 f"FROM ('{_month(i)} 00:00+00') TO ('{_month(i + 1)} 00:00+00')"))
        conn.execute(sa.text(
            "INSERT INTO events SELECT i, i % 10000, TIMESTAMPTZ :start + (i - 1) * ((TIMESTAMPTZ :end - "
            "TIMESTAMPTZ :start) / :rows), repeat(md5(i::text), 3) FROM generate_series(1, :rows) AS i"),
            {"start": f"{_month(0)} 00:00+00", "end": f"{_month(MONTHS)} 00:00+00", "rows": rows})
        conn.execute(sa.text("CREATE INDEX events_created_at ON events (created_at)"))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE events"))
    engine.dispose()


@contextmanager
def copy_of(admin: sa.URL, template: str):
    """A fresh database cloned from ``template``, VACUUM ANALYZEd; dropped afterwards."""
    with throwaway_database(admin, "retention_bench_part", template=template) as url:
        prepare = sa.create_engine(url)
        run_sql(prepare, "VACUUM ANALYZE events")
        prepare.dispose()
        yield url


def counts(url: sa.URL) -> tuple[int, int, int]:
    """(rows before the cutoff, rows at or after it, partitions)."""
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        before, after = conn.execute(sa.text(
            "SELECT count(*) FILTER (WHERE created_at < :cutoff), count(*) FILTER (WHERE created_at >= :cutoff) "
            "FROM events"), {"cutoff": CUTOFF}).one()
        parts = conn.execute(sa.text("SELECT count(*) FROM pg_inherits WHERE inhparent = 'events'::regclass")).scalar()
    engine.dispose()
    return int(before), int(after), int(parts)


IMPORT_FLOOR = "import sqlalchemy, sqlalchemy.dialects.postgresql.psycopg2, psycopg2, pydantic"
"""What every run imports whatever it does: the floor under the command's start-up."""


def run_engine(url: sa.URL, expired: int, kept: int, *, rule: str = RULE, method: str = "engine",
               extra_env: dict[str, str] | None = None, prelude: str = "", check=None, floor: bool = False) -> dict:
    """The whole `retention run` command in a subprocess, then its certificate and the table checked
    (``prelude``: Python the child runs first; ``check``: more checks, told the certificate;
    ``floor``: then the same command again, with nothing left to purge, and the imports alone, timed)."""
    with tempfile.TemporaryDirectory(prefix="retention-bench-part-") as scratch:
        rules = Path(scratch) / "rules"
        rules.mkdir()
        (rules / "bench_events.yaml").write_text(rule)
        sys.path.insert(0, str(PLUGINS))
        from retention.evidence.signing import generate_keypair

        env = command_env({"bench_db": airflow_conn_uri(url),
                           "retention_audit": json.dumps({"conn_type": "sqlite", "host": f"{scratch}/audit.db"})},
                          generate_keypair(Path(scratch) / "keys")[0])
        env.update(extra_env or {})
        argv = retention_run_argv(rules, AS_OF, "--run-id", "bench")
        if prelude:  # the same command, after the child runs ``prelude``
            command = argv[argv.index("run"):]
            argv = [sys.executable, "-c", "; ".join(["import sys", prelude, "from retention.interfaces.cli import main",
                                                     f"sys.exit(main({command!r}))"])]
        started = time.perf_counter()
        done, peak_kib = run_measured(argv, env=env)
        seconds = time.perf_counter() - started
        returncode, stderr = done.returncode, done.stderr
        audit = sa.create_engine(f"sqlite:///{scratch}/audit.db")
        with audit.connect() as conn:
            payload = conn.execute(sa.text("SELECT payload FROM purge_certificates ORDER BY seq DESC LIMIT 1")).scalar()
        audit.dispose()
        floors = _floors(argv, env) if floor and returncode == 0 else {}  # after its certificate is read
    problems = [] if returncode == 0 else [f"exit {returncode}: {stderr.strip()[-300:]}"]
    data = json.loads(payload) if payload else {}
    target = data["targets"][0] if data else {}
    if target.get("deleted") != expired:
        problems.append(f"certificate says {target.get('deleted')} deleted, expected {expired}")
    if check is not None:
        problems += check(data, expired)
    return _checked(method, url, seconds, expired, kept, problems,
                    partitions_dropped=len(target.get("partitions", {})),
                    rows_in_dropped=sum(target.get("partitions", {}).values()), peak_rss_kib=peak_kib, **floors)


def _floors(argv: list[str], env: dict[str, str]) -> dict:
    """The command again (its run id changed: a new run), nothing left to purge; then the imports alone."""
    again = [*argv[:argv.index("--run-id")], "--run-id", "bench-floor"]
    started = time.perf_counter()
    done, _ = run_measured(again, env=env)
    empty = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"the empty run failed: exit {done.returncode}: {done.stderr.strip()[-300:]}")
    started = time.perf_counter()
    run_measured([sys.executable, "-c", IMPORT_FLOOR], env=env)
    return {"floor_empty_seconds": empty, "floor_import_seconds": time.perf_counter() - started}


def run_raw(url: sa.URL, expired: int, kept: int) -> dict:
    """One ``DELETE … WHERE created_at < cutoff``, committed."""
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        started = time.perf_counter()
        with conn.begin():
            deleted = conn.execute(sa.text("DELETE FROM events WHERE created_at < :cutoff"), {"cutoff": CUTOFF}).rowcount
        seconds = time.perf_counter() - started
    engine.dispose()
    problems = [] if deleted == expired else [f"deleted {deleted}, expected {expired}"]
    return _checked("raw", url, seconds, expired, kept, problems)


# -- archive ---------------------------------------------------------------------------

BUCKET = "bench-partition-archive"
SERVER_START_TIMEOUT_S = 60.0


def archive_rule() -> str:
    """The rule, archiving (jsonl.gz) to the bench bucket."""
    return RULE.replace("action: delete\n", "action: archive\narchive:\n  connection: aws_default\n"
                        f"  bucket: {BUCKET}\n  prefix: events/\n  format: jsonl.gz\n")


def run_archive(url: sa.URL, expired: int, kept: int, *, whole: bool = True) -> dict:
    """The archive command against a fresh moto server; its archive read back and checked."""
    import moto_process

    with moto_process.moto_server([os.path.abspath(__file__), "--serve-moto"], SERVER_START_TIMEOUT_S) as server:
        endpoint = server["endpoint"]
        extra = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AIRFLOW_CONN_AWS_DEFAULT": json.dumps({"conn_type": "aws", "login": "testing", "password": "testing",
                                                         "extra": {"region_name": "us-east-1",
                                                                   "endpoint_url": endpoint}})}
        prelude = "" if whole else ("import retention.targets.sql.partitions as p; "
                                    "p._may_drop_whole = lambda table: False")
        return run_engine(url, expired, kept, rule=archive_rule(), method="archive" if whole else "batches",
                          extra_env=extra, prelude=prelude,
                          check=lambda data, rows: check_archive(moto_process.plain_client(endpoint), data, rows))


def check_archive(client, certificate: dict, expired: int) -> list[str]:
    """The manifest lists exactly the run's objects, which hold exactly ``expired`` rows."""
    import gzip

    if "archive" not in certificate:
        return ["no archive manifest in the certificate"]
    key = certificate["archive"]["manifest"].split("/", 3)[3]
    manifest = json.loads(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    listed = {o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
              for o in page.get("Contents", [])}
    problems = []
    if listed != {o["key"] for o in manifest["objects"]} | {key}:
        problems.append(f"{len(listed)} objects listed, the manifest names {len(manifest['objects'])} (+ itself)")
    lines = sum(gzip.decompress(client.get_object(Bucket=BUCKET, Key=o["key"])["Body"].read()).count(b"\n")
                for o in manifest["objects"])
    if lines != expired or manifest["totals"]["rows"] != expired:
        problems.append(f"the archive holds {lines} lines ({manifest['totals']['rows']} in the manifest), "
                        f"expected {expired}")
    return problems


def run_raw_copy(url: sa.URL, expired: int, kept: int) -> dict:
    """``COPY (DELETE … RETURNING *) TO STDOUT`` into gzip -1, one transaction."""
    import gzip

    import psycopg2

    connection = psycopg2.connect(host=url.host, port=url.port or 5432, user=url.username, dbname=url.database)
    with tempfile.TemporaryDirectory(prefix="retention-bench-part-") as scratch:
        started = time.perf_counter()
        with gzip.open(Path(scratch) / "archive.csv.gz", "wb", compresslevel=1) as out, \
                connection.cursor() as cursor:
            cursor.copy_expert(cursor.mogrify("COPY (DELETE FROM events WHERE created_at < %s RETURNING *) TO STDOUT",
                                              (CUTOFF,)).decode(), out)
            deleted = cursor.rowcount
        connection.commit()
        seconds = time.perf_counter() - started
    connection.close()
    problems = [] if deleted == expired else [f"deleted {deleted}, expected {expired}"]
    return _checked("raw_copy", url, seconds, expired, kept, problems)


def seed_bucket(backend) -> dict:
    """The seed for ``moto_process.serve``: an empty bench bucket."""
    backend.create_bucket(BUCKET, "us-east-1")
    return {}


def run_partman(url: sa.URL, expired: int, kept: int) -> dict:
    """pg_partman's retention: the parent registered (not timed), then one ``run_maintenance`` timed."""
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text("CREATE SCHEMA partman"))
        conn.execute(sa.text("CREATE EXTENSION pg_partman SCHEMA partman"))
        conn.execute(sa.text("SELECT partman.create_parent(p_parent_table := 'public.events', p_control := "
                             "'created_at', p_type := 'native', p_interval := 'monthly', "
                             "p_start_partition := :start)"), {"start": _month(0)})
        # Retention is relative to now(): the interval that puts its cutoff at ours.
        conn.execute(sa.text("UPDATE partman.part_config SET retention = (now() - :cutoff)::text, "
                             "retention_keep_table = false WHERE parent_table = 'public.events'"), {"cutoff": CUTOFF})
        started = time.perf_counter()
        conn.execute(sa.text("SELECT partman.run_maintenance('public.events')"))
        seconds = time.perf_counter() - started
    engine.dispose()
    # Its maintenance also pre-makes partitions for the months ahead of now(): "partitions left" counts them.
    return _checked("partman", url, seconds, expired, kept, [], exact=False)


def _checked(method: str, url: sa.URL, seconds: float, expired: int, kept: int, problems: list[str], *,
             exact: bool = True, **figures: int) -> dict:
    before, after, parts = counts(url)
    if exact and before:
        problems.append(f"{before} rows before the cutoff left")
    if after != kept:
        problems.append(f"{after} rows at or after the cutoff, expected {kept}")
    log(f"{method}: {seconds:.2f} s, {expired - before:,} rows gone, {parts} partitions left"
        + (f" — WRONG: {'; '.join(problems)}" if problems else ""))
    return {"method": method, "seconds": seconds, "deleted": expired - before, "left_expired": before,
            "partitions_left": parts, "problems": problems, **figures}


def partman_available(admin: sa.URL) -> bool:
    """Whether the server can create the pg_partman extension."""
    engine = sa.create_engine(admin)
    with engine.connect() as conn:
        found = conn.execute(sa.text("SELECT 1 FROM pg_available_extensions WHERE name = 'pg_partman'")).first()
    engine.dispose()
    return found is not None


def main(argv: list[str] | None = None) -> int:
    """Seed the template, time every method on its own copy, print the ratios; 1 if a check failed."""
    parser = bench_parser(__doc__)
    parser.add_argument("--rows", type=int, default=7_200_000, help="rows in the table (default 7,200,000)")
    parser.add_argument("--archive", action="store_true",
                        help="archive instead of delete: whole partitions vs batches vs raw COPY (DELETE …) | gzip")
    parser.add_argument("--serve-moto", action="store_true", help=argparse.SUPPRESS)
    add_common(parser, repeat_order="engine, raw, partman; with --archive: archive, batches, raw_copy")
    args = parser.parse_args(argv)
    if args.serve_moto:
        import moto_process

        moto_process.serve(seed_bucket)
        return 0
    check_common(parser, args)
    if args.rows < MONTHS:
        parser.error(f"need --rows >= {MONTHS}")
    admin = admin_url(args.pg)
    with throwaway_database(admin, "retention_bench_part_tmpl") as template_url:
        template = str(template_url.database)
        log(f"seeding {args.rows:,} rows in {MONTHS} monthly partitions")
        seed(template_url, args.rows)
        expired, kept, _ = counts(template_url)
        methods = {"engine": partial(run_engine, floor=True), "raw": run_raw}
        peers: dict[str, str] = {}
        if args.archive:
            methods = {"archive": run_archive, "batches": partial(run_archive, whole=False), "raw_copy": run_raw_copy}
        elif partman_available(admin) and not peer_hidden("pg_partman"):
            methods["partman"] = run_partman
        else:
            peer_missing(peers, "pg_partman", "apt-get install postgresql-15-partman on the server")

        def measure(method):
            def once() -> dict:
                with copy_of(admin, template) as url:
                    return method(url, expired, kept)
            return once

        runs = interleave({name: measure(m) for name, m in methods.items()}, args.repeat)
    report = {**summarize(args.rows, expired, runs), "peers_missing": peers}
    emit(report, args, print_summary)
    return 1 if any(r["problems"] for rs in runs.values() for r in rs) else 0


def summarize(rows: int, expired: int, runs: dict[str, list[dict]]) -> dict:
    """Median seconds per method and the engine's ratios to its peers (peer time / engine time)."""
    import statistics

    methods = {}
    medians = ("seconds", "floor_empty_seconds", "floor_import_seconds")
    for name, results in runs.items():
        last = results[-1]
        methods[name] = {**{k: v for k, v in last.items() if k not in ("problems", *medians)},
                         **{k: round(statistics.median(r[k] for r in results), 3) for k in medians if k in last},
                         "runs": len(results), "problems": [p for r in results for p in r["problems"]]}
    first = next(iter(methods))  # engine, or with --archive: archive
    engine = methods[first]["seconds"]
    ratios = {f"{first}_vs_{name}": round(m["seconds"] / engine, 2) for name, m in methods.items() if name != first}
    # Issue 14: a delete at ≥ 3x the raw DELETE; an archive at ≥ 0.7x raw COPY (DELETE …) | gzip.
    peer, goal = ("raw_copy", 0.7) if first == "archive" else ("raw", 3.0)
    floor = {}
    if "floor_empty_seconds" in methods[first] and peer in methods:
        empty, imports = methods[first]["floor_empty_seconds"], methods[first]["floor_import_seconds"]
        floor = {"empty_run_seconds": empty, "import_seconds": imports,
                 f"best_{first}_vs_{peer}": round(methods[peer]["seconds"] / empty, 2) if empty else None}
    return {"rows": rows, "expired": expired, "months": MONTHS, "methods": methods, "ratios": ratios,
            "floor": floor,
            "target": {f"{first}_vs_{peer}": goal, "met": ratios.get(f"{first}_vs_{peer}", 0) >= goal}}


def print_summary(report: dict) -> None:
    """The figures as a table, then the ratios."""
    print(f"{report['rows']:,} rows in {report['months']} monthly partitions, {report['expired']:,} expired")
    print(f"{'method':<9} {'seconds':>8} {'rows gone':>11} {'expired left':>13} {'partitions left':>16} "
          f"{'peak RSS':>9}  check")
    for name, m in report["methods"].items():
        check = "ok" if not m["problems"] else "WRONG: " + "; ".join(m["problems"])
        rss = kib_as_mib(m["peak_rss_kib"]) if "peak_rss_kib" in m else "-"
        print(f"{name:<9} {m['seconds']:>8.2f} {m['deleted']:>11,} {m['left_expired']:>13,} "
              f"{m['partitions_left']:>16} {rss:>9}  {check}")
    for name, value in report["ratios"].items():
        print(f"{name}: {value:.2f}x (peer seconds / engine seconds)")
    print_missing_peers(report)
    first = next(iter(report["methods"]))  # engine, or with --archive: archive
    print(f"{first} (the whole command): peak RSS {kib_as_mib(report['methods'][first]['peak_rss_kib'])}")
    floor = report.get("floor")
    if floor:
        (best_name, best), = ((k, v) for k, v in floor.items() if k.startswith("best_"))
        print(f"floor: an empty run {floor['empty_run_seconds']:.2f} s (the same command, nothing left to purge), "
              f"imports alone {floor['import_seconds']:.2f} s; at best {best_name[5:]} = {best:.2f}x (raw / empty run)")
    target = report["target"]
    (name, goal), = ((k, v) for k, v in target.items() if k != "met")
    print(f"target {name} ≥ {goal}x: {'met' if target['met'] else 'NOT met'}")


if __name__ == "__main__":
    sys.exit(main())
