"""Benchmark: does replica lag stay under the limit while the engine purges a large table?

What it measures
----------------
A PostgreSQL primary with a streaming replica (``pg_basebackup``), and a MariaDB primary with
a binlog replica, are made on this machine (tests/replicas.py: free ports, temporary
directories, torn down at the end). On each primary a narrow table (id, customer_id,
created_at, 96-char text) gets ``--rows`` rows, ``--expired`` of them before the cutoff,
and the replica is let catch up. Then the whole engine (``Runner.run``: plan, purge, certify,
with a SQLite audit database) purges the expired rows with ``max_replica_lag`` =
``--limit`` while a sampler reads the replica's lag every 0.1 s (PostgreSQL: the largest
``replay_lag`` in ``pg_stat_replication``; MariaDB: ``Seconds_Behind_Master``).

Printed per backend: seconds, rows/s, the largest lag sampled, the pauses the certificate
records, and the load average. It exits 1 if a row count is wrong, else 0.

Run::

    /work/main/.venv/bin/python bench/replica_lag.py [--rows 2000000] [--expired 1000000] [--limit 10]
        [--backend pg|mariadb|both]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "plugins"), str(ROOT / "tests")]

from retention.evidence.signing import SIGNING_KEY_ENV, generate_keypair  # noqa: E402
from retention.rules.loader import load_rule_file  # noqa: E402
from retention.run.runner import Runner  # noqa: E402

from replicas import Pair, mariadb_pair, pg_pair  # noqa: E402

AS_OF = datetime(2026, 6, 15, 12, 0, tzinfo=timezone.utc)
CUTOFF = AS_OF - timedelta(days=730)

RULE = """\
category: lag_bench
description: Replica lag bench
owner: bench
legal_basis: Bench
retain_for: P2Y
action: delete
targets:
  - name: events
    kind: sql
    connection: bench_db
    table: events
    key: [id]
    age_column: created_at
    max_fraction: 1.0
    max_replica_lag: {limit}
"""


def _fill_pg(url: str, rows: int, expired: int) -> None:
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text("CREATE TABLE events (id BIGINT PRIMARY KEY, customer_id INT NOT NULL, "
                             "created_at TIMESTAMPTZ NOT NULL, note TEXT)"))
        conn.execute(sa.text(
            "INSERT INTO events SELECT i, i % 1000, CASE WHEN i <= :expired THEN :old - i * interval '1 second' "
            "ELSE :new + i * interval '1 second' END, repeat('x', 96) FROM generate_series(1, :rows) i"),
            {"expired": expired, "rows": rows, "old": CUTOFF - timedelta(days=1), "new": CUTOFF + timedelta(days=1)})
        conn.execute(sa.text("CREATE INDEX events_created_at ON events (created_at)"))
        conn.execute(sa.text("VACUUM ANALYZE events"))
    engine.dispose()


def _fill_mariadb(url: str, rows: int, expired: int) -> None:
    engine = sa.create_engine(url)
    old = (CUTOFF - timedelta(days=1)).replace(tzinfo=None)
    new = (CUTOFF + timedelta(days=1)).replace(tzinfo=None)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE events (id BIGINT PRIMARY KEY, customer_id INT NOT NULL, "
                             "created_at DATETIME(6) NOT NULL, note VARCHAR(100), KEY events_created_at (created_at))"))
    step = 200_000
    for start in range(1, rows + 1, step):
        with engine.begin() as conn:
            conn.execute(sa.text(
                f"INSERT INTO events SELECT seq, seq % 1000, IF(seq <= :expired, :old - INTERVAL seq SECOND, "
                f":new + INTERVAL seq SECOND), REPEAT('x', 96) FROM seq_{start}_to_{min(rows, start + step - 1)}"),
                {"expired": expired, "old": old, "new": new})
    engine.dispose()


class Sampler:
    """Reads the replica's lag every 0.1 s in a thread; keeps the largest."""

    def __init__(self, read):
        self.read = read
        self.worst = 0.0
        self.unknown = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            value = self.read()
            if value is None:
                self.unknown += 1
            else:
                self.worst = max(self.worst, value)
            time.sleep(0.1)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _pg_reader(pair: Pair):
    engine = sa.create_engine(pair.primary.url)

    def read() -> float | None:
        with engine.connect() as conn:
            return float(conn.execute(sa.text(
                "SELECT COALESCE(MAX(EXTRACT(EPOCH FROM replay_lag)), 0) FROM pg_stat_replication")).scalar_one())
    return read


def _mariadb_reader(pair: Pair):
    engine = sa.create_engine(pair.replica.url)

    def read() -> float | None:
        with engine.connect() as conn:
            value = conn.execute(sa.text("SHOW SLAVE STATUS")).mappings().one()["Seconds_Behind_Master"]
        return None if value is None else float(value)
    return read


def _wait_caught_up(read, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while (read() or 0) > 0 or read() is None:
        if time.monotonic() > deadline:
            raise SystemExit("the replica never caught up")
        time.sleep(0.5)


def bench(backend: str, rows: int, expired: int, limit: float, work: Path) -> dict:
    """One backend: make the pair, fill, purge with the sampler on; return the figures."""
    pair_of = pg_pair if backend == "postgresql" else mariadb_pair
    with pair_of() as pair:
        if backend == "postgresql":
            url, read = pair.primary.url, _pg_reader(pair)
            _fill_pg(url, rows, expired)
            os.environ["AIRFLOW_CONN_BENCH_DB"] = pair.primary.uri
        else:
            url, read = pair.primary.url, _mariadb_reader(pair)
            _fill_mariadb(url, rows, expired)
            os.environ["AIRFLOW_CONN_BENCH_DB"] = json.dumps({
                "conn_type": "mysql", "host": "127.0.0.1", "port": pair.primary.port, "login": "lag",
                "password": "lagpw", "schema": "lagtest", "extra": {"replica_conn_ids": ["bench_replica"]}})
            os.environ["AIRFLOW_CONN_BENCH_REPLICA"] = pair.replica.uri
        _wait_caught_up(read)
        os.environ["AIRFLOW_CONN_RETENTION_AUDIT"] = json.dumps(
            {"conn_type": "sqlite", "host": str(work / f"audit-{backend}.db")})
        rules = work / f"rules-{backend}"
        rules.mkdir()
        (rules / "lag_bench.yaml").write_text(RULE.format(limit=limit))
        rule = load_rule_file(rules / "lag_bench.yaml")
        with Sampler(read) as sampler:
            started = time.perf_counter()
            certificate = Runner.from_environment(checkpoints=None).run(rule, run_id="bench", as_of=AS_OF)
            seconds = time.perf_counter() - started
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            left = conn.execute(sa.text("SELECT count(*) FROM events")).scalar_one()
        engine.dispose()
        target = certificate.data["targets"][0]
        return {"backend": backend, "rows": rows, "expired": expired, "limit": limit, "seconds": round(seconds, 2),
                "rows_per_s": round(target["deleted"] / seconds), "max_lag_sampled": sampler.worst,
                "samples_unknown": sampler.unknown, "lag_pauses": target.get("lag_pauses"),
                "status": certificate.status, "left_ok": left == rows - expired,
                "loadavg": os.getloadavg()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--expired", type=int, default=1_000_000)
    parser.add_argument("--limit", type=float, default=10.0)
    parser.add_argument("--backend", choices=["pg", "mariadb", "both"], default="both")
    parser.add_argument("--save", metavar="PATH", help="also write the figures, as JSON, to PATH")
    args = parser.parse_args()
    backends = {"pg": ["postgresql"], "mariadb": ["mariadb"], "both": ["postgresql", "mariadb"]}[args.backend]
    ok = True
    report: dict = {"backends": {}}
    with tempfile.TemporaryDirectory(prefix="lag-bench-") as tmp:
        work = Path(tmp)
        private, _ = generate_keypair(work / "keys")
        os.environ[SIGNING_KEY_ENV] = str(private)
        for backend in backends:
            figures = bench(backend, args.rows, args.expired, args.limit, work)
            print(json.dumps(figures), flush=True)
            report["backends"][backend] = figures
            ok = ok and figures["left_ok"] and figures["status"] == "complete"
    report["correct"] = ok
    if args.save:
        Path(args.save).write_text(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
