"""Every error the engine raises on purpose derives from :class:`RetentionError`.

Errors say whether retrying can help: :class:`TransientError` may succeed on a later
attempt (a dropped connection, a lock timeout), :class:`TerminalError` will not (a bad
rule, a missing table, a forged certificate). The orchestration layer maps the second
kind to "fail without retry".
"""

from __future__ import annotations

from dataclasses import dataclass


class RetentionError(Exception):
    """Root of the errors this package raises deliberately."""


class TerminalError(RetentionError):
    """Retrying will not help; a person has to change something."""


class TransientError(RetentionError):
    """A later attempt may succeed without anyone changing anything."""


@dataclass(frozen=True)
class RuleProblem:
    """One thing wrong with a rule file, located as precisely as the YAML allows."""

    path: str
    line: int | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        field = f" {self.field}:" if self.field else ""
        return f"{where}:{field} {self.message}"


class RuleError(TerminalError):
    """One or more rule files are invalid; nothing may run until they are fixed."""

    def __init__(self, problems: list[RuleProblem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class ConfigError(TerminalError):
    """The environment is incomplete: a connection, key or setting is missing or wrong."""


class InvalidAsOf(ConfigError):
    """A run's ``as_of`` is not a real "now": later than the clock, or absurdly early."""


class TargetError(TerminalError):
    """A target does not match its rule (missing table, column or key).

    ``field`` is the rule field at fault (``age_column``, ``where.status``) so the caller
    can point at the line of the rule file.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class OverLimit(TerminalError):
    """A run would purge more than a target's blast-radius limit allows, without approval."""


class PurgeFailed(RetentionError):
    """A run finished but did not purge everything it should have."""
