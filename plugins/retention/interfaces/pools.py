"""Airflow pools per connection, so two purges never hammer one database at once.

Every connection a rule's target (or archive) names gets a pool ``retention__<conn_id>``;
each purge task runs in the pool of its target's connection. Slots come from
``_pools.yaml`` in the rules directory (``default_slots`` and a ``connections`` map),
else :data:`DEFAULT_SLOTS`. The pool *names* depend only on the rules, so DAGs are
built without this file; only ``retention airflow sync-pools`` (and the deployment's
init step, which calls it) reads the slots.

A task cannot see Airflow's pools (the Task SDK has no pool endpoint and tasks may not
open the metadata database), so ``sync-pools`` also leaves a receipt a task *can* read:
the Airflow Variable :data:`POOLS_VARIABLE`, the names of the pools it set. Each DAG's
plan task checks its purge tasks' pools against it (:func:`unsynced_pools`), so a pool
never created fails the run loudly instead of leaving its purges waiting for ever.

No Airflow import here: the pools are computed from YAML, and written through
Airflow's own ``airflow pools import`` (its local API client) by the CLI.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retention.errors import RuleError, RuleProblem
from retention.rules.yamlsource import YamlProblem, load_located

if TYPE_CHECKING:
    from retention.rules.models import RetentionRule, RuleFile

log = logging.getLogger(__name__)

POOL_PREFIX = "retention__"
POOLS_FILE = "_pools.yaml"
DEFAULT_SLOTS = 1
"""One purge per database at a time unless the pools file says more."""
MAX_SLOTS = 64
"""More concurrent purges than this on one database is a typo, not a plan."""
POOLS_VARIABLE = "retention_pools"
"""The Airflow Variable ``sync-pools`` writes: a JSON list of the pool names it set."""


@dataclass(frozen=True)
class PoolConfig:
    """Slots per connection, as read from ``_pools.yaml``."""

    default_slots: int = DEFAULT_SLOTS
    """Slots of a connection the file does not name."""
    slots: dict[str, int] = field(default_factory=dict)
    """Slots per connection id."""
    path: str | None = None
    """The file read, or None when there is none (all defaults)."""

    def slots_for(self, conn_id: str) -> int:
        """Slots of ``conn_id``'s pool."""
        return self.slots.get(conn_id, self.default_slots)


@dataclass(frozen=True)
class Pool:
    """One Airflow pool the rules need."""

    name: str
    slots: int
    description: str


def pool_name(conn_id: str) -> str:
    """``retention__<conn_id>``: the pool of every purge on ``conn_id``."""
    return f"{POOL_PREFIX}{conn_id}"


def rule_connections(rule: RetentionRule) -> list[str]:
    """Connections a rule touches, targets first in rule order, then its archive's."""
    seen = [t.connection for t in rule.targets]
    archive = getattr(rule, "archive", None)
    if archive is not None:
        seen.append(archive.connection)
    return list(dict.fromkeys(seen))


def load_pool_config(rules_dir: str | Path, known: list[str] | None = None) -> PoolConfig:
    """Read ``<rules_dir>/_pools.yaml`` (absent: defaults); raise :class:`RuleError` when it is wrong.

    ``known`` are the connections the rules use: a name in the file that none uses is a
    typo (its pool would never be used and the real one would stay at the default).
    """
    path = Path(rules_dir) / POOLS_FILE
    if not path.is_file():
        return PoolConfig()
    shown = str(path)
    try:
        doc = load_located(path.read_text(encoding="utf-8"))
    except YamlProblem as exc:
        raise RuleError([RuleProblem(shown, exc.line, None, exc.message)]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RuleError([RuleProblem(shown, None, None, f"cannot read the pools file: {exc}")]) from None
    data = doc.data
    problems: list[RuleProblem] = []

    def problem(where: tuple, field_name: str, message: str) -> None:
        problems.append(RuleProblem(shown, doc.line_of(where), field_name, message))

    if not isinstance(data, dict):
        raise RuleError([RuleProblem(shown, 1, None, "expected a mapping with default_slots and connections")])
    for key in data:
        if key not in ("default_slots", "connections"):
            hint = difflib.get_close_matches(str(key), ["default_slots", "connections"], n=1)
            advice = f"; did you mean {hint[0]!r}?" if hint else " (allowed: default_slots, connections)"
            problem((key,), str(key), f"unknown field{advice}")
    default = data.get("default_slots", DEFAULT_SLOTS)
    if not _is_slots(default):
        problem(("default_slots",), "default_slots", _slots_advice(default))
        default = DEFAULT_SLOTS
    slots: dict[str, int] = {}
    connections = data.get("connections") or {}
    if not isinstance(connections, dict):
        problem(("connections",), "connections", "expected a mapping of connection id to slots, e.g. {crm_db: 2}")
        connections = {}
    for conn_id, value in connections.items():
        where = ("connections", conn_id)
        name = f"connections.{conn_id}"
        if known is not None and conn_id not in known:
            hint = difflib.get_close_matches(str(conn_id), known, n=1)
            advice = f"; did you mean {hint[0]!r}?" if hint else f" (used: {', '.join(sorted(known)) or 'none'})"
            problem(where, name, f"no rule uses connection {conn_id!r}{advice}")
            continue
        if not _is_slots(value):
            problem(where, name, _slots_advice(value))
            continue
        slots[str(conn_id)] = value
    if problems:
        raise RuleError(problems)
    return PoolConfig(default_slots=default, slots=slots, path=shown)


def load_pool_rules(rules_dir: str | Path) -> list[RuleFile]:
    """The rules of ``rules_dir`` for pool purposes; raise :class:`RuleError` if any rule is invalid.

    The pools file is not a rule: its own problems are reported by :func:`load_pool_config`,
    whether or not the rule scanner already skips ``_``-files.
    """
    from retention.rules.loader import scan_rules

    rules, problems = scan_rules(rules_dir)
    pools_file = Path(rules_dir) / POOLS_FILE
    problems = [p for p in problems if Path(p.path) != pools_file]
    if problems:
        raise RuleError(problems)
    return [r for r in rules if Path(r.path) != pools_file]


def required_pools(rules: list[RuleFile], config: PoolConfig) -> list[Pool]:
    """The pools ``rules`` need, by name, with their slots and which categories share them."""
    users: dict[str, list[str]] = {}
    for rule_file in rules:
        for conn_id in rule_connections(rule_file.rule):
            users.setdefault(conn_id, []).append(rule_file.rule.category)
    return [
        Pool(
            name=pool_name(conn_id),
            slots=config.slots_for(conn_id),
            description=f"retention purges on connection {conn_id} ({', '.join(sorted(set(cats)))})",
        )
        for conn_id, cats in sorted(users.items())
    ]


def import_document(pools: list[Pool]) -> dict[str, Any]:
    """The JSON ``airflow pools import`` reads (and the REST API's fields)."""
    return {p.name: {"slots": p.slots, "description": p.description, "include_deferred": False} for p in pools}


def pools_receipt(pools: list[Pool]) -> str:
    """The JSON value of :data:`POOLS_VARIABLE` after ``pools`` were set."""
    import json

    return json.dumps(sorted(p.name for p in pools))


def unsynced_pools(needed: list[str], receipt: Any) -> list[str]:
    """Pools of ``needed`` that the receipt (the Variable's value, None when unset) does not name."""
    synced = {str(n) for n in receipt} if isinstance(receipt, list) else set()
    return [name for name in dict.fromkeys(needed) if name not in synced]


def unsynced_advice(category: str, missing: list[str], receipt: Any) -> str:
    """The plan task's one-line error for pools ``sync-pools`` has not set."""
    why = (f"Airflow Variable {POOLS_VARIABLE} is not set" if receipt is None
           else f"Airflow Variable {POOLS_VARIABLE} does not list it")
    return (f"retention {category}: pool {', '.join(missing)} was not set by `retention airflow sync-pools` "
            f"({why}), so its purge tasks would never be scheduled. Nothing was touched: run `retention "
            "airflow sync-pools` where Airflow runs (the deployment's init step), then clear this run")


def _is_slots(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_SLOTS


def _slots_advice(value: Any) -> str:
    return f"{value!r} is not a number of slots: write a whole number from 1 to {MAX_SLOTS}"
