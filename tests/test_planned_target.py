"""A run's planned targets as the journal keeps them: the ``definition`` text earlier versions
wrote decodes into a :class:`PlannedTarget`, and writing one back gives the same bytes."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from retention.evidence.audit import ensure_schema, purge_targets
from retention.plan.model import PlannedTarget
from retention.rules.loader import load_rule_file
from retention.rules.models import S3Target, SqlTarget
from retention.run.journal import RunJournal
from retention.targets import RunContext

RULES = Path(__file__).resolve().parents[1] / "retention_rules"
AS_OF = datetime(2026, 6, 15, 12, 0, tzinfo=timezone.utc)

# Written by Runner.start before PlannedTarget existed (retention_rules/orders.yaml and
# receipts.yaml, run scheduled__2026-06-15 as of 2026-06-15T12:00Z): the target and its run context.
ORDERS = (
    '{"context": {"action": "archive", "archive": {"bucket": "retention-archive", "connection": "aws_default", '
    '"format": "jsonl.gz", "kms_key_id": null, "prefix": "orders/", "sse": null, "storage_class": "STANDARD"}, '
    '"as_of": "2026-06-15T12:00:00+00:00", "category": "orders", "run_id": "scheduled__2026-06-15"}, '
    '"target": {"age_column": "placed_at", "anonymize": null, "children": [{"children": [], "foreign_key": '
    '["order_id"], "table": "order_items"}], "connection": "shop_db", "key": ["id"], "kind": "sql", '
    '"lock_wait_budget": 600.0, "max_batch_rows": 100000, "max_fraction": 0.5, "max_records": null, '
    '"name": "orders", "table": "orders", "where": {}, "workers": 1}}'
)
RECEIPTS = (
    '{"context": {"action": "delete", "archive": null, "as_of": "2026-06-15T12:00:00+00:00", '
    '"category": "receipts", "run_id": "scheduled__2026-06-15"}, "target": {"age_from": "key_date", '
    '"bucket": "retail-receipts", "concurrency": 8, "connection": "aws_default", "key_date_format": '
    '"receipts/%Y/%m/%d/", "kind": "s3", "max_batch_keys": 1000, "max_fraction": 0.5, "max_records": null, '
    '"name": "receipts", "prefix": "receipts/", "tags": {"category": "receipt"}}}'
)
# Journaled before rules had actions (and still by the benches): the target alone, a delete.
LEGACY_RECEIPTS = (
    '{"age_from": "key_date", "bucket": "retail-receipts", "concurrency": 8, "connection": "aws_default", '
    '"key_date_format": "receipts/%Y/%m/%d/", "kind": "s3", "max_batch_keys": 1000, "max_fraction": 0.5, '
    '"max_records": null, "name": "receipts", "prefix": "receipts/", "tags": {"category": "receipt"}}'
)


def test_an_archive_target_decodes_with_its_run_context():
    planned = PlannedTarget.from_json(ORDERS, position=0)

    assert isinstance(planned.target, SqlTarget)
    assert (planned.name, planned.kind, planned.location, planned.position) == ("orders", "sql", "shop_db:orders", 0)
    assert [child.table for child in planned.target.children] == ["order_items"]
    assert planned.context is not None
    assert (planned.context.action, planned.context.category, planned.context.run_id) == (
        "archive", "orders", "scheduled__2026-06-15")
    assert planned.context.as_of == AS_OF
    assert planned.context.archive is not None and planned.context.archive.bucket == "retention-archive"
    assert planned.to_json() == ORDERS


def test_a_delete_target_decodes_with_its_run_context():
    planned = PlannedTarget.from_json(RECEIPTS, position=2)

    assert isinstance(planned.target, S3Target)
    assert (planned.name, planned.kind, planned.location, planned.position) == (
        "receipts", "s3", "s3://retail-receipts/receipts/", 2)
    assert planned.context is not None and planned.context.action == "delete" and planned.context.archive is None
    assert planned.to_json() == RECEIPTS


def test_the_legacy_form_is_a_target_without_context():
    planned = PlannedTarget.from_json(LEGACY_RECEIPTS, position=0)

    assert isinstance(planned.target, S3Target)
    assert planned.context is None
    assert planned.target == PlannedTarget.from_json(RECEIPTS, position=0).target
    assert planned.to_json() == LEGACY_RECEIPTS


@pytest.mark.parametrize("rule, definition", [("orders.yaml", ORDERS), ("receipts.yaml", RECEIPTS)])
def test_the_journal_writes_and_reads_back_what_the_run_planned(audit_db, rule, definition):
    ensure_schema(audit_db.engine)
    journal = RunJournal(audit_db.engine)
    rule_file = load_rule_file(RULES / rule)
    run = journal.open_run(rule_file, run_id="scheduled__2026-06-15", as_of=AS_OF, code_version="test")
    (target,) = rule_file.rule.targets
    # The pinned definitions were written before the repository's rules declared their subjects.
    target = target.model_copy(update={f: None for f in ("subject", "subject_prefix") if f in type(target).model_fields})
    if target.kind == "sql":  # ... and while max_batch_rows defaulted to 100,000
        target = target.model_copy(update={"max_batch_rows": 100_000})
    context = RunContext(rule_file.rule.action, rule_file.rule.category, run.run_id, run.as_of, rule_file.rule.archive)
    planned = PlannedTarget(target, context, position=0)

    journal.plan_target(run, planned)
    journal.plan_target(run, PlannedTarget(target, None, position=0))  # again: the first plan stands

    with audit_db.engine.connect() as conn:
        assert conn.execute(sa.select(purge_targets.c.definition)).scalar_one() == definition
    (record,) = journal.targets(run)
    assert record.planned == planned
    assert (record.target, record.kind, record.location) == (planned.name, planned.kind, planned.location)


def test_the_journal_reads_a_target_journaled_in_the_legacy_form(audit_db):
    ensure_schema(audit_db.engine)
    journal = RunJournal(audit_db.engine)
    run = journal.open_run(load_rule_file(RULES / "receipts.yaml"), run_id="old", as_of=AS_OF, code_version="old")
    with audit_db.engine.begin() as conn:
        conn.execute(sa.insert(purge_targets).values(
            category=run.category, run_id=run.run_id, target="receipts", position=0, kind="s3",
            location="s3://retail-receipts/receipts/", definition=LEGACY_RECEIPTS, state="planned"))

    (record,) = journal.targets(run)

    assert record.planned.context is None
    assert record.planned.name == "receipts" and record.planned.target.bucket == "retail-receipts"
