"""What the journal keeps per SQL batch (:class:`BatchDescriptor`): its walk range (typed
key and age values) and what the action records beside it (rows per table, planned
archive keys, verified archive objects, holds), encoded as the same JSON today's open
runs were journaled with."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

Bound = tuple[Any, ...]


@dataclass(frozen=True)
class BatchRange:
    """Rows after ``lower`` (exclusive) up to ``upper`` (inclusive) in walk order; None is open."""

    lower: Bound | None
    upper: Bound | None


@dataclass(frozen=True)
class BatchDescriptor:
    """One SQL batch as the journal keeps it.

    Every field but ``span`` may be absent from a descriptor (None): not recorded yet (an
    archive batch journaled before its rows were counted), not recorded by this action, or
    journaled by an older version. Absent fields stay absent when encoded again, so a
    descriptor read back and rewritten keeps its bytes.
    """

    span: BatchRange
    tables: Mapping[str, int] | None = None
    """Rows of the batch per table of the family (the target and its children)."""
    planned: tuple[tuple[str, str], ...] | None = None
    """(object key, table) of every archive object the batch may write, sorted by key."""
    objects: tuple[dict[str, Any], ...] | None = None
    """The verified archive objects, as :meth:`retention.archive.store.ArchivedObject.to_dict` gives them."""
    holds: tuple[int, ...] | None = None
    """Ids of the holds the batch was cut with (None: journaled before holds were recorded)."""
    partition: str | None = None
    """The partition dropped whole by this batch (None: a batch of rows; see partitions.py)."""

    def encode(self) -> str:
        """The JSON the journal keeps: sorted keys, absent fields left out."""
        data: dict[str, Any] = {"lower": _encode(self.span.lower), "upper": _encode(self.span.upper)}
        if self.tables is not None:
            data["tables"] = dict(self.tables)
        if self.planned is not None:
            data["planned"] = [list(entry) for entry in self.planned]
        if self.objects is not None:
            data["objects"] = list(self.objects)
        if self.holds is not None:
            data["holds"] = list(self.holds)
        if self.partition is not None:
            data["partition"] = self.partition
        return json.dumps(data, sort_keys=True)

    @classmethod
    def decode(cls, text: str) -> BatchDescriptor:
        """Inverse of :meth:`encode`; a key no version ever wrote is an error, not dropped."""
        data = json.loads(text)
        unknown = sorted(set(data) - _KEYS)
        if unknown:
            raise ValueError(f"SQL batch descriptor has unknown field {unknown[0]!r}: {text[:200]}")
        planned = data.get("planned")
        objects = data.get("objects")
        holds = data.get("holds")
        return cls(
            span=BatchRange(_decode(data["lower"]), _decode(data["upper"])),
            tables=data.get("tables"),
            planned=None if planned is None else tuple((key, table) for key, table in planned),
            objects=None if objects is None else tuple(objects),
            holds=None if holds is None else tuple(holds),
            partition=data.get("partition"),
        )

    def archived_objects(self) -> list[dict[str, Any]]:
        """The verified archive objects of the batch (none for a batch that archived nothing)."""
        return list(self.objects or ())

    def planned_keys(self) -> list[str]:
        """Keys of every archive object the batch may have written."""
        return [key for key, _table in self.planned or ()]


_KEYS = {"lower", "upper", "tables", "planned", "objects", "holds", "partition"}


class _TaggedText(str):
    """A bound value journaled as ``{"str": ...}`` (a type JSON has no tag for): compared as
    text, and journaled with its tag again, so a rewritten descriptor keeps its bytes."""


def _encode(bound: Bound | None) -> list[Any] | None:
    return None if bound is None else [_encode_value(v) for v in bound]


def _encode_value(value: Any) -> Any:
    if isinstance(value, _TaggedText):
        return {"str": str(value)}
    if isinstance(value, datetime):
        return {"datetime": value.isoformat()}
    if isinstance(value, date):
        return {"date": value.isoformat()}
    if isinstance(value, Decimal):
        return {"decimal": str(value)}
    if isinstance(value, uuid.UUID):
        return {"uuid": str(value)}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"bytes": base64.b64encode(bytes(value)).decode()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return {"str": str(value)}


def _decode(bound: list[Any] | None) -> Bound | None:
    return None if bound is None else tuple(_decode_value(v) for v in bound)


_DECODERS: dict[str, Callable[[str], Any]] = {
    "datetime": datetime.fromisoformat,
    "date": date.fromisoformat,
    "decimal": Decimal,
    "uuid": uuid.UUID,
    "bytes": base64.b64decode,
    "str": _TaggedText,
}


def _decode_value(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    ((tag, text),) = value.items()
    return _DECODERS[tag](text)
