"""The audit database: the run journal and the append-only certificate chain.

Tables live in the database of connection ``retention_audit`` (or the one configured).
``purge_certificates`` refuses UPDATE, DELETE and TRUNCATE through triggers that fire
even under ``session_replication_role = replica`` (PostgreSQL ``ENABLE ALWAYS``). That
stops accidents and casual edits; a superuser can still drop a trigger, which is why
trust rests on signatures and the hash chain (:mod:`retention.evidence.chain`), not on
the database.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    bindparam,
    inspect,
    text,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.types import TypeDecorator

from retention import retry
from retention.connections import ConnectionResolver, create_sql_engine
from retention.errors import ConfigError

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect, Engine
    from sqlalchemy.types import TypeEngine

log = logging.getLogger(__name__)

DEFAULT_AUDIT_CONNECTION = "retention_audit"

metadata = MetaData()


class _MySQLVariant(TypeDecorator[Any]):
    """A generic type that is a MySQL-specific one on MariaDB/MySQL, imported only there:
    ``sqlalchemy.dialects.mysql`` costs a PostgreSQL or SQLite command ~40 ms of start-up."""

    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "mysql":
            from sqlalchemy.dialects import mysql

            return dialect.type_descriptor(self.on_mysql(mysql))
        return self.impl_instance

    def on_mysql(self, mysql: Any) -> TypeEngine[Any]:
        """The type on MariaDB/MySQL, from the ``sqlalchemy.dialects.mysql`` module given."""
        raise NotImplementedError


class _Timestamp(_MySQLVariant):
    """A timestamp with its zone; on MariaDB/MySQL ``DATETIME(6)`` (microseconds kept)."""

    cache_ok = True  # read from each class's own __dict__, not inherited: without it every query warns on stderr
    impl = DateTime(timezone=True)

    def on_mysql(self, mysql: Any) -> TypeEngine[Any]:
        return mysql.DATETIME(fsp=6)


class _LongText(_MySQLVariant):
    """Text; on MariaDB/MySQL ``LONGTEXT`` (``TEXT`` holds only 64 KiB)."""

    cache_ok = True
    impl = Text

    def on_mysql(self, mysql: Any) -> TypeEngine[Any]:
        return mysql.LONGTEXT()


purge_runs = Table(
    "purge_runs",
    metadata,
    Column("category", String(63), nullable=False),
    Column("run_id", String(250), nullable=False),
    Column("rule_path", String(500), nullable=False),
    Column("rule_sha256", String(64), nullable=False),
    Column("code_version", String(100), nullable=False),
    Column("action", String(20), nullable=False),
    Column("as_of", String(40), nullable=False, comment="ISO 8601 UTC, fixed for the run"),
    Column("cutoff", String(40), nullable=False, comment="ISO 8601 UTC"),
    Column("started_at", String(40), nullable=False),
    Column("state", String(20), nullable=False, comment="running | certified"),
    Column("certificate_seq", BigInteger, nullable=True),
    Column("approval", Text, nullable=True, comment="why a run over its blast-radius limit was allowed"),
    Column("scrubbed_at", String(40), nullable=True, comment="when its batch bounds (record keys) were forgotten"),
    PrimaryKeyConstraint("category", "run_id"),
)

purge_targets = Table(
    "purge_targets",
    metadata,
    Column("category", String(63), nullable=False),
    Column("run_id", String(250), nullable=False),
    Column("target", String(63), nullable=False),
    Column("position", Integer, nullable=False),
    Column("kind", String(20), nullable=False),
    Column("location", String(500), nullable=False),
    Column("definition", Text, nullable=False, comment="the target's rule, as JSON, for recovery"),
    Column("state", String(20), nullable=False, comment="planned | running | complete | failed"),
    Column("matched", BigInteger, nullable=True),
    Column("total", BigInteger, nullable=True, comment="records the target held at plan (max_fraction is of these)"),
    Column("remaining", BigInteger, nullable=True),
    Column("held", BigInteger, nullable=True, comment="records skipped because something protects them"),
    Column("holds", Text, nullable=True, comment="ids of the legal holds honoured, JSON"),
    Column("error", String(500), nullable=True, comment="error class and code; never data"),
    Column("started_at", String(40), nullable=True),
    Column("finished_at", String(40), nullable=True),
    PrimaryKeyConstraint("category", "run_id", "target"),
)

purge_batches = Table(
    "purge_batches",
    metadata,
    Column("category", String(63), nullable=False),
    Column("run_id", String(250), nullable=False),
    Column("target", String(63), nullable=False),
    Column("batch_no", Integer, nullable=False),
    Column("state", String(10), nullable=False, comment="pending | done | void"),
    Column("bounds", Text, nullable=False, comment="what the batch covers (target-specific JSON), to settle it"),
    Column("rows_planned", BigInteger, nullable=False),
    Column("rows_done", BigInteger, nullable=True),
    Column("bytes_done", BigInteger, nullable=True),
    Column("tables_done", Text, nullable=True, comment="rows per table (parent and children), JSON"),
    Column("recorded_at", String(40), nullable=False),
    PrimaryKeyConstraint("category", "run_id", "target", "batch_no"),
)

purge_certificates = Table(
    "purge_certificates",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("category", String(63), nullable=False),
    Column("run_id", String(250), nullable=False),
    Column("status", String(20), nullable=False),
    Column("issued_at", _Timestamp, nullable=False),
    Column("payload", _LongText, nullable=False, comment="the exact signed bytes: RFC 8785 JSON"),
    Column("signature", String(200), nullable=False, comment="Ed25519, base64"),
    Column("key_id", String(64), nullable=False, comment="SHA-256 of the raw public key"),
    Column("prev_hash", String(64), nullable=False),
    Column("entry_hash", String(64), nullable=False),
    UniqueConstraint("prev_hash", name="purge_certificates_prev_hash_key"),
    UniqueConstraint("entry_hash", name="purge_certificates_entry_hash_key"),
    UniqueConstraint("category", "run_id", name="purge_certificates_run_key"),
)

legal_holds = Table(
    "legal_holds",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("category", String(63), nullable=False),
    Column("target", String(63), nullable=True, comment="null: every target of the category"),
    Column("match", Text, nullable=True, comment="JSON column: value map (SQL targets)"),
    Column("prefix", String(1024), nullable=True, comment="key prefix (S3 targets)"),
    Column("case_id", String(100), nullable=False),
    Column("reason", Text, nullable=False),
    Column("until", String(10), nullable=True, comment="ISO date; the hold lapses after it"),
    Column("placed_at", String(40), nullable=False),
    Column("placed_by", String(100), nullable=False),
    Column("released_at", String(40), nullable=True),
    Column("released_by", String(100), nullable=True),
    Column("release_reason", Text, nullable=True),
)

legal_hold_events = Table(
    "legal_hold_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("hold_id", Integer, nullable=False),
    Column("event", String(20), nullable=False, comment="placed | released"),
    Column("at", String(40), nullable=False),
    Column("by", String(100), nullable=False),
    Column("detail", Text, nullable=False, comment="the hold or the release reason, as JSON"),
)

erasure_requests = Table(
    "erasure_requests",
    metadata,
    Column("request_id", String(100), primary_key=True),
    Column("subject_type", String(63), nullable=False, comment="the identity type the request named"),
    Column("subject_hmac", String(64), nullable=False, comment="HMAC-SHA256 of type=value; never the value"),
    Column("identities", Text, nullable=False, comment="JSON [[type, hmac], ...]: the subject and what it resolved to"),
    Column("key_id", String(16), nullable=False, comment="fingerprint of the hash key the HMACs were made with"),
    Column("reason", String(200), nullable=False),
    Column("received_at", String(40), nullable=False),
    Column("due", String(10), nullable=False, comment="ISO date the answer is due"),
    Column("filed_by", String(100), nullable=False),
    Column("state", String(20), nullable=False, comment="pending | in_progress | done | partial | denied"),
    Column("updated_at", String(40), nullable=False),
    Column("certificate_seq", BigInteger, nullable=True),
)

erasure_request_events = Table(
    "erasure_request_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(100), nullable=False),
    Column("event", String(20), nullable=False, comment="the state entered"),
    Column("at", String(40), nullable=False),
    Column("by", String(100), nullable=False),
    Column("detail", Text, nullable=False, comment="JSON; HMACs and counts only, never an identity"),
)

erasure_steps = Table(
    "erasure_steps",
    metadata,
    Column("request_id", String(100), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("step", String(130), nullable=False, comment="category/target"),
    Column("state", String(10), nullable=False, comment="pending | done"),
    Column("outcome", Text, nullable=False, comment="what the target did or will do, JSON; counts, never values"),
    Column("recorded_at", String(40), nullable=False),
    PrimaryKeyConstraint("request_id", "attempt", "step"),
)

run_locks = Table(
    "run_locks",
    metadata,
    Column("category", String(63), primary_key=True),
    Column("run_id", String(250), nullable=False),
    Column("holder", String(200), nullable=False, comment="host and pid of the worker"),
    Column("acquired_at", String(40), nullable=False),
    Column("heartbeat_at", String(40), nullable=False),
)

# What may never happen to each audit table: certificates and the two histories (hold
# events, erasure request events) are never changed or deleted; holds and erasure requests
# move on (released, answered) but are never deleted; certificates are never truncated.
# (table, trigger name suffix, operations, PostgreSQL trigger level)
_GUARDS = [
    ("purge_certificates", "no_change", ("UPDATE", "DELETE"), "ROW"),
    ("purge_certificates", "no_truncate", ("TRUNCATE",), "STATEMENT"),
    ("legal_hold_events", "no_change", ("UPDATE", "DELETE"), "ROW"),
    ("legal_holds", "no_delete", ("DELETE",), "ROW"),
    ("erasure_request_events", "no_change", ("UPDATE", "DELETE"), "ROW"),
    ("erasure_requests", "no_delete", ("DELETE",), "ROW"),
]

_PG_APPEND_ONLY = [
    """
    CREATE OR REPLACE FUNCTION purge_certificates_append_only() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION '% is append-only: % is not allowed', TG_TABLE_NAME, TG_OP
            USING ERRCODE = 'insufficient_privilege';
    END
    $$
    """,
    *(f"""
    CREATE OR REPLACE TRIGGER {table}_{name}
        BEFORE {" OR ".join(ops)} ON {table}
        FOR EACH {level} EXECUTE FUNCTION purge_certificates_append_only()
    """ for table, name, ops, level in _GUARDS),
    # ALWAYS: they fire even under session_replication_role = replica.
    *(f"ALTER TABLE {table} ENABLE ALWAYS TRIGGER {table}_{name}" for table, name, _, _ in _GUARDS),
]

# MariaDB/MySQL and SQLite have no TRUNCATE triggers.
_APPEND_ONLY = [(table, op) for table, _, ops, _ in _GUARDS for op in ops if op != "TRUNCATE"]

_MYSQL_APPEND_ONLY = [
    f"""
    CREATE TRIGGER IF NOT EXISTS {table}_no_{op.lower()}
        BEFORE {op} ON {table} FOR EACH ROW
        SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = '{table} is append-only: {op} is not allowed'
    """
    for table, op in _APPEND_ONLY
]

_SQLITE_APPEND_ONLY = [
    f"""
    CREATE TRIGGER IF NOT EXISTS {table}_no_{op.lower()}
        BEFORE {op} ON {table}
        BEGIN SELECT RAISE(ABORT, '{table} is append-only: {op} is not allowed'); END
    """
    for table, op in _APPEND_ONLY
]

# Any constant will do; it only has to be the same for every writer of the chain.
CHAIN_LOCK_KEY = 0x7265746E  # "retn"


def ensure_schema(engine: Engine, *, attempts: int = 5) -> None:
    """Create the audit tables and the append-only triggers if they are missing.

    Two workers starting at once on a new audit database may both try to create a table:
    PostgreSQL serializes them with a lock; elsewhere the loser's CREATE fails with
    "already exists" and it looks again (what is there is then skipped).
    """
    def raced(exc: BaseException) -> bool:
        return isinstance(exc, DBAPIError) and "already exists" in str(exc.orig).lower()

    # The same backoff as before (0.1s, 0.2s, ...), through the one retry policy.
    delays = tuple(0.05 * 2**attempt for attempt in range(1, attempts))
    for attempt in retry.attempts(raced, delays=delays, what="audit schema was being created by another worker"):
        with attempt:
            _create_schema(engine)

def _create_schema(engine: Engine) -> None:
    dialect = engine.dialect.name
    with engine.begin() as conn:
        if dialect == "postgresql":
            # Two workers starting at once must not race on CREATE.
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": CHAIN_LOCK_KEY})
        if not _columns_in_place(conn):  # one query on a database that is up to date
            metadata.create_all(conn, checkfirst=True)
            _add_missing_columns(conn)
        if dialect == "postgresql" and _pg_triggers_in_place(conn):
            # Redefining them needs the table owner; a runtime role that may only append
            # certificates (docker-compose.yml's retention_app) finds them already there.
            return
        statements = {
            "postgresql": _PG_APPEND_ONLY,
            "mysql": _MYSQL_APPEND_ONLY,
            "sqlite": _SQLITE_APPEND_ONLY,
        }.get(dialect, [])
        for statement in statements:
            conn.execute(text(statement))


_PG_TRIGGERS = {(table, f"{table}_{name}") for table, name, _, _ in _GUARDS}


def _pg_triggers_in_place(conn) -> bool:
    """Every append-only trigger exists, fires ALWAYS and calls the refusing function."""
    rows = conn.execute(text(
        "SELECT c.relname, t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
        "JOIN pg_proc p ON p.oid = t.tgfoid "
        "WHERE c.relnamespace = current_schema()::regnamespace AND t.tgenabled = 'A' "
        "AND p.proname = 'purge_certificates_append_only'"
    ))
    return _PG_TRIGGERS <= {(r[0], r[1]) for r in rows}


def _columns_in_place(conn) -> bool:
    """Every audit table has every column this version writes (read in one query; SQLite: never known)."""
    schema = {"postgresql": "current_schema()", "mysql": "DATABASE()"}.get(conn.dialect.name)
    if schema is None:
        return False
    wanted = {(table.name, column.name) for table in metadata.sorted_tables for column in table.columns}
    rows = conn.execute(text(
        f"SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = {schema} "
        "AND table_name IN :tables").bindparams(bindparam("tables", expanding=True)),
        {"tables": sorted({name for name, _ in wanted})})
    return wanted <= {(str(r[0]), str(r[1])) for r in rows}


def _add_missing_columns(conn) -> None:
    """Additive schema changes: columns added in later versions, as nullable columns."""
    from sqlalchemy import inspect
    from sqlalchemy.schema import CreateColumn

    inspector = inspect(conn)
    for table in metadata.sorted_tables:
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name not in present:
                assert column.nullable, f"{table.name}.{column.name}: only nullable columns can be added"
                ddl = CreateColumn(column).compile(dialect=conn.dialect)
                conn.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {ddl}"))


class NoAuditTables(ConfigError):
    """The audit connection's database has none of the audit tables (see :func:`open_audit`)."""


def open_audit(connections: ConnectionResolver, conn_id: str = DEFAULT_AUDIT_CONNECTION, *,
               create: bool = True) -> Engine:
    """An engine on the audit database, with the schema in place.

    ``create=False`` (commands that only read the evidence): a database without any audit
    table is refused rather than given empty ones, so that ``verify`` pointed at the wrong
    database says so instead of "no certificates yet". (A deployment's init step, and any
    run, hold or erasure request, create the tables.)
    """
    engine = create_sql_engine(connections(conn_id))
    if not create and not inspect(engine).has_table("purge_certificates"):
        engine.dispose()
        raise NoAuditTables(f"connection {conn_id} holds no audit tables: nothing was ever certified there. "
                            "Is it the audit database? (a run, or the deployment's init step, creates them)")
    ensure_schema(engine)
    return engine
