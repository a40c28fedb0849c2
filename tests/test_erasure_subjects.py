"""Subjects in the rules: identity types in _subjects.yaml, subject columns and prefixes on
targets, file:line:field problems, and ``validate --require-subjects``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from retention.errors import RuleError
from retention.interfaces.cli import main
from retention.rules.loader import load_rule_file, load_rules
from retention.rules.subjects import load_subjects, subject_problems

ROOT = Path(__file__).resolve().parents[1]

SUBJECTS = """\
identities:
  customer_id:
    description: customer number
  email:
    description: sign-up address
    resolve: {to: customer_id, connection: crm_db, table: customers, match: email, column: id}
"""

RULE = """\
category: accounts
description: closed accounts
owner: crm
legal_basis: disputes
retain_for: P2Y
action: delete
targets:
  - name: customers
    kind: sql
    connection: crm_db
    table: customers
    key: [id]
    age_column: closed_at
{subject}
"""


def _rules_dir(tmp_path: Path, subjects: str | None = SUBJECTS, subject: str = "    subject: {customer_id: id}") -> Path:
    directory = tmp_path / "rules"
    directory.mkdir(parents=True)
    if subjects is not None:
        (directory / "_subjects.yaml").write_text(subjects)
    (directory / "accounts.yaml").write_text(RULE.format(subject=subject))
    return directory


def test_the_repository_rules_declare_a_subject_on_every_target_with_personal_data():
    rules = load_rules(ROOT / "retention_rules")
    subjects = load_subjects(ROOT / "retention_rules")
    assert subjects is not None
    assert subject_problems(rules, subjects, require=True) == []
    assert subjects.resolution_path("email") == ["email", "customer_id"]
    assert subjects.config.schedule == "@hourly" and str(subjects.config.due_within) == "P1M"
    orders = next(r.rule for r in rules if r.rule.category == "orders")
    assert orders.targets[0].subject == {"customer_id": "customer_id"}


def test_an_undeclared_identity_type_is_a_problem_at_its_line(tmp_path):
    directory = _rules_dir(tmp_path, subject="    subject: {customer_no: id}")
    problems = subject_problems(load_rules(directory), load_subjects(directory), require=False)
    assert [str(p) for p in problems] == [
        f"{directory / 'accounts.yaml'}:14: targets[0].subject.customer_no: identity type 'customer_no' "
        f"is not declared in {directory / '_subjects.yaml'}"]


def test_require_subjects_reports_a_target_that_declares_none(tmp_path):
    directory = _rules_dir(tmp_path, subject="")
    rules = load_rules(directory)
    assert subject_problems(rules, load_subjects(directory), require=False) == []
    (problem,) = subject_problems(rules, load_subjects(directory), require=True)
    assert problem.line == 8 and problem.field == "targets[0]" and "subject: {customer_id: customer_id}" in problem.message
    assert main(["validate", str(directory)]) == 0
    assert main(["validate", "--require-subjects", str(directory)]) == 2


def test_an_exempt_rule_needs_no_subject(tmp_path):
    directory = _rules_dir(tmp_path, subject="erasure_exempt: kept by law")
    assert subject_problems(load_rules(directory), load_subjects(directory), require=True) == []


def test_subjects_file_problems_name_file_line_and_field(tmp_path):
    directory = _rules_dir(tmp_path, subjects=SUBJECTS + "  phone:\n    descripton: typo\n")
    with pytest.raises(RuleError) as caught:
        load_subjects(directory)
    problem = next(p for p in caught.value.problems if p.field == "identities.phone.descripton")
    assert problem.line == 8 and problem.field == "identities.phone.descripton"
    assert "did you mean 'description'?" in problem.message
    directory2 = _rules_dir(tmp_path / "b", subjects=SUBJECTS.replace("to: customer_id", "to: customer"))
    with pytest.raises(RuleError) as caught:
        load_subjects(directory2)
    (problem,) = caught.value.problems
    assert problem.line == 6 and "'customer' is not a declared identity type" in problem.message


def test_resolution_that_loops_is_refused(tmp_path):
    looping = SUBJECTS.replace("description: customer number",
                               "description: customer number\n    resolve: {to: email, connection: crm_db, "
                               "table: customers, match: id, column: email}")
    with pytest.raises(RuleError, match="resolution loops"):
        load_subjects(_rules_dir(tmp_path, subjects=looping))


def test_an_undeclared_identity_without_a_subjects_file_says_so(tmp_path):
    directory = _rules_dir(tmp_path, subjects=None)
    (problem,) = subject_problems(load_rules(directory), load_subjects(directory), require=False)
    assert "there is no _subjects.yaml" in problem.message


@pytest.mark.parametrize("template, message", [
    ("exports/{customer_id}", "must end with '/'"),
    ("exports/", "names no identity"),
    ("exports/{customer id}/", "is not an identity type"),
])
def test_subject_prefix_templates_are_checked(tmp_path, template, message):
    rule = tmp_path / "receipts.yaml"
    shutil.copy(ROOT / "retention_rules" / "receipts.yaml", rule)
    rule.write_text(rule.read_text().replace("    tags: {category: receipt}",
                                             f'    tags: {{category: receipt}}\n    subject_prefix: "{template}"'))
    with pytest.raises(RuleError) as caught:
        load_rule_file(rule)
    assert message in str(caught.value) and caught.value.problems[0].field == "targets[0].subject_prefix"


def test_a_subject_prefix_outside_the_target_prefix_is_a_problem(tmp_path):
    directory = tmp_path / "rules"
    directory.mkdir()
    (directory / "_subjects.yaml").write_text(SUBJECTS)
    text = (ROOT / "retention_rules" / "receipts.yaml").read_text()
    (directory / "receipts.yaml").write_text(text.replace(
        "    tags: {category: receipt}", '    tags: {category: receipt}\n    subject_prefix: "exports/{customer_id}/"'))
    (problem,) = subject_problems(load_rules(directory), load_subjects(directory), require=False)
    assert "outside the target's prefix 'receipts/'" in problem.message
