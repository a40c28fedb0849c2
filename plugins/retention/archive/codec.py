"""Archive object bodies: rows encoded per column codec as gzip JSON Lines or Parquet.

JSON has strings, numbers, booleans and null; a codec per column turns the rest into
strings and back, and the manifest records each table's codecs, so :func:`decode_rows`
gives back exactly the values the archive read.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy import Column, Table

_ENCODERS: dict[str, Callable[[Any], Any]] = {
    "datetime": lambda v: v.isoformat(),
    "date": lambda v: v.isoformat(),
    "time": lambda v: v.isoformat(),
    "interval": lambda v: v.total_seconds(),
    "decimal": str,
    "bytes": lambda v: base64.b64encode(bytes(v)).decode("ascii"),
    "uuid": str,
}
_DECODERS: dict[str, Callable[[Any], Any]] = {
    "datetime": datetime.fromisoformat,
    "date": date.fromisoformat,
    "time": time.fromisoformat,
    "interval": lambda v: timedelta(seconds=v),
    "decimal": Decimal,
    "bytes": base64.b64decode,
    "uuid": uuid.UUID,
}

_CODEC_TYPES: tuple[tuple[str, tuple[type, ...]], ...] = (
    ("datetime", (datetime,)), ("date", (date,)), ("time", (time,)), ("interval", (timedelta,)),
    ("decimal", (Decimal,)), ("bytes", (bytes, bytearray, memoryview)), ("uuid", (uuid.UUID,)),
)

CODECS = frozenset({"plain", *(kind for kind, _types in _CODEC_TYPES)})
"""Every codec a manifest may name; values of any other type are stored as JSON gives them."""


def _codec_for(python_type: type) -> str:
    for kind, types in _CODEC_TYPES:  # datetime before date: a datetime is a date too
        if issubclass(python_type, types):
            return kind
    return "plain"


def column_codec(column: Column[Any]) -> str:
    """The codec for a SQLAlchemy column: datetime, date, decimal, bytes, uuid or plain."""
    try:
        return _codec_for(column.type.python_type)
    except NotImplementedError:
        return "plain"


def encode_value(codec: str, value: Any) -> Any:
    """A JSON-ready form of ``value``."""
    if value is None:
        return None
    encoder = _ENCODERS.get(codec)
    if encoder is None:
        if codec == "plain" and _codec_for(type(value)) != "plain":  # SQLite's loose typing
            return encode_value(_codec_for(type(value)), value)
        return value
    if codec == "uuid" and not isinstance(value, uuid.UUID):
        return str(value)
    return encoder(value)


def decode_value(codec: str, value: Any) -> Any:
    """Inverse of :func:`encode_value`."""
    if value is None:
        return None
    decoder = _DECODERS.get(codec)
    return decoder(value) if decoder else value


@dataclass(frozen=True)
class TableShape:
    """Column names and codecs of an archived table, as the manifest records them."""

    table: str
    columns: tuple[tuple[str, str], ...]  # (name, codec)

    @classmethod
    def of(cls, table: Table) -> TableShape:
        """The shape of a reflected table."""
        name = f"{table.schema}.{table.name}" if table.schema else table.name
        return cls(name, tuple((c.name, column_codec(c)) for c in table.columns))

    def encode(self, row: Sequence[Any]) -> dict[str, Any]:
        """A row (in column order) as a JSON object."""
        return {name: encode_value(codec, value) for (name, codec), value in zip(self.columns, row)}

    def decode(self, record: dict[str, Any]) -> dict[str, Any]:
        """A JSON object back to typed values, by column name."""
        return {name: decode_value(codec, record.get(name)) for name, codec in self.columns}


def canonical_line(shape: TableShape, row: Sequence[Any]) -> str:
    """One row as the exact JSON line the archive stores."""
    return json.dumps(shape.encode(row), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def encode_rows(shape: TableShape, rows: Iterable[Sequence[Any]], fmt: str) -> tuple[bytes, int]:
    """The object body for ``rows`` in ``fmt``; and how many rows it holds."""
    if fmt == "parquet":
        return _parquet(shape, rows)
    buffer = io.BytesIO()
    count = 0
    # mtime=0: the same rows give the same bytes (and checksum) on every attempt.
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=1, mtime=0) as stream:
        lines = []
        for row in rows:
            lines.append(canonical_line(shape, row))
            count += 1
            if len(lines) >= 5000:
                stream.write(("\n".join(lines) + "\n").encode("utf-8"))
                lines = []
        if lines:
            stream.write(("\n".join(lines) + "\n").encode("utf-8"))
    return buffer.getvalue(), count


def decode_rows(shape: TableShape, body: bytes, fmt: str) -> list[dict[str, Any]]:
    """Rows of an archive object, typed again."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(body))
        return [shape.decode(shape.encode([r[name] for name, _ in shape.columns])) for r in table.to_pylist()]
    text = gzip.decompress(body).decode("utf-8")
    return [shape.decode(json.loads(line)) for line in text.splitlines() if line]


def _parquet(shape: TableShape, rows: Iterable[Sequence[Any]]) -> tuple[bytes, int]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        from retention.errors import ConfigError

        raise ConfigError("format: parquet needs pyarrow (pip install 'retention[parquet]')") from None
    materialized = [list(r) for r in rows]
    names = [name for name, _ in shape.columns]
    columns = {name: [row[i] for row in materialized] for i, name in enumerate(names)}
    table = pa.table(columns)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue(), len(materialized)
