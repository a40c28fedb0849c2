"""Anonymization strategies as a rule declares them (the values they produce are
computed by :mod:`retention.targets.sql.anonymize`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Strategy:
    """One column's strategy: ``kind`` is hash, null, redact or generalize."""

    kind: str
    keep_last: int = 0
    unit: str | None = None  # generalize: year, month or prefix
    prefix: int = 0

    @classmethod
    def parse(cls, value: Any) -> Strategy:
        """Read a strategy as written in a rule; ValueError with advice."""
        if value == "hash":
            return cls("hash")
        if value in ("null", None):
            return cls("null")
        if isinstance(value, Mapping) and len(value) == 1:
            ((name, argument),) = value.items()
            if name == "redact" and isinstance(argument, Mapping) and set(argument) == {"keep_last"}:
                keep = argument["keep_last"]
                if isinstance(keep, int) and not isinstance(keep, bool) and 0 <= keep <= 64:
                    return cls("redact", keep_last=keep)
                raise ValueError("redact.keep_last takes a whole number from 0 to 64")
            if name == "generalize":
                if argument in ("year", "month"):
                    return cls("generalize", unit=argument)
                if isinstance(argument, Mapping) and set(argument) == {"prefix"}:
                    size = argument["prefix"]
                    if isinstance(size, int) and not isinstance(size, bool) and size >= 0:
                        return cls("generalize", unit="prefix", prefix=size)
                raise ValueError("generalize takes year, month or {prefix: N}")
        raise ValueError(
            f"{value!r} is not a strategy: use hash, \"null\", {{redact: {{keep_last: N}}}}, "
            "{generalize: year}, {generalize: month} or {generalize: {prefix: N}}"
        )

    def describe(self) -> str:
        """How the rule spells it (for certificates and plans)."""
        if self.kind == "redact":
            return f"redact(keep_last={self.keep_last})"
        if self.kind == "generalize":
            return f"generalize({self.unit if self.unit != 'prefix' else f'prefix={self.prefix}'})"
        return self.kind

    @property
    def needs_text(self) -> bool:
        """True for strategies that produce text (the column must hold it)."""
        return self.kind in ("hash", "redact") or self.unit == "prefix"

    @property
    def needs_date(self) -> bool:
        """True for strategies that read a date."""
        return self.unit in ("year", "month")
