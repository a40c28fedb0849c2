"""Targets: where a rule's records live. Each kind finds expired records and purges them.

:class:`Targets` opens a rule's targets on their connections, one engine per
connection id, and closes them together.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from retention.aws import create_s3_client
from retention.connections import ConnectionResolver, ConnectionSpec, create_sql_engine
from retention.rules.models import ArchiveSpec

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from retention.rules.models import Target
    from retention.targets.s3.objects import S3Objects
    from retention.targets.sql.actions import SqlAction
    from retention.targets.sql.table import SqlTable


@dataclass(frozen=True)
class RunContext:
    """What a target's action needs besides the target: the rule's action and archive, and
    the run it belongs to (archive object names, the anonymize marker's value)."""

    action: str
    category: str
    run_id: str
    as_of: datetime
    archive: ArchiveSpec | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (kept in the journal so a later process can settle the run)."""
        return {"action": self.action, "category": self.category, "run_id": self.run_id,
                "as_of": self.as_of.isoformat(),
                "archive": self.archive.model_dump(mode="json") if self.archive else None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunContext:
        """Inverse of :meth:`to_dict`."""
        archive = ArchiveSpec.model_validate(data["archive"]) if data.get("archive") else None
        return cls(data["action"], data["category"], data["run_id"], datetime.fromisoformat(data["as_of"]), archive)


class Targets:
    """Opens targets on their connections and keeps one engine per connection id."""

    def __init__(self, connections: ConnectionResolver):
        self.connections = connections
        self._engines: dict[str, Engine] = {}
        self._specs: dict[str, ConnectionSpec] = {}
        self._throttles: list[Any] = []  # LagThrottles, whose replica engines close with the rest
        self._s3: dict[str, Any] = {}  # boto3 clients (botocore types them at run time only)
        self._shapes: dict[Any, Any] = {}  # tables reflected, shared by the handles opened here

    def sql_engine(self, conn_id: str) -> Engine:
        """The (cached) engine of a SQL connection id."""
        if conn_id not in self._engines:
            self._engines[conn_id] = create_sql_engine(self.spec(conn_id))
        return self._engines[conn_id]

    def spec(self, conn_id: str) -> ConnectionSpec:
        """The (cached) connection ``conn_id`` resolves to."""
        if conn_id not in self._specs:
            self._specs[conn_id] = self.connections(conn_id)
        return self._specs[conn_id]

    def s3_client(self, conn_id: str, *, concurrency: int = 8):
        """The (cached) boto3 S3 client of an AWS connection id, pooled for ``concurrency``."""
        if conn_id not in self._s3:
            self._s3[conn_id] = create_s3_client(self.connections(conn_id), max_pool_connections=max(concurrency, 10) + 2)
        return self._s3[conn_id]

    def archive_store(self, spec: ArchiveSpec):
        """An ArchiveStore on the archive's connection."""
        from retention.archive.store import ArchiveStore

        return ArchiveStore(spec, self.s3_client(spec.connection))

    def open(self, target: Target, context: RunContext | None = None, *, holds=None) -> SqlTable | S3Objects:
        """A live handle on ``target``, doing what ``context``'s action says (default: delete),
        and skipping what ``holds`` (a :class:`retention.holds.HoldView`) protects."""
        action = context.action if context else "delete"
        if target.kind == "s3":
            from retention.targets.s3.objects import S3Objects

            client = self.s3_client(target.connection, concurrency=target.concurrency)
            if action == "archive":
                assert context is not None and context.archive is not None  # "archive" comes only from a context with one
                return S3Objects(target, client, archive=self.archive_store(context.archive),
                                 category=context.category, run_id=context.run_id, holds=holds)
            return S3Objects(target, client, holds=holds)
        from retention.targets.sql.anonymize import AnonymizeRows
        from retention.targets.sql.archive import ArchiveRows
        from retention.targets.sql.delete import DeleteRows
        from retention.targets.sql.lag import throttle_for
        from retention.targets.sql.table import SqlTable

        sql_action: SqlAction
        if action == "archive":
            assert context is not None and context.archive is not None  # "archive" comes only from a context with one
            sql_action = ArchiveRows(self.archive_store(context.archive), category=context.category,
                                     run_id=context.run_id)
        elif action == "anonymize":
            from retention.targets.sql.anonymize import Anonymizer

            assert context is not None and target.anonymize is not None  # checked when the rule was loaded
            needs_key = any(s.kind == "hash" for s in target.anonymize.columns.values())
            sql_action = AnonymizeRows(Anonymizer.from_environment(required=needs_key), as_of=context.as_of)
        else:
            sql_action = DeleteRows()
        engine = self.sql_engine(target.connection)
        throttle = throttle_for(target, self.spec(target.connection), engine, self.connections)
        self._throttles.append(throttle)
        return SqlTable(target, engine, action=sql_action, holds=holds, throttle=throttle, shapes=self._shapes)

    def close(self) -> None:
        """Dispose of every engine opened."""
        for throttle in self._throttles:
            throttle.replicas.close()
        self._throttles.clear()
        for engine in self._engines.values():
            engine.dispose()
        self._engines.clear()
        self._shapes.clear()
        for client in self._s3.values():
            client.close()
        self._s3.clear()

    def __enter__(self) -> Targets:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
