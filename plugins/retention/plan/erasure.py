"""What erasing one subject would do, per rule target: an :class:`ErasurePlan`, a value.

A request holds its subject's identities only as HMACs, so a target's records are found
by HMAC-ing the values the store itself holds (the distinct values of each subject column,
the identity segment of each key under an S3 template) and keeping those that match. The
plain values found stay in memory, in the plan, for the run to act on; they are never
printed, journaled or certified. Per target the plan says: erase (the rule deletes or
archives), anonymize (the rule keeps the row), retained (a legal hold, or the rule's
``erasure_exempt`` duty), not found, refused (the blast-radius guard) or undeclared.

The age and ``where`` of a rule do not apply: a subject's records go whatever their age.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, func, or_, select

from retention.errors import ConfigError, TargetError
from retention.evidence.receipt import normalise
from retention.rules.fields import subject_placeholders
from retention.rules.models import S3Target, SqlTarget

if TYPE_CHECKING:
    from sqlalchemy.sql.elements import ColumnElement

    from retention.erasure_requests import ErasureRequest, SubjectKey
    from retention.holds import Hold, HoldRegistry
    from retention.rules.models import RuleFile
    from retention.rules.subjects import SubjectsFile
    from retention.targets import Targets
    from retention.targets.sql.table import SqlTable

ERASURE_MAX_FRACTION = 0.1
"""A subject matching more than this share of a table (or prefix) is refused: one person's
records are a sliver of a store, so more means the identity resolved wrongly."""
GUARD_FLOOR = 10
"""Below this many records the share is not judged (one customer of a five-row table is 20%)."""


@dataclass(frozen=True)
class SubjectRecords:
    """Where the subject's records are, in the store's own values (in memory only)."""

    values: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    """SQL: subject column → the values of it that are the subject's."""
    keys: tuple[str, ...] = ()
    """S3: the subject's keys (those no hold protects)."""


@dataclass(frozen=True)
class ErasureStep:
    """One target of one rule, as the erasure will treat it."""

    category: str
    target: str
    kind: str
    location: str
    action: str
    """The rule's action: delete, archive or anonymize."""
    outcome: str
    """erase | anonymize | retained | not_found | refused | undeclared."""
    matched: int = 0
    """The subject's records to erase or anonymize (those no hold protects)."""
    held: int = 0
    total: int = 0
    holds: tuple[tuple[int, str], ...] = ()
    """(hold id, case id) of each hold that protects some of the subject's records."""
    reason: str = ""
    records: SubjectRecords = field(default_factory=SubjectRecords, repr=False, compare=False)

    @property
    def key(self) -> str:
        """``category/target``: names the step in the journal and the certificate."""
        return f"{self.category}/{self.target}"

    def describe(self) -> str:
        """One line for ``erase plan``."""
        held = "".join(f"; {_n(self.held, 'record')} retained under legal hold {case}" for _, case in self.holds[:1])
        if self.outcome == "erase":
            return f"erase {_n(self.matched, 'record')} ({self.action}){held}"
        if self.outcome == "anonymize":
            return f"anonymize {_n(self.matched, 'record')} (the rule keeps the rows){held}"
        if self.outcome == "retained":
            return self.reason + held if not self.holds else f"{_n(self.held, 'record')} retained under legal " \
                f"hold {', '.join(case for _, case in self.holds)}"
        return self.reason or self.outcome.replace("_", " ")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, without the records' values."""
        return {"category": self.category, "target": self.target, "kind": self.kind, "location": self.location,
                "action": self.action, "outcome": self.outcome, "matched": self.matched, "held": self.held,
                "total": self.total, "holds": [{"id": i, "case": c} for i, c in self.holds],
                "reason": self.reason}


@dataclass(frozen=True)
class ErasurePlan:
    """Every rule target, as erasing the request's subject would treat it."""

    request: ErasureRequest
    steps: tuple[ErasureStep, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (HMACs and counts only)."""
        return {"request": self.request.request_id, "subject": {"type": self.request.subject_type,
                                                                "hmac": self.request.subject_hmac},
                "steps": [s.to_dict() for s in self.steps]}


def build_erasure_plan(request: ErasureRequest, rules: list[RuleFile], targets: Targets, key: SubjectKey, *,
                       holds: HoldRegistry | None = None) -> ErasurePlan:
    """The plan for ``request`` over ``rules``; reads the stores, changes nothing."""
    if key.key_id != request.key_id:
        raise ConfigError(f"request {request.request_id} was filed under hash key {request.key_id}, but "
                          f"{key.key_id} is configured: its HMACs can only be matched with the key it was filed with")
    steps = []
    for rule_file in rules:
        rule = rule_file.rule
        for target in rule.targets:
            base: dict[str, Any] = {"category": rule.category, "target": target.name, "kind": target.kind,
                    "location": target.location, "action": rule.action}
            held_by = holds.in_force(rule.category, target.name) if holds is not None else []
            if rule.erasure_exempt is not None:
                steps.append(ErasureStep(**base, outcome="retained", reason=f"retained: {rule.erasure_exempt}"))
            elif isinstance(target, SqlTarget):
                steps.append(_sql_step(base, target, request, targets, key, held_by))
            else:
                steps.append(_s3_step(base, target, request, targets, key, held_by))
    return ErasurePlan(request, tuple(steps))


def resolve_identities(subjects: SubjectsFile, identity_type: str, value: str, targets: Targets,
                       key: SubjectKey) -> list[tuple[str, str]]:
    """The HMACs of an identity and of everything it resolves to, looked up now (while the plain
    value is in hand: it is not kept). An email with no customer behind it resolves to itself only."""
    identities = subjects.config.identities
    if identity_type not in identities:
        raise ConfigError(f"--subject {identity_type}=...: {identity_type!r} is not an identity type declared in "
                          f"{subjects.path} (declared: {', '.join(sorted(identities))})")
    found = [(identity_type, key.digest(identity_type, value))]
    current_type, current = identity_type, [value]
    while (resolve := identities[current_type].resolve) is not None and current:
        from sqlalchemy import MetaData, String, Table

        schema, _, name = resolve.table.rpartition(".")
        engine = targets.sql_engine(resolve.connection)
        lookup = Table(name, MetaData(), schema=schema or None, autoload_with=engine)
        match = lookup.c[resolve.match]
        if isinstance(match.type, String):
            wanted = [normalise(current_type, v) for v in current]
            condition = (func.lower(func.trim(match)) if current_type == "email" else func.trim(match)).in_(wanted)
        else:
            condition = match.in_(current)
        with engine.connect() as conn:
            resolved = [v for (v,) in conn.execute(select(lookup.c[resolve.column]).where(condition).distinct())
                        if v is not None]
        current_type, current = resolve.to, resolved
        found.extend((current_type, key.digest(current_type, v)) for v in resolved)
    return found


def subject_condition(table: SqlTable, records: SubjectRecords) -> ColumnElement[bool]:
    """Rows whose subject columns hold one of the subject's values."""
    return or_(*(table.table.c[column].in_(values) for column, values in records.values.items() if values))


def erasable(table: SqlTable, records: SubjectRecords, holds: list[Hold], action: str) -> ColumnElement[bool]:
    """The subject's rows that no hold protects (and, to anonymize, not yet anonymized)."""
    condition = table.unheld(subject_condition(table, records), holds)
    spec = table.target.anonymize
    if action == "anonymize" and spec is not None:
        condition = and_(condition, table.table.c[spec.marker].is_(None))
    return condition


def _sql_step(base: dict[str, Any], target: SqlTarget, request: ErasureRequest, targets: Targets,
              key: SubjectKey, holds: list[Hold]) -> ErasureStep:
    if target.subject is None:
        return ErasureStep(**base, outcome="undeclared", reason="not searched: the target declares no subject")
    from retention.targets.sql.table import SqlTable

    table = SqlTable(target, targets.sql_engine(target.connection))
    values: dict[str, tuple[Any, ...]] = {}
    for identity_type, column_name in target.subject.items():
        wanted = request.hmacs(identity_type)
        if column_name not in table.table.c:
            raise TargetError(f"subject column {column_name!r} does not exist in {target.location}",
                              f"subject.{identity_type}")
        if not wanted:
            continue
        column = table.table.c[column_name]
        with table.engine.connect() as conn:
            found = conn.execution_options(yield_per=5000).execute(select(column).where(column.is_not(None)).distinct())
            values[column_name] = tuple(v for (v,) in found if key.digest(identity_type, v) in wanted)
    records = SubjectRecords(values={c: v for c, v in values.items() if v})
    if not records.values:
        return ErasureStep(**base, outcome="not_found", reason="not found")
    subject = subject_condition(table, records)
    held_condition = table.held(holds)
    with table.engine.connect() as conn:
        def count(condition: ColumnElement[bool]) -> int:
            return int(conn.execute(select(func.count()).select_from(table.table).where(condition)).scalar_one())

        total = int(conn.execute(select(func.count()).select_from(table.table)).scalar_one())
        matched = count(erasable(table, records, holds, base["action"]))
        held = count(and_(subject, held_condition)) if held_condition is not None else 0
        protecting = tuple((h.id, h.case_id) for h in holds if count(and_(subject, _one_hold(table, h))) > 0)
    return _judged(ErasureStep(**base, outcome="anonymize" if base["action"] == "anonymize" else "erase",
                               matched=matched, held=held, total=total, holds=protecting, records=records))


def _s3_step(base: dict[str, Any], target: S3Target, request: ErasureRequest, targets: Targets,
             key: SubjectKey, holds: list[Hold]) -> ErasureStep:
    template = target.subject_prefix
    if template is None:
        return ErasureStep(**base, outcome="undeclared", reason="not searched: the target declares no subject_prefix")
    names = subject_placeholders(template)
    static = template.split("{", 1)[0]
    pattern = re.compile(re.escape(static) + "".join(
        f"(?P<{name}_{i}>[^/]+)" + re.escape(part) for i, (name, part) in
        enumerate(zip(names, re.split(r"\{[^{}]*\}", template)[1:]))))
    client = targets.s3_client(target.connection, concurrency=target.concurrency)
    total, held_keys = 0, 0
    keys: list[str] = []
    protecting: set[tuple[int, str]] = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=target.bucket, Prefix=target.prefix):
        for item in page.get("Contents", []):
            total += 1
            match = pattern.match(item["Key"])
            if match is None or not all(key.digest(name, match.group(f"{name}_{i}")) in request.hmacs(name)
                                        for i, name in enumerate(names)):
                continue
            holding = [h for h in holds if h.whole or (h.prefix is not None and item["Key"].startswith(h.prefix))]
            if holding:
                held_keys += 1
                protecting.update((h.id, h.case_id) for h in holding)
            else:
                keys.append(item["Key"])
    if not keys and not held_keys:
        return ErasureStep(**base, outcome="not_found", reason="not found", total=total)
    return _judged(ErasureStep(**base, outcome="erase", matched=len(keys), held=held_keys, total=total,
                               holds=tuple(sorted(protecting)), records=SubjectRecords(keys=tuple(keys))))


def _one_hold(table: SqlTable, hold: Hold) -> ColumnElement[bool]:
    condition = table.held([hold])
    assert condition is not None  # one hold always reaches some rows
    return condition


def _judged(step: ErasureStep) -> ErasureStep:
    """The step, or refused by the blast-radius guard; everything held: retained."""
    found = step.matched + step.held
    if found > GUARD_FLOOR and found > ERASURE_MAX_FRACTION * step.total:
        return replace(step, outcome="refused", records=SubjectRecords(), reason=(
            f"refused: the subject matches {found} of {step.total} records of {step.location}, more than "
            f"{ERASURE_MAX_FRACTION:.0%}; check how the identity resolved before erasing by hand"))
    if step.matched == 0 and step.held:
        return replace(step, outcome="retained")
    return step


def _n(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"
