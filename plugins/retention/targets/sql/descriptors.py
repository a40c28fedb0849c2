"""What the journal keeps per SQL batch: its walk range (typed key and age values) and
whatever the action records beside it (tables, planned keys, archive objects, holds),
encoded as the same JSON today's open runs were journaled with."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable
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




def encode_range(batch: BatchRange, **extra: Any) -> str:
    """JSON for a batch range (typed values), with whatever else the action records."""
    return json.dumps({"lower": _encode(batch.lower), "upper": _encode(batch.upper), **extra}, sort_keys=True)


def decode_range(text: str) -> BatchRange:
    """Inverse of :func:`encode_range`."""
    data = json.loads(text)
    return BatchRange(_decode(data["lower"]), _decode(data["upper"]))


def _encode(bound: Bound | None) -> list[Any] | None:
    return None if bound is None else [_encode_value(v) for v in bound]


def _encode_value(value: Any) -> Any:
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


def _decode_value(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    ((tag, text),) = value.items()
    decoders: dict[str, Callable[[str], Any]] = {
        "datetime": datetime.fromisoformat,
        "date": date.fromisoformat,
        "decimal": Decimal,
        "uuid": uuid.UUID,
        "bytes": base64.b64decode,
        "str": str,
    }
    return decoders[tag](text)
