"""``retention schema``: the JSON Schema of a rule file, for editors and CI.

The schema comes from the pydantic models in :mod:`retention.rules.models`, so it cannot
drift from what ``validate`` accepts. Three rule values are parsed from text into small
dataclasses (a duration, a key-date pattern, an anonymization strategy); pydantic would
describe those dataclasses' fields, which is not what a rule file spells, so
:class:`RuleSchemaGenerator` describes them as written. The schema helps an editor; the
loader stays the judge (it also checks what a schema cannot say, e.g. action/archive pairs).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic.json_schema import GenerateJsonSchema

SCHEMA_ID = "https://github.com/retention/retention/docs/rule.schema.json"
DEFAULT_SCHEMA_PATH = Path("docs") / "rule.schema.json"

# Written forms of the parsed values, matching rules.models' parsers closely enough for
# an editor (the loader's own messages remain authoritative).
_DURATION_PATTERN = r"^(?=[Pp].*\d)[Pp](\d+[Yy])?(\d+[Mm])?(\d+[Ww])?(\d+[Dd])?([Tt](?=\d)(\d+[Hh])?(\d+[Mm])?(\d+[Ss])?)?$"
_WRITTEN_FORMS: dict[str, dict[str, Any]] = {
    "IsoDuration": {
        "type": "string",
        "pattern": _DURATION_PATTERN,
        "description": "An ISO 8601 duration, positive and under 100 years: P90D, P18M, P2Y, PT36H.",
        "examples": ["P90D", "P18M", "P2Y", "PT36H"],
    },
    "KeyDatePattern": {
        "type": "string",
        "pattern": "%Y",
        "description": "Where a key's date is, strftime-like with %Y %m %d %H %M %S (%% for %), e.g. 'receipts/%Y/%m/%d/'.",
    },
    "Strategy": {
        "description": "How a column is anonymized.",
        "anyOf": [
            {"enum": ["hash", "null"]},
            {"type": "null"},
            {
                "type": "object", "additionalProperties": False, "required": ["redact"],
                "properties": {"redact": {
                    "type": "object", "additionalProperties": False, "required": ["keep_last"],
                    "properties": {"keep_last": {"type": "integer", "minimum": 0, "maximum": 64}},
                }},
            },
            {
                "type": "object", "additionalProperties": False, "required": ["generalize"],
                "properties": {"generalize": {"anyOf": [
                    {"enum": ["year", "month"]},
                    {"type": "object", "additionalProperties": False, "required": ["prefix"],
                     "properties": {"prefix": {"type": "integer", "minimum": 0}}},
                ]}},
            },
        ],
    },
}


class RuleSchemaGenerator(GenerateJsonSchema):
    """Describes the parsed dataclasses (durations, key-date patterns, strategies) as they are written."""

    def dataclass_schema(self, schema):  # noqa: D102 - pydantic's hook
        written = _WRITTEN_FORMS.get(getattr(schema.get("cls"), "__name__", ""))
        if written is not None:
            return json.loads(json.dumps(written))  # a copy: pydantic may edit what it gets
        return super().dataclass_schema(schema)


def rule_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one rule file."""
    from retention.rules.models import RetentionRule

    schema = RetentionRule.model_json_schema(schema_generator=RuleSchemaGenerator, mode="validation")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "Retention rule",
        **{k: v for k, v in schema.items() if k != "title"},
    }


def schema_text() -> str:
    """The schema as committed in docs/rule.schema.json (stable key order, final newline)."""
    return json.dumps(rule_schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``retention schema`` to the CLI's subcommands."""
    cmd = commands.add_parser("schema", help="print the JSON Schema of rule files (for editors and CI)")
    cmd.add_argument("--out", metavar="FILE", help="write it to FILE instead of stdout")
    cmd.set_defaults(handler=cmd_schema)


def cmd_schema(args: argparse.Namespace) -> int:
    """Print (or write) the rule schema."""
    text = schema_text()
    if args.out:
        try:
            Path(args.out).write_text(text, encoding="utf-8")
        except OSError as exc:
            print(f"cannot write the schema to {args.out}: {exc.strerror}; check the path", file=sys.stderr)
            return 1
    else:
        print(text, end="")
    return 0
