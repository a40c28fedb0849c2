"""Blast-radius limits decided on plain values: no database, no journal."""

from __future__ import annotations

from datetime import datetime, timezone

from retention.plan.limits import approval_record, over_limits, record_limit, refusal
from retention.plan.model import PurgePlan, TargetPlan
from retention.rules.loader import load_rule_file

from conftest import write_rule

AS_OF = datetime(2026, 6, 15, 12, 0, tzinfo=timezone.utc)


def _plan(rule_file, *counts: tuple[int, int]) -> PurgePlan:
    return PurgePlan(
        category=rule_file.rule.category, rule_path=str(rule_file.path), rule_sha256=rule_file.sha256,
        action="delete", retain_for="P2Y", as_of=AS_OF, cutoff=rule_file.rule.cutoff(AS_OF),
        targets=tuple(TargetPlan(t.name, t.kind, t.location, matched, total)
                      for t, (matched, total) in zip(rule_file.rule.targets, counts)),
    )


def test_a_target_over_its_fraction_or_its_records_is_over(tmp_path):
    rule_file = load_rule_file(write_rule(tmp_path, targets=[
        {"name": "wide", "max_fraction": 0.2},
        {"name": "many", "table": "others", "max_records": 10},
        {"name": "fine", "table": "third", "max_fraction": 0.5},
    ]))

    over = over_limits(rule_file, _plan(rule_file, (90, 100), (11, 1000), (50, 100)))

    assert list(over) == ["wide", "many"]
    assert (over["wide"].matched, over["wide"].total, over["wide"].share) == (90, 100, 0.9)
    assert over["many"].to_dict() == {"matched": 11, "total": 1000, "max_fraction": 1.0, "max_records": 10,
                                      "line": over["many"].line}
    assert over["wide"].line is not None and over["many"].line > over["wide"].line
    message = str(refusal("customer_accounts", rule_file, over))
    assert message.startswith(
        f"customer_accounts.wide would purge 90 of 100 (90.0%), over its limit (max_fraction 20%; "
        f"{rule_file.path}:{over['wide'].line}); customer_accounts.many would purge 11 of 1,000 (1.1%), "
        f"over its limit (max_fraction 100%, max_records 10; {rule_file.path}:{over['many'].line}). "
        "Nothing was touched.")
    approval = approval_record("backlog", over)
    assert approval["reason"] == "backlog" and approval["by"]
    assert approval["targets"]["wide"] == over["wide"].to_dict()


def test_a_purge_may_take_the_smaller_limit_or_exactly_what_was_approved(tmp_path):
    (target,) = load_rule_file(write_rule(tmp_path, targets=[{"max_fraction": 0.3, "max_records": 500}])).rule.targets

    assert record_limit(target, 1000, None, category="c").records == 300
    assert record_limit(target, 10_000, None, category="c").records == 500
    assert record_limit(target, None, None, category="c").records == 500  # size not journaled: max_records only
    limit = record_limit(target, 1000, {"targets": {"customers": {"matched": 700}}}, category="c")
    assert limit is not None and limit.records == 700
    assert limit.describe == "max_fraction 30% of the 1,000 records counted at plan: 300, approved up to 700"
