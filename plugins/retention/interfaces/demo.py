"""``make demo``: a nightly purge of a small retail estate, end to end, on one machine.

Seeds SQLite databases for each connection the example rules name, points Airflow
(a SQLite metadata database under ``.demo/airflow``) and the engine at them through
``AIRFLOW_CONN_<ID>`` variables, shows the plan, runs every rule's DAG with
``airflow dags test``, then lists and verifies the certificates. Everything lives in
``.demo/`` (``make demo-clean`` removes it); keys and the audit chain persist between
demos, so the chain grows run after run and keeps verifying.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import secrets
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retention.evidence.checkpoints import CHECKPOINTS_ENV
from retention.evidence.signing import SIGNING_KEY_ENV, generate_keypair
from retention.rules.loader import load_rules
from retention.targets.sql.anonymize import HASH_KEY_ENV

if TYPE_CHECKING:
    from moto.server import ThreadedMotoServer

ROOT = Path(__file__).resolve().parents[3]

# table DDL and a row factory per demo connection; ages span four years back from now.
SCHEMAS = {
    "crm_db": """
        CREATE TABLE customers (
            id INTEGER PRIMARY KEY, email TEXT NOT NULL, full_name TEXT, status TEXT NOT NULL,
            created_at TIMESTAMP NOT NULL, closed_at TIMESTAMP
        );
        CREATE INDEX customers_closed_at ON customers (closed_at);
    """,
    "web_db": """
        CREATE TABLE sessions (
            session_id TEXT PRIMARY KEY, customer_id INTEGER, user_agent TEXT,
            ip_address TEXT, last_seen_at TIMESTAMP NOT NULL
        );
        CREATE INDEX sessions_last_seen_at ON sessions (last_seen_at);
    """,
    "support_db": """
        CREATE TABLE tickets (
            id INTEGER PRIMARY KEY, customer_id INTEGER, subject TEXT, status TEXT NOT NULL,
            opened_at TIMESTAMP NOT NULL, resolved_at TIMESTAMP
        );
        CREATE INDEX tickets_resolved_at ON tickets (resolved_at);
    """,
    "shop_db": """
        CREATE TABLE carts (
            id INTEGER PRIMARY KEY, customer_id INTEGER, status TEXT NOT NULL,
            items INTEGER NOT NULL, updated_at TIMESTAMP NOT NULL
        );
        CREATE INDEX carts_updated_at ON carts (updated_at);
        CREATE TABLE orders (
            id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL, email TEXT NOT NULL,
            total NUMERIC(10, 2) NOT NULL, placed_at TIMESTAMP NOT NULL
        );
        CREATE INDEX orders_placed_at ON orders (placed_at);
        CREATE TABLE order_items (
            id INTEGER PRIMARY KEY, order_id INTEGER NOT NULL REFERENCES orders (id),
            sku TEXT NOT NULL, qty INTEGER NOT NULL, price NUMERIC(10, 2) NOT NULL
        );
        CREATE INDEX order_items_order_id ON order_items (order_id);
    """,
    "billing_db": """
        CREATE TABLE invoices (
            id INTEGER PRIMARY KEY, email VARCHAR(255) NOT NULL, billing_name TEXT, phone TEXT,
            postcode TEXT, amount NUMERIC(10, 2) NOT NULL, issued_at TIMESTAMP NOT NULL,
            anonymized_at TIMESTAMP
        );
        CREATE INDEX invoices_issued_at ON invoices (issued_at);
    """,
    "marketing_db": """
        CREATE TABLE cart_reminder_emails (
            id INTEGER PRIMARY KEY, cart_id INTEGER, email TEXT NOT NULL, sent_at TIMESTAMP NOT NULL
        );
        CREATE INDEX cart_reminder_emails_sent_at ON cart_reminder_emails (sent_at);
    """,
}


def seed(directory: Path, now: datetime, *, scale: int = 1, seed_value: int = 7) -> dict[str, Path]:
    """Create one fresh SQLite database per demo connection; return their paths."""
    rng = random.Random(seed_value)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for conn_id, ddl in SCHEMAS.items():
        path = directory / f"{conn_id.removesuffix('_db')}.db"
        path.unlink(missing_ok=True)
        with sqlite3.connect(path) as db:
            db.executescript(ddl)
            _fill(db, conn_id, rng, now, scale)
        paths[conn_id] = path
    return paths


def _ago(rng: random.Random, now: datetime, max_days: float) -> str:
    moment = now - timedelta(days=rng.uniform(0, max_days))
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _fill(db: sqlite3.Connection, conn_id: str, rng: random.Random, now: datetime, scale: int) -> None:
    rows: list[tuple[Any, ...]]
    if conn_id == "crm_db":
        rows = []
        for i in range(1, 20_000 * scale + 1):
            status = rng.choices(["active", "closed"], [3, 1])[0]
            created = _ago(rng, now, 3 * 365)
            closed = _ago(rng, now, 4 * 365) if status == "closed" else None
            rows.append((i, f"customer{i}@example.com", f"Customer {i}", status, created, closed))
        db.executemany("INSERT INTO customers VALUES (?, ?, ?, ?, ?, ?)", rows)
    elif conn_id == "web_db":
        rows = [
            (f"s{i:08x}", rng.randint(1, 20_000), "Mozilla/5.0", f"10.0.{i % 256}.{i % 200}", _ago(rng, now, 365))
            for i in range(50_000 * scale)
        ]
        db.executemany("INSERT INTO sessions VALUES (?, ?, ?, ?, ?)", rows)
    elif conn_id == "support_db":
        rows = []
        for i in range(1, 5_000 * scale + 1):
            status = rng.choices(["open", "resolved", "closed"], [1, 3, 2])[0]
            opened = _ago(rng, now, 5 * 365)
            resolved = _ago(rng, now, 5 * 365) if status != "open" else None
            rows.append((i, rng.randint(1, 20_000), f"Ticket {i}", status, opened, resolved))
        db.executemany("INSERT INTO tickets VALUES (?, ?, ?, ?, ?, ?)", rows)
    elif conn_id == "shop_db":
        rows = [
            (i, rng.randint(1, 20_000), rng.choices(["open", "abandoned", "expired", "ordered"], [2, 4, 1, 3])[0],
             rng.randint(1, 9), _ago(rng, now, 120))
            for i in range(1, 10_000 * scale + 1)
        ]
        db.executemany("INSERT INTO carts VALUES (?, ?, ?, ?, ?)", rows)
        orders, items = [], []
        for i in range(1, 6_000 * scale + 1):
            orders.append((i, rng.randint(1, 20_000), f"customer{i % 20_000}@example.com",
                           round(rng.uniform(5, 400), 2), _ago(rng, now, 12 * 365)))
            items += [(i * 10 + j, i, f"SKU-{rng.randint(100, 999)}", rng.randint(1, 3), round(rng.uniform(1, 99), 2))
                      for j in range(rng.randint(1, 4))]
        db.executemany("INSERT INTO orders VALUES (?, ?, ?, ?, ?)", orders)
        db.executemany("INSERT INTO order_items VALUES (?, ?, ?, ?, ?)", items)
    elif conn_id == "billing_db":
        rows = [
            (i, f"customer{rng.randint(1, 20_000)}@example.com", f"Customer {i}", f"+44 7700 9{i:05d}",
             rng.choice(["SW1A 1AA", "EC2V 7HH", "M1 1AE", "G2 8DL"]), round(rng.uniform(5, 900), 2),
             _ago(rng, now, 6 * 365), None)
            for i in range(1, 8_000 * scale + 1)
        ]
        db.executemany("INSERT INTO invoices VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
    elif conn_id == "marketing_db":
        rows = [
            (i, rng.randint(1, 10_000), f"customer{rng.randint(1, 20_000)}@example.com", _ago(rng, now, 120))
            for i in range(1, 8_000 * scale + 1)
        ]
        db.executemany("INSERT INTO cart_reminder_emails VALUES (?, ?, ?, ?)", rows)


RECEIPTS_BUCKET = "retail-receipts"
ARCHIVE_BUCKET = "retention-archive"


def start_s3() -> tuple[ThreadedMotoServer, str]:
    """An embedded S3 (moto) on a free local port; returns the server and its URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    assert server._server is not None  # start() made it
    return server, f"http://127.0.0.1:{server._server.server_port}"


def seed_receipts(endpoint: str, now: datetime, *, count: int = 1200, seed_value: int = 7) -> int:
    """Receipts over ten years in a versioned, Object-Lock-enabled bucket; returns objects put.

    A few receipts were reissued (two versions), three are in a dispute (legal hold), and
    a README carries no date in its key.
    """
    from concurrent.futures import ThreadPoolExecutor

    import boto3

    rng = random.Random(seed_value)
    s3 = boto3.client("s3", region_name="us-east-1", endpoint_url=endpoint,
                      aws_access_key_id="demo", aws_secret_access_key="demo")
    s3.create_bucket(Bucket=RECEIPTS_BUCKET, ObjectLockEnabledForBucket=True)
    s3.create_bucket(Bucket=ARCHIVE_BUCKET)
    puts = []
    for i in range(count):
        day = now - timedelta(days=rng.uniform(0, 10 * 365))
        key = f"receipts/{day:%Y/%m/%d}/{i:06d}.json"
        body = json.dumps({"receipt": i, "total": round(rng.uniform(3, 300), 2)}).encode()
        extra = {"Tagging": "category=receipt"}
        if i % 400 == 7:  # an old receipt in a chargeback dispute: expired, but on legal hold
            day = now - timedelta(days=8.5 * 365)
            key = f"receipts/{day:%Y/%m/%d}/{i:06d}.json"
            extra["ObjectLockLegalHoldStatus"] = "ON"
        puts.append((key, body, extra))
        if i % 100 == 3:
            puts.append((key, body + b" ", extra))  # reissued: a second version
    puts.append(("receipts/README.txt", b"Receipts by purchase date.", {}))

    def put(item):
        key, body, extra = item
        s3.put_object(Bucket=RECEIPTS_BUCKET, Key=key, Body=body, **extra)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, puts))
    return len(puts)


def environment(demo: Path, databases: dict[str, Path], s3_endpoint: str) -> dict[str, str]:
    """The variables Airflow and the CLI need, pointing everything into ``demo``."""
    env = dict(os.environ)
    env.update({
        "AIRFLOW_HOME": str(demo / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        "RETENTION_RULES_DIR": str(ROOT / "retention_rules"),
        SIGNING_KEY_ENV: str(demo / "keys" / "retention-signing.pem"),
        CHECKPOINTS_ENV: str(demo / "checkpoints"),  # in production: a bucket with Object Lock
        HASH_KEY_ENV: (demo / "keys" / "hash.key").read_text().strip(),
        "AIRFLOW_CONN_RETENTION_AUDIT": f'{{"conn_type": "sqlite", "host": "{demo / "audit.db"}"}}',
        "AIRFLOW_CONN_AWS_DEFAULT": json.dumps({
            "conn_type": "aws", "login": "demo", "password": "demo",
            "extra": {"region_name": "us-east-1", "endpoint_url": s3_endpoint},
        }),
    })
    for conn_id, path in databases.items():
        env[f"AIRFLOW_CONN_{conn_id.upper()}"] = f'{{"conn_type": "sqlite", "host": "{path}"}}'
    return env


def main(argv: list[str] | None = None) -> int:
    """Seed, plan, run every DAG, list and verify certificates."""
    parser = argparse.ArgumentParser(prog="python -m retention.interfaces.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path(os.environ.get("RETENTION_DEMO_DIR", ROOT / ".demo")))
    parser.add_argument("--scale", type=int, default=1, help="multiply the seeded rows")
    args = parser.parse_args(argv)
    demo: Path = args.dir.resolve()
    now = datetime.now(timezone.utc)
    bin_dir = Path(sys.executable).parent

    _step("Keys")
    private_key = demo / "keys" / "retention-signing.pem"
    if not private_key.exists():
        generate_keypair(demo / "keys")
        print(f"  created {private_key} and its .pub.pem")
    else:
        print(f"  using {private_key}")
    hash_key = demo / "keys" / "hash.key"
    if not hash_key.exists():
        hash_key.write_text(secrets.token_hex(32) + "\n")
        hash_key.chmod(0o600)
        print(f"  created {hash_key} (the HMAC key anonymize hashes with)")

    _step("Seeding a demo retail estate (SQLite databases and an S3 bucket)")
    databases = seed(demo / "data", now, scale=args.scale)
    for conn_id, path in databases.items():
        print(f"  {conn_id:<13} {path}")
    server, endpoint = start_s3()
    try:
        objects = seed_receipts(endpoint, now)
        print(f"  {'aws_default':<13} {endpoint} (embedded moto S3): {objects:,} receipt objects in "
              f"s3://{RECEIPTS_BUCKET}, archives go to s3://{ARCHIVE_BUCKET}")
        return _run_demo(demo, environment(demo, databases, endpoint), bin_dir)
    finally:
        server.stop()


def _run_demo(demo: Path, env: dict[str, str], bin_dir: Path) -> int:
    rules = load_rules(ROOT / "retention_rules")

    _step("Plan: what tonight's run will purge")
    _run([bin_dir / "retention", "plan"], env)

    _step("Airflow metadata database")
    started = time.monotonic()
    _run([bin_dir / "airflow", "db", "migrate"], env, quiet=True, log=demo / "logs" / "db-migrate.log")
    # As a deployment's init step does: a pool per connection (and the record the plan checks).
    if not _run([bin_dir / "retention", "airflow", "sync-pools"], env, quiet=True, log=demo / "logs" / "sync-pools.log"):
        print(f"  sync-pools failed: see {demo / 'logs' / 'sync-pools.log'}", file=sys.stderr)
        return 1
    print(f"  ready, pools synced ({time.monotonic() - started:.0f} s)")

    _step("Nightly run: `airflow dags test` for each rule's DAG")
    failed = []
    for rule_file in rules:
        dag_id = f"retention__{rule_file.rule.category}"
        log = demo / "logs" / f"{dag_id}.log"
        started = time.monotonic()
        # `airflow dags test` exits non-zero when the DAG run fails.
        ok = _run([bin_dir / "airflow", "dags", "test", dag_id], env, quiet=True, log=log)
        state = "success" if ok else "FAILED"
        if not ok:
            failed.append(dag_id)
        print(f"  {dag_id:<32} {state:<8} {time.monotonic() - started:5.1f} s   log: {log}")

    _step("Certificates")
    _run([bin_dir / "retention", "certificates", "--limit", "12"], env)

    _step("Verification (anyone with the public key and the checkpoints can do this)")
    verified = _run(
        [bin_dir / "retention", "verify", "--public-key", demo / "keys" / "retention-signing.pub.pem",
         "--checkpoint", demo / "checkpoints"], env
    )
    erased = _erasure_demo(demo, env, bin_dir)

    _step("Retention status: how far behind is each target now?")
    _run([bin_dir / "retention", "status"], env)

    if failed or not verified or not erased:
        print(f"\nDemo finished with failures: {', '.join(failed) or 'verification'}", file=sys.stderr)
        return 1
    print("\nDone. Run it again: new data is seeded, and the certificate chain grows and still verifies.")
    print(explore_text(demo, write_env_file(demo, env)))
    return 0


def _erasure_demo(demo: Path, env: dict[str, str], bin_dir: Path) -> bool:
    """Two customers ask to be forgotten; one has an order under a legal hold. Their receipts verify."""
    from retention.interfaces.erasure_demo import erasure_steps

    _step("Erasure requests (GDPR Art. 17): two customers ask to be forgotten, one order is on legal hold")
    return all(_run([bin_dir / "retention", *command], env) for command in erasure_steps(demo, env))


def _step(title: str) -> None:
    print(f"\n== {title}")


def _run(command: list, env: dict[str, str], *, quiet: bool = False, log: Path | None = None) -> bool:
    command = [str(c) for c in command]
    if quiet:
        assert log is not None
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as handle:
            result = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT, check=False)
    else:
        result = subprocess.run(command, env=env, check=False)
    return result.returncode == 0


ENV_FILE_NAMES = ("AIRFLOW_HOME", "RETENTION_RULES_DIR", SIGNING_KEY_ENV, CHECKPOINTS_ENV,
                  "AIRFLOW_CONN_RETENTION_AUDIT")
"""What ``.demo/env`` exports besides the demo's database connections (no secret values)."""


def write_env_file(demo: Path, env: dict[str, str]) -> Path:
    """Write ``demo/env``: ``source`` it and the CLI reaches the demo's databases, keys and audit log.

    Paths and JSON are shell-quoted. The HMAC key is read from its file when sourced, not
    copied into this one. The demo's S3 (moto, in memory) ended with the demo, so
    ``aws_default`` is left out: commands that need S3 say the connection is missing
    rather than hang on a dead port.
    """
    import shlex

    names = [*ENV_FILE_NAMES, *sorted(n for n in env if n.startswith("AIRFLOW_CONN_")
                                       and n not in ENV_FILE_NAMES and n != "AIRFLOW_CONN_AWS_DEFAULT")]
    lines = ["# made by make demo: `source .demo/env` points the retention CLI at the demo's data.",
             "# The demo's S3 (an in-memory moto server) ended with it: no aws_default here."]
    lines += [f"export {name}={shlex.quote(env[name])}" for name in names if name in env]
    lines.append(f"export {HASH_KEY_ENV}=\"$(cat {shlex.quote(str(demo / 'keys' / 'hash.key'))})\"")
    path = demo / "env"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def explore_text(demo: Path, env_file: Path) -> str:
    """How to look at what the demo made (printed at its end)."""
    public_key = demo / "keys" / "retention-signing.pub.pem"
    return (
        "\nExplore what it made:\n"
        f"  source {env_file}\n"
        "  retention certificates                   # the signed purge certificates\n"
        f"  retention verify --public-key {public_key} --checkpoint {demo / 'checkpoints'}\n"
        "  retention status                         # per target: last run and how far behind\n"
        "  retention hold list --all                # legal holds\n"
        f"  sqlite3 {demo / 'audit.db'}              # the audit database itself\n"
        f"  logs of each DAG run: {demo / 'logs'}/"
    )


if __name__ == "__main__":
    sys.exit(main())
