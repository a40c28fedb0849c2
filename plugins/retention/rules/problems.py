"""Pydantic's validation errors, told as rule problems: file, line, field and advice.

pydantic locates an error by its model path (``targets.0.sql.conection``) in its own
words; a reviewer needs the line in the YAML file, the field as the rule spells it
(``targets[0].conection``) and, for a typo, the key that was meant. The models are
passed in, so this module knows YAML documents and pydantic, not any one rule.
"""

from __future__ import annotations

import difflib
import functools
from typing import TYPE_CHECKING, Any, get_args, get_origin

from pydantic import BaseModel

from retention.errors import RuleProblem

if TYPE_CHECKING:
    from pathlib import Path

    from pydantic import ValidationError
    from pydantic_core import ErrorDetails

    from retention.rules.yamlsource import LocatedDocument


def validation_problems(
    path: Path, document: LocatedDocument, exc: ValidationError, model: type[BaseModel]
) -> list[RuleProblem]:
    """One problem per error of ``exc``, raised validating ``document`` (read from ``path``) as ``model``."""
    problems = []
    for error in exc.errors(include_url=False):
        data_path = _data_path(document.data, error["loc"], model)
        message = _message(error, data_path, document.data, model)
        problems.append(
            RuleProblem(str(path), document.line_of(data_path), dotted_path(data_path) or None, message)
        )
    return problems


def dotted_path(path: tuple[str | int, ...]) -> str:
    """A document path as a problem names its field: ``targets[0].name``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _data_path(data: Any, loc: tuple[str | int, ...], model: type[BaseModel]) -> tuple[str | int, ...]:
    """Map a pydantic error location onto the document, dropping union tags."""
    path: list[str | int] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
            path.append(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
            path.append(part)
        elif isinstance(part, str) and part in _field_names(model):
            # A missing field: keep it so the message names it; the line is the parent's.
            path.append(part)
            node = None
        # Anything else is a union tag ('sql'), which the document does not spell.
    return tuple(path)


def _message(error: ErrorDetails, data_path: tuple[str | int, ...], data: Any, model: type[BaseModel]) -> str:
    kind = error["type"]
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        key = data_path[-1] if data_path else "?"
        allowed = _allowed_keys(data_path[:-1], data, model)
        hint = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
        advice = f"did you mean {hint[0]!r}?" if hint else f"allowed here: {', '.join(sorted(allowed))}"
        return f"unknown key {key!r}; {advice}"
    message = error["msg"]
    return message.removeprefix("Value error, ")


def _model_members(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation may hold (through list, Optional, Union, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = get_origin(annotation)
    if origin is None:
        return []
    members: list[type[BaseModel]] = []
    for arg in get_args(annotation):
        members.extend(_model_members(arg))
    return members


def _allowed_keys(parent: tuple[str | int, ...], data: Any, model: type[BaseModel]) -> list[str]:
    models: list[type[BaseModel]] = [model]
    node = data
    for part in parent:
        if isinstance(node, dict):
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int):
            node = node[part]
        else:
            node = None
        if isinstance(part, int):
            continue
        nested: list[type[BaseModel]] = []
        for candidate in models:
            field = candidate.model_fields.get(part)
            if field is not None:
                nested.extend(_model_members(field.annotation))
        models = nested or models  # no field of that name: a key of a mapping of models (identities)
    # Among union members (sql, s3), the one the document's `kind` names.
    kind = node.get("kind") if isinstance(node, dict) else None
    chosen = [m for m in models if "kind" in m.model_fields and kind in get_args(m.model_fields["kind"].annotation)]
    return sorted({name for member in (chosen or models) for name in member.model_fields})


@functools.cache
def _field_names(model: type[BaseModel]) -> set[str]:
    """Every field name in ``model`` and the models nested in it."""
    names: set[str] = set()
    pending: list[type[BaseModel]] = [model]
    visited: set[type[BaseModel]] = set()
    while pending:
        current = pending.pop()
        if current in visited:
            continue  # models nest recursively (children of children)
        visited.add(current)
        for name, field in current.model_fields.items():
            names.add(name)
            pending.extend(_model_members(field.annotation))
    return names
