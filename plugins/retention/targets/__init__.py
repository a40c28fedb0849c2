"""Targets: where a rule's records live. Each kind finds expired records and purges them.

:class:`Targets` opens a rule's targets on their connections, one engine per
connection id, and closes them together.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from retention.connections import ConnectionResolver, create_sql_engine

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from retention.rules import Target
    from retention.targets.sql import SqlTable


class Targets:
    """Opens targets on their connections and keeps one engine per connection id."""

    def __init__(self, connections: ConnectionResolver):
        self.connections = connections
        self._engines: dict[str, Engine] = {}

    def sql_engine(self, conn_id: str) -> Engine:
        """The (cached) engine of a SQL connection id."""
        if conn_id not in self._engines:
            self._engines[conn_id] = create_sql_engine(self.connections(conn_id))
        return self._engines[conn_id]

    def open(self, target: Target) -> SqlTable:
        """A live handle on ``target``."""
        from retention.targets.sql import SqlTable

        return SqlTable(target, self.sql_engine(target.connection))

    def close(self) -> None:
        """Dispose of every engine opened."""
        for engine in self._engines.values():
            engine.dispose()
        self._engines.clear()

    def __enter__(self) -> Targets:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
