"""Shared fixtures: real databases (created and dropped per test), keys, rule files.

PostgreSQL and MariaDB are the servers this machine runs (override with
RETENTION_TEST_PG / RETENTION_TEST_MYSQL, SQLAlchemy URLs of an admin connection).
"""

from __future__ import annotations

import os
import tempfile
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

# Airflow reads its configuration when first imported; give tests a private home.
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="retention-airflow-home-"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
# One Fernet key for this process and the `airflow` subprocesses it starts (sync-pools writes a
# Variable the tests read back); otherwise each generates its own and cannot read the other's.
os.environ.setdefault("AIRFLOW__CORE__FERNET_KEY", __import__("base64").urlsafe_b64encode(os.urandom(32)).decode())
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(Path(__file__).parents[1] / "dags"))

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from retention import failpoints
from retention.evidence.signing import SIGNING_KEY_ENV, generate_keypair

PG_ADMIN = os.environ.get("RETENTION_TEST_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
MYSQL_ADMIN = os.environ.get("RETENTION_TEST_MYSQL", "mysql+pymysql://root@127.0.0.1:3306/test")

BACKENDS = ["postgresql", "mariadb", "sqlite"]


class Database:
    """A throwaway database: its SQLAlchemy URL, an engine, and the Airflow connection URI."""

    def __init__(self, backend: str, url: sa.URL):
        self.backend = backend
        self.url = url
        self.engine = sa.create_engine(url)

    @property
    def airflow_uri(self) -> str:
        """The ``AIRFLOW_CONN_<ID>`` value that reaches this database."""
        if self.backend == "sqlite":
            return '{"conn_type": "sqlite", "host": "%s"}' % self.url.database
        scheme = "postgres" if self.backend == "postgresql" else "mysql"
        auth = self.url.username or ""
        return f"{scheme}://{auth}@{self.url.host}:{self.url.port}/{self.url.database}"

    def execute(self, statement: str, params=None) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.text(statement), params or {})

    def scalar(self, statement: str, params=None):
        with self.engine.connect() as conn:
            return conn.execute(sa.text(statement), params or {}).scalar()

    def rows(self, statement: str, params=None) -> list[tuple]:
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(statement), params or {})]


def _server_database(admin_url: str, backend: str) -> Iterator[Database]:
    name = f"rt_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    database = Database(backend, make_url(admin_url).set(database=name))
    try:
        yield database
    finally:
        database.engine.dispose()
        with admin.connect() as conn:
            if backend == "postgresql":
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            else:
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name}"))
        admin.dispose()


@pytest.fixture
def pg_db() -> Iterator[Database]:
    """A fresh PostgreSQL database."""
    yield from _server_database(PG_ADMIN, "postgresql")


@pytest.fixture
def mysql_db() -> Iterator[Database]:
    """A fresh MariaDB database."""
    yield from _server_database(MYSQL_ADMIN, "mariadb")


@pytest.fixture
def sqlite_db(tmp_path) -> Iterator[Database]:
    """A fresh SQLite file."""
    database = Database("sqlite", sa.URL.create("sqlite", database=str(tmp_path / f"{uuid.uuid4().hex[:8]}.db")))
    yield database
    database.engine.dispose()


@pytest.fixture
def new_database():
    """Make further fresh databases on a server backend within one test."""
    made = []

    def make(backend: str) -> Database:
        generator = _server_database(PG_ADMIN if backend == "postgresql" else MYSQL_ADMIN, backend)
        made.append(generator)
        return next(generator)

    yield make
    for generator in made:
        next(generator, None)  # runs the generator's cleanup


@pytest.fixture(params=BACKENDS)
def db(request) -> Iterator[Database]:
    """A fresh database on each backend in turn."""
    fixture = {"postgresql": "pg_db", "mariadb": "mysql_db", "sqlite": "sqlite_db"}[request.param]
    yield request.getfixturevalue(fixture)


@pytest.fixture
def keys(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A fresh signing key pair; RETENTION_SIGNING_KEY points at the private key."""
    private, public = generate_keypair(tmp_path / "keys")
    monkeypatch.setenv(SIGNING_KEY_ENV, str(private))
    return private, public


@pytest.fixture
def audit_db(tmp_path, monkeypatch) -> Iterator[Database]:
    """An audit database (its own SQLite file) reachable as connection retention_audit."""
    database = Database("sqlite", sa.URL.create("sqlite", database=str(tmp_path / "audit.db")))
    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_AUDIT", database.airflow_uri)
    yield database
    database.engine.dispose()


@pytest.fixture(autouse=True)
def _no_failpoints(monkeypatch):
    monkeypatch.delenv("RETENTION_FAILPOINTS", raising=False)
    failpoints.reset()
    yield
    failpoints.reset()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """A moto S3 server in a thread (for other processes: the CLI, Airflow tasks); its URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{server._server.server_port}"
    server.stop()


@pytest.fixture
def aws_server(moto_server, monkeypatch):
    """A boto3 client on the moto server, reachable as Airflow connection aws_default."""
    import json

    import boto3

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    monkeypatch.setenv(
        "AIRFLOW_CONN_AWS_DEFAULT",
        json.dumps({"conn_type": "aws", "login": "testing", "password": "testing",
                    "extra": {"region_name": "us-east-1", "endpoint_url": moto_server}}),
    )
    return boto3.client("s3", region_name="us-east-1", endpoint_url=moto_server,
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def connect(monkeypatch, conn_id: str, database: Database) -> None:
    """Make ``conn_id`` resolve to ``database`` the way Airflow would, via its env var."""
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", database.airflow_uri)


RULE_TEMPLATE = """\
category: {category}
description: Test rule for {category}
owner: test-team
legal_basis: Tests
retain_for: {retain_for}
schedule: "@daily"
action: delete
targets:
{targets}
"""

TARGET_TEMPLATE = """\
  - name: {name}
    kind: sql
    connection: {connection}
    table: {table}
    key: {key}
    age_column: {age_column}
"""
"""Test tables are small and often mostly expired; tests about the blast-radius limit set
``max_fraction`` themselves (the default of 0.5 would stop most fixtures)."""


def write_rule(
    directory: Path,
    category: str = "customer_accounts",
    *,
    retain_for: str = "P2Y",
    targets: list[dict] | None = None,
    text: str | None = None,
    filename: str | None = None,
) -> Path:
    """Write a rule file into ``directory``; ``text`` overrides the template entirely."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / (filename or f"{category}.yaml")
    if text is None:
        blocks = []
        for target in targets or [{}]:
            spec = {"name": "customers", "connection": "crm_db", "table": "customers",
                    "key": "[id]", "age_column": "closed_at", "max_fraction": 1.0, **target}
            extra = {k: v for k, v in spec.items() if k not in ("name", "connection", "table", "key", "age_column")}
            block = TARGET_TEMPLATE.format(**spec)
            for key, value in extra.items():
                block += f"    {key}: {value}\n"
            blocks.append(block)
        text = RULE_TEMPLATE.format(category=category, retain_for=retain_for, targets="".join(blocks))
    path.write_text(textwrap.dedent(text))
    return path
