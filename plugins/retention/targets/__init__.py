"""Targets: where a rule's records live. Each kind finds expired records and purges them.

:class:`Targets` opens a rule's targets on their connections, one engine per
connection id, and closes them together.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from retention.connections import ConnectionResolver, create_s3_client, create_sql_engine

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from retention.rules import Target
    from retention.targets.s3 import S3Objects
    from retention.targets.sql import SqlTable


class Targets:
    """Opens targets on their connections and keeps one engine per connection id."""

    def __init__(self, connections: ConnectionResolver):
        self.connections = connections
        self._engines: dict[str, Engine] = {}
        self._s3: dict[str, object] = {}

    def sql_engine(self, conn_id: str) -> Engine:
        """The (cached) engine of a SQL connection id."""
        if conn_id not in self._engines:
            self._engines[conn_id] = create_sql_engine(self.connections(conn_id))
        return self._engines[conn_id]

    def s3_client(self, conn_id: str, *, concurrency: int = 8):
        """The (cached) boto3 S3 client of an AWS connection id, pooled for ``concurrency``."""
        if conn_id not in self._s3:
            self._s3[conn_id] = create_s3_client(self.connections(conn_id), max_pool_connections=max(concurrency, 10) + 2)
        return self._s3[conn_id]

    def open(self, target: Target) -> SqlTable | S3Objects:
        """A live handle on ``target``."""
        if target.kind == "s3":
            from retention.targets.s3 import S3Objects

            client = self.s3_client(target.connection, concurrency=target.concurrency)
            return S3Objects(target, client)
        from retention.targets.sql import SqlTable

        return SqlTable(target, self.sql_engine(target.connection))

    def close(self) -> None:
        """Dispose of every engine opened."""
        for engine in self._engines.values():
            engine.dispose()
        self._engines.clear()
        for client in self._s3.values():
            client.close()
        self._s3.clear()

    def __enter__(self) -> Targets:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
