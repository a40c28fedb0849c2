"""The archive benchmark's experiments, not needed for its verdict: ``--sketch`` and ``--profile``.

``bench/archive_purge.py`` runs them when asked (see its docstring, "Experiments"): the
``onepass`` sketch, a design measured next to the engine and its raw peer, and the pieces of
one archive batch timed apart. They live here so that the benchmark itself holds only its
data, its engine run, its peer and its checks.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import time
import uuid
from datetime import datetime

import sqlalchemy as sa
from archive_purge import BUCKET, BufferedSink, check_archive, moto_server, pristine_expired_ids
from harness import (
    Meter,
    count_problems,
    log,
    on_fresh_copy,
    psycopg2_connect,
    retention_engine,
    run_sql,
    scalar,
    wrong,
)
from moto_process import plain_client
from sqlalchemy.engine import URL

PROFILE_REPEATS = 3
# COPY's text format doubles every backslash (JSON escapes included); CSV with a quote and a
# delimiter that JSON text never holds raw (PG escapes control characters) passes it verbatim.
VERBATIM = "(FORMAT csv, QUOTE E'\\x01', DELIMITER E'\\x02')"


# -- onepass (a sketch, not the engine) ----------------------------------------------


def measure_onepass(bench_url: URL, cutoff: datetime, batch_rows: int, expired_ids: dict,
                    fmt: str = "jsonl") -> dict:
    """What the engine could do: per batch, one transaction whose ``COPY (DELETE ... RETURNING
    <sorted columns>) TO STDOUT`` (as ``row_to_json``) IS the archive body; gzip -1, upload
    with ``ArchiveStore.put_verified``, and only then COMMIT (ROLLBACK on any failure). The
    archive holds exactly the rows deleted, so no digest comparison is needed. Batches walk
    ``closed_at`` (bound found by the age index, as the engine does). No journal (the engine
    spends ~0.5 ms a batch on it).

    ``fmt="csv"``: the body is COPY's own CSV of the sorted columns instead (a different
    archive format, which restore would have to learn), to show what JSON costs."""
    from retention.archive.store import ArchiveStore
    from retention.rules.models import ArchiveSpec

    run_id = f"onepass-{uuid.uuid4().hex[:8]}"
    category = "bench_customers"
    with moto_server() as server:
        client = plain_client(server["endpoint"])
        store = ArchiveStore(ArchiveSpec(connection="aws_default", bucket=BUCKET), client)
        conn = psycopg2_connect(bench_url)
        try:
            with conn.cursor() as cur:
                cur.execute("SET TIME ZONE 'UTC'")
                cur.execute("SELECT * FROM customers LIMIT 0")
                names = sorted(d.name for d in cur.description)
                columns = ", ".join(names)
                cur.execute("SELECT pg_backend_pid()")
                backend = cur.fetchone()[0]
            conn.commit()
            lower, batches, objects = None, [], []
            meter = Meter({"pg_cpu_s": backend, "moto_cpu_s": server["pid"]})
            meter.start()
            while True:
                t0 = time.perf_counter()
                window = "closed_at < %(cutoff)s" + ("" if lower is None else " AND closed_at > %(lower)s")
                params = {"cutoff": cutoff, "lower": lower, "offset": batch_rows - 1}
                with conn.cursor() as cur:
                    cur.execute(f"SELECT closed_at FROM customers WHERE {window} ORDER BY closed_at "
                                "OFFSET %(offset)s LIMIT 1", params)
                    row = cur.fetchone()
                    upper = row[0] if row else None
                    cur.execute("SET LOCAL enable_indexscan = off")
                    condition = window + ("" if upper is None else " AND closed_at <= %(upper)s")
                    delete = f"DELETE FROM customers WHERE {condition} RETURNING {columns}"
                    query = (f"COPY ({delete}) TO STDOUT (FORMAT csv)" if fmt == "csv" else
                             f"COPY (WITH d AS ({delete}) SELECT row_to_json(d) FROM d) TO STDOUT {VERBATIM}")
                    statement = cur.mogrify(query, {**params, "upper": upper}).decode()
                    buffer = io.BytesIO()
                    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=1, mtime=0) as gz:
                        sink = LineCountingSink(gz)
                        cur.copy_expert(statement, sink)
                        sink.flush()
                    body = buffer.getvalue()
                    if sink.lines:
                        key = store.key_for(category, run_id, "customers", len(batches) + 1, "customers")
                        stored = store.put_verified(key, body, table="customers", rows=sink.lines)
                        objects.append({"key": stored.key, "rows": stored.rows, "bytes": stored.bytes,
                                        "table": "customers"})
                conn.commit()
                if sink.lines:
                    batches.append({"rows": sink.lines, "whole_s": time.perf_counter() - t0})
                if upper is None:
                    break
                lower = upper
            meter.stop()
        finally:
            conn.close()
        deleted = sum(b["rows"] for b in batches)
        result = {"deleted": deleted, **meter.figures, "batch_seconds": [b["whole_s"] for b in batches],
                  "batches": batches, "run_id": run_id, "category": category, "objects": objects, "format": fmt,
                  "id_field": names.index("id")}
        result["archive"] = check_archive(server["endpoint"], result, expired_ids)
        client.close()
        return result


class LineCountingSink(BufferedSink):
    """BufferedSink that counts rows (copy_expert writes one row per call)."""

    def __init__(self, stream):
        super().__init__(stream)
        self.lines = 0

    def write(self, data) -> int:
        self.lines += 1
        return super().write(data)


def checked_onepass(bench, bench_url: URL, args: argparse.Namespace, cutoff: datetime) -> dict:
    """One timed run of the onepass sketch on a fresh copy, checked afterwards."""
    ids = pristine_expired_ids(bench, cutoff)
    log(f"onepass: the sketch, batches of {args.sketch_batch_rows:,} rows")
    result = on_fresh_copy("onepass", bench, lambda: measure_onepass(bench_url, cutoff, args.sketch_batch_rows, ids,
                                                                     args.sketch_format),
                           args.rows, args.expired, cutoff)
    problems = result["problems"] + count_problems(result, args.expired, "rows")
    problems += result["archive"]["problems"]
    result["problems"] = problems
    log(f"onepass: {result['seconds']:.2f} s, {len(result['batches'])} batches" + wrong(problems))
    return result


# -- the pieces, one batch at a time (--profile) -------------------------------------


def profile_pieces(bench_url: URL, cutoff: datetime, rows: int) -> dict:
    """Time each step of an archive batch separately on the first ``rows`` expired rows."""
    from collections import Counter

    from retention.archive.codec import TableShape, canonical_line, encode_rows
    from retention.archive.store import ArchiveStore
    from retention.rules.models import ArchiveSpec

    engine = retention_engine(bench_url)
    table = sa.Table("customers", sa.MetaData(), autoload_with=engine)
    shape = TableShape.of(table)
    out: dict[str, dict] = {}

    def clock(name: str, function, note: str = "", *, timed_inside: bool = False):
        """Best of PROFILE_REPEATS runs (the machine is shared); ``timed_inside``: the
        function times itself and returns (seconds, value)."""
        best, value = float("inf"), None
        for _ in range(PROFILE_REPEATS):
            if timed_inside:
                seconds, value = function()
            else:
                t0 = time.perf_counter()
                value = function()
                seconds = time.perf_counter() - t0
            best = min(best, seconds)
        out[name] = {"seconds": round(best, 4), "us_per_row": round(best / rows * 1e6, 2), "note": note}
        if isinstance(value, bool):
            out[name]["equal"] = value
        log(f"profile: {name:<32} {best:7.3f} s  {best / rows * 1e6:6.2f} µs/row")
        return value

    with engine.connect() as conn:
        bound = conn.execute(sa.select(table.c.closed_at).where(table.c.closed_at < cutoff)
                             .order_by(table.c.closed_at).offset(rows - 1).limit(1)).scalar_one()
    rows = int(scalar(engine, "SELECT count(*) FROM customers WHERE closed_at < :c AND closed_at <= :b",
                      c=cutoff, b=bound))
    selection = sa.and_(table.c.closed_at < cutoff, table.c.closed_at <= bound)

    def sqlalchemy_stream():
        with engine.connect() as conn, conn.begin():
            result = conn.execute(sa.select(table).where(selection).order_by(table.c.closed_at, table.c.id)
                                  .execution_options(stream_results=True, yield_per=5000))
            return list(result)

    fetched = clock("read: SQLAlchemy stream", sqlalchemy_stream, "server-side cursor, yield_per 5000, as the engine")

    def psycopg2_named():
        conn = psycopg2_connect(bench_url)
        try:
            with conn.cursor(name="bench") as cur:
                cur.itersize = 5000
                cur.execute("SELECT * FROM customers WHERE closed_at < %s AND closed_at <= %s "
                            "ORDER BY closed_at, id", (cutoff, bound))
                return sum(1 for _ in cur)
        finally:
            conn.close()

    clock("read: psycopg2 named cursor", psycopg2_named, "plain tuples, no SQLAlchemy Row")
    clock("encode: shape.encode (dict)", lambda: [shape.encode(r) for r in fetched], "codecs, no JSON")
    lines = clock("encode: canonical_line", lambda: [canonical_line(shape, r) for r in fetched],
                  "json.dumps(sort_keys) per row; the engine does this 3x a row")
    counter = clock("digest: blake2b + Counter", lambda: _digest_counter(lines), "of the lines")

    def gzip_lines():
        buffer = io.BytesIO()
        with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=1, mtime=0) as stream:
            for start in range(0, len(lines), 5000):
                stream.write(("\n".join(lines[start:start + 5000]) + "\n").encode("utf-8"))
        return buffer.getvalue()

    body = clock("gzip -1 of the lines", gzip_lines, "join, utf-8, zlib level 1")
    out["gzip -1 of the lines"]["bytes"] = len(body)
    clock("encode_rows (whole)", lambda: encode_rows(shape, fetched, "jsonl.gz"), "canonical_line + gzip")
    try:
        import orjson

        from retention.archive.codec import encode_value

        # TableShape keeps SQLAlchemy's quoted_name (a str subclass); orjson wants plain str keys.
        columns = [(str(name), codec) for name, codec in shape.columns]

        def orjson_lines():
            return [orjson.dumps({name: encode_value(codec, value) for (name, codec), value in zip(columns, r)},
                                 option=orjson.OPT_SORT_KEYS) for r in fetched]

        fast = clock("encode: orjson (sort keys)", orjson_lines, "instead of json.dumps")
        out["encode: orjson (sort keys)"]["same_bytes"] = all(
            a == b.decode("utf-8") for a, b in zip(lines, fast))
    except ImportError:
        out["encode: orjson (sort keys)"] = {"note": "orjson not installed"}

    sorted_columns = ", ".join(sorted(c.name for c in table.columns))
    select_json = (f"SELECT row_to_json(x)::text FROM (SELECT {sorted_columns} FROM customers "
                   "WHERE closed_at < %s AND closed_at <= %s ORDER BY closed_at, id) x")

    def pg_json():
        conn = psycopg2_connect(bench_url)
        try:
            with conn.cursor() as cur:
                cur.execute("SET TIME ZONE 'UTC'")
            with conn.cursor(name="bench_json") as cur:
                cur.itersize = 5000
                cur.execute(select_json, (cutoff, bound))
                return [r[0] for r in cur]
        finally:
            conn.close()

    pg_lines = clock("read+encode: row_to_json in PG", pg_json,
                     "sorted columns, compact: PG makes the canonical line")
    out["read+encode: row_to_json in PG"]["same_bytes"] = pg_lines == lines

    def copy_json():
        conn = psycopg2_connect(bench_url)
        sink = BufferedSink(gzip.GzipFile(fileobj=open(os.devnull, "wb"), mode="wb", compresslevel=1, mtime=0))
        try:
            with conn.cursor() as cur:
                cur.execute("SET TIME ZONE 'UTC'")
                cur.copy_expert(cur.mogrify(f"COPY ({select_json}) TO STDOUT {VERBATIM}", (cutoff, bound)).decode(),
                                sink)
            sink.flush()
            sink.stream.close()
        finally:
            conn.close()

    clock("COPY row_to_json → gzip -1", copy_json, "PG encodes, Python only compresses (to /dev/null)")

    with moto_server() as server:
        client = plain_client(server["endpoint"])
        store = ArchiveStore(ArchiveSpec(connection="aws_default", bucket=BUCKET), client)
        clock("upload: put_verified", lambda: store.put_verified("profile/one.jsonl.gz", body, table="customers",
                                                                rows=rows), f"{len(body):,} bytes, PUT + HEAD")
        client.close()

    # Each DELETE is rolled back and preceded by a CHECKPOINT, so that each one, like a real
    # batch, is the first to change its pages since a checkpoint (full-page images in WAL).
    delete = "DELETE FROM customers WHERE closed_at < %s AND closed_at <= %s RETURNING {}"

    def in_rolled_back_txn(name: str, note: str, work):
        def attempt():
            run_sql(engine, "CHECKPOINT")
            conn = psycopg2_connect(bench_url)
            try:
                with conn.cursor() as cur:
                    cur.execute("SET LOCAL enable_indexscan = off")
                    t0 = time.perf_counter()
                    value = work(cur)
                    seconds = time.perf_counter() - t0
                conn.rollback()
            finally:
                conn.close()
            return seconds, value
        return clock(name, attempt, note, timed_inside=True)

    def sqlalchemy_delete():
        run_sql(engine, "CHECKPOINT")
        with engine.connect() as conn:
            trans = conn.begin()
            conn.execute(sa.text("SET LOCAL enable_indexscan = off"))
            t0 = time.perf_counter()
            returned = conn.execute(sa.delete(table).where(selection).returning(*table.c)).all()
            seconds = time.perf_counter() - t0
            trans.rollback()
        return seconds, returned

    returned = clock("delete: RETURNING * (SQLAlchemy)", sqlalchemy_delete,
                     "as the engine: execute + fetch all (rolled back)", timed_inside=True)
    clock("compare: digest of returned", lambda: _digest_counter([canonical_line(shape, r) for r in returned])
          == counter, "as the engine: canonical_line + blake2b + Counter ==")
    clock("compare: Counter of tuples", lambda: Counter(map(tuple, returned)) == Counter(map(tuple, fetched)),
          "the rows themselves, no JSON (both sides)")
    in_rolled_back_txn("delete: RETURNING md5(json)", "PG digests each row: 16 bytes back, not the row",
                       lambda cur: (cur.execute(delete.format("decode(md5(row_to_json(customers)::text), 'hex')"),
                                                (cutoff, bound)), cur.fetchall())[1])

    versions = clock("read: xmin, ctid", lambda: scalar_rows(
        bench_url, "SELECT xmin::text, ctid::text FROM customers WHERE closed_at < %s AND closed_at <= %s",
        (cutoff, bound)), "row versions instead of contents (PostgreSQL)")
    gone = in_rolled_back_txn("delete: RETURNING xmin, ctid", "what went, as row versions",
                              lambda cur: (cur.execute(delete.format("xmin::text, ctid::text"), (cutoff, bound)),
                                           cur.fetchall())[1])
    clock("compare: xmin, ctid sets", lambda: Counter(gone) == Counter(versions), "Counter ==")

    def copy_delete(query: str, options: str = ""):
        def work(cur):
            sink = BufferedSink(gzip.GzipFile(fileobj=open(os.devnull, "wb"), mode="wb", compresslevel=1, mtime=0))
            cur.execute("SET TIME ZONE 'UTC'")
            cur.copy_expert(cur.mogrify(f"COPY ({query}) TO STDOUT {options}", (cutoff, bound)).decode(), sink)
            sink.flush()
            sink.stream.close()
        return work

    in_rolled_back_txn("raw: COPY(DELETE…*)→gz", "the raw method, on this one batch", copy_delete(delete.format("*")))
    in_rolled_back_txn("one pass: COPY(DELETE…json)→gz", "the delete IS the archive (then upload, then COMMIT)",
                       copy_delete(f"WITH d AS ({delete.format(sorted_columns)}) SELECT row_to_json(d) FROM d",
                                   VERBATIM))
    engine.dispose()
    return {"rows": rows, "pieces": out}


def scalar_rows(url: URL, statement: str, params) -> list[tuple]:
    conn = psycopg2_connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall()
    finally:
        conn.close()


def _digest_counter(lines):
    from collections import Counter

    return Counter(hashlib.blake2b(line.encode("utf-8"), digest_size=16).digest() for line in lines)


def print_profile(pieces: dict) -> None:
    """The --profile figures: microseconds per row of each piece, with its note."""
    print()
    print(f"pieces of one batch of {pieces['rows']:,} rows (µs per row; × 1M rows = seconds per 1M):")
    for name, piece in pieces["pieces"].items():
        if "us_per_row" in piece:
            extra = ""
            if "same_bytes" in piece:
                extra = f" (same bytes as canonical_line: {piece['same_bytes']})"
            if "equal" in piece:
                extra = f" (equal: {piece['equal']})"
            print(f"  {name:<32} {piece['us_per_row']:>7.2f}  {piece['note']}{extra}")
        else:
            print(f"  {name:<32} {'-':>7}  {piece['note']}")
