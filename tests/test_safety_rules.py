"""Broken rule files fail loudly, never crash, never go silent (issue #9 items 8 and 11).

Item 11: any rule file, however malformed, becomes ``file:line`` problems (exit 2 in the
CLI, an invalid-rule DAG in Airflow), never an exception out of validation.
Item 8: the invalid-rule DAG keeps the DAG id, schedule and owner of the rule it
replaces and is not paused on creation, so a typo turns the running DAG red.
The scheduler path for item 8 is in test_scheduler_path.py.
"""

from __future__ import annotations

import logging

import pytest

from retention.errors import RuleError
from retention.interfaces.cli import main
from retention.rules.loader import MAX_RULE_FILE_BYTES, load_rule_file, load_rules, scan_rules
from retention.rules.yamlsource import MAX_DEPTH

from conftest import write_rule

GOOD = """\
category: {category}
description: Tickets closed long ago
owner: customer-care
legal_basis: Warranty window
retain_for: P3Y
schedule: "{schedule}"
action: delete
targets:
  - name: tickets
    kind: sql
    connection: support_db
    table: tickets
    key: [id]
    age_column: resolved_at
"""


def _good(category: str = "support_tickets", schedule: str = "@weekly") -> str:
    return GOOD.format(category=category, schedule=schedule)


def _one_problem(directory, path):
    """scan_rules must return (not raise) exactly one located problem for ``path``."""
    rules, problems = scan_rules(directory)
    assert [p.path for p in problems] == [str(path)]
    return problems[0]


# --- item 11: malformed files become located problems --------------------------------


def test_item11_an_impossible_date_in_a_text_field_is_kept_as_text(tmp_path):
    path = write_rule(tmp_path, "support_tickets",
                      text=_good().replace("Tickets closed long ago", "2024-02-30"))

    rule = load_rule_file(path).rule

    assert rule.description == "2024-02-30"


def test_item11_date_looking_values_stay_strings_everywhere(tmp_path):
    # A YAML timestamp would otherwise become a datetime and fail type checks obscurely.
    path = write_rule(tmp_path, "support_tickets",
                      text=_good() + "    where: {closed_on: 2024-01-31, batch: 2024-02-30 10:00:00}\n")

    target = load_rule_file(path).rule.targets[0]

    assert target.where == {"closed_on": "2024-01-31", "batch": "2024-02-30 10:00:00"}


@pytest.mark.parametrize("value", ["!!timestamp 2024-02-30", "!!binary '!!!'", "!!int abc",
                                   "!!python/object/apply:os.system [id]", "!!float nope"])
def test_item11_an_explicit_tag_is_a_problem_on_its_line(tmp_path, value):
    path = write_rule(tmp_path, "support_tickets", text=_good().replace("Tickets closed long ago", value))

    problem = _one_problem(tmp_path, path)

    assert problem.line == 2
    assert "tags" in problem.message and "not allowed" in problem.message


@pytest.mark.parametrize("shape", ["block", "flow", "mapping"])
def test_item11_deep_nesting_is_a_problem_not_a_recursion_error(tmp_path, shape):
    depth = 5000
    if shape == "block":
        text = _good() + "    children:\n      " + "- " * depth + "x\n"  # compact nested sequences
    elif shape == "flow":
        text = _good() + "    children: " + "[" * depth + "]" * depth + "\n"
    else:
        text = _good() + "    children: " + "{a: " * depth + "1" + "}" * depth + "\n"
    path = write_rule(tmp_path, "support_tickets", text=text)

    problem = _one_problem(tmp_path, path)

    assert problem.line is not None and problem.line >= 15
    assert f"nested more than {MAX_DEPTH} levels" in problem.message


def test_item11_nesting_a_real_rule_needs_is_accepted(tmp_path):
    # Three generations of child tables is deep for a real schema, far under the limit.
    children = (
        "    children:\n"
        "      - table: messages\n"
        "        foreign_key: [ticket_id]\n"
        "        children:\n"
        "          - table: attachments\n"
        "            foreign_key: [message_id]\n"
        "            children:\n"
        "              - {table: attachment_scans, foreign_key: [attachment_id]}\n"
    )
    path = write_rule(tmp_path, "support_tickets", text=_good() + children)

    rule = load_rule_file(path).rule

    assert rule.targets[0].children[0].children[0].children[0].table == "attachment_scans"


def test_item11_a_file_over_the_size_limit_is_refused_without_parsing(tmp_path):
    padding = "# " + "x" * 1000 + "\n"
    text = _good() + padding * (MAX_RULE_FILE_BYTES // len(padding) + 1)
    path = write_rule(tmp_path, "support_tickets", text=text)
    assert path.stat().st_size > MAX_RULE_FILE_BYTES

    problem = _one_problem(tmp_path, path)

    assert "256 KiB" in problem.message


def test_item11_a_file_just_under_the_size_limit_is_read(tmp_path):
    padding = "# " + "x" * 1000 + "\n"
    text = _good() + padding * ((MAX_RULE_FILE_BYTES - len(_good())) // len(padding))
    path = write_rule(tmp_path, "support_tickets", text=text)
    assert path.stat().st_size <= MAX_RULE_FILE_BYTES

    assert load_rule_file(path).rule.category == "support_tickets"


def test_item11_text_that_is_not_utf8_names_its_line(tmp_path):
    path = tmp_path / "support_tickets.yaml"
    path.write_bytes(_good().replace("Warranty window", "Garantie \xe9t\xe9").encode("latin-1"))

    problem = _one_problem(tmp_path, path)

    assert (problem.line, problem.message) == (4, "not UTF-8 text: save the file as UTF-8")


BROKEN_TEXTS = {
    "impossible_timestamp": ("description: !!timestamp 2024-02-30\n", 1),
    "deep": ("category: " + "[" * 5000 + "]" * 5000 + "\n", 1),
    "binary_garbage": ("category: \x00\x01\x02\n", 1),
    "tab_indent": ("category: x\n\towner: y\n", 2),
    "alias_bomb": ("a: &a [1]\nb: *a\n", 2),
}


@pytest.mark.parametrize("case", sorted(BROKEN_TEXTS))
def test_item11_validate_exits_2_naming_file_and_line(tmp_path, capsys, case):
    text, line = BROKEN_TEXTS[case]
    write_rule(tmp_path, "customer_accounts", text=_good("customer_accounts"))
    path = tmp_path / "support_tickets.yaml"
    path.write_text(text)

    status = main(["validate", str(tmp_path)])

    err = capsys.readouterr().err
    assert status == 2
    assert f"{path}:{line}:" in err
    assert "Traceback" not in err


def test_item11_build_dags_survives_every_kind_of_broken_file(tmp_path):
    from retention.interfaces.airflow import build_dags

    write_rule(tmp_path, "customer_accounts", text=_good("customer_accounts"))
    for index, case in enumerate(sorted(BROKEN_TEXTS)):
        (tmp_path / f"broken_{index}.yaml").write_text(BROKEN_TEXTS[case][0])

    dags = build_dags(tmp_path)

    assert "retention__customer_accounts" in dags
    invalid = [d for d in dags.values() if "invalid-rule" in d.tags]
    assert len(invalid) == len(BROKEN_TEXTS)
    assert all(d.task_ids == ["rule_is_invalid"] for d in invalid)


def test_item11_files_starting_with_underscore_are_configuration_not_rules(tmp_path):
    write_rule(tmp_path, "support_tickets", text=_good())
    (tmp_path / "_pools.yaml").write_text("pools:\n  support_db: 2\n")
    (tmp_path / "_subjects.yml").write_text("not: [a, rule\n")

    rules, problems = scan_rules(tmp_path)

    assert problems == []
    assert [r.rule.category for r in rules] == ["support_tickets"]


def test_item11_a_directory_of_only_configuration_has_no_rules(tmp_path):
    (tmp_path / "_pools.yaml").write_text("pools: {}\n")

    with pytest.raises(RuleError, match="no rule files"):
        load_rules(tmp_path)


# --- item 8: a broken rule keeps failing in the DAG that was running ------------------


def test_item08_a_file_must_be_named_after_its_category(tmp_path):
    path = write_rule(tmp_path, "support_tickets", text=_good("support_ticket"))

    problem = _one_problem(tmp_path, path)

    assert (problem.line, problem.field) == (1, "category")
    assert "rename the file to support_ticket.yaml" in problem.message


def test_item08_a_broken_rule_keeps_its_dag_id_schedule_and_owner(tmp_path):
    from retention.interfaces.airflow import build_dags

    write_rule(tmp_path, "support_tickets", text=_good().replace("P3Y", "3 years"))

    dags = build_dags(tmp_path)

    dag = dags["retention__support_tickets"]
    assert set(dags) == {"retention__support_tickets"}
    assert dag.task_ids == ["rule_is_invalid"]
    assert dag.is_paused_upon_creation is False
    assert dag.schedule == "@weekly"
    assert dag.owner == "customer-care"
    assert {"retention", "invalid-rule", "owner:customer-care", "action:delete"} <= set(dag.tags)
    assert dag.get_task("rule_is_invalid").retries == 0
    assert "support_tickets.yaml:5: retain_for:" in dag.doc_md


def test_item08_the_invalid_dag_fails_with_the_located_problems(tmp_path):
    from airflow.sdk.exceptions import AirflowFailException

    from retention.interfaces.airflow import build_dags

    path = write_rule(tmp_path, "support_tickets", text=_good().replace("P3Y", "3 years"))
    task = build_dags(tmp_path)["retention__support_tickets"].get_task("rule_is_invalid")

    with pytest.raises(AirflowFailException) as caught:
        task.python_callable()

    assert f"{path}:5: retain_for:" in str(caught.value)
    assert "nothing was purged" in str(caught.value)


def test_item08_an_unreadable_category_falls_back_to_the_file_name(tmp_path):
    from retention.interfaces.airflow import build_dags

    (tmp_path / "support_tickets.yaml").write_text("category: [support\nschedule: '@weekly'\n")

    dags = build_dags(tmp_path)

    dag = dags["retention__support_tickets"]
    assert dag.is_paused_upon_creation is False
    assert dag.schedule == "@daily"  # the schedule could not be read either


def test_item08_a_broken_schedule_falls_back_to_daily_and_null_stays_manual(tmp_path):
    from retention.interfaces.airflow import build_dags

    write_rule(tmp_path, "support_tickets", text=_good(schedule="61 * * * *").replace("P3Y", "3y"))
    write_rule(tmp_path, "web_sessions",
               text=_good("web_sessions").replace('schedule: "@weekly"', "schedule: null").replace("P3Y", "3y"))

    dags = build_dags(tmp_path)

    assert dags["retention__support_tickets"].schedule == "@daily"
    assert dags["retention__web_sessions"].schedule is None


def test_item08_a_broken_copy_never_takes_the_id_of_a_valid_rule(tmp_path):
    from retention.interfaces.airflow import build_dags

    write_rule(tmp_path, "support_tickets", text=_good())
    # A copy left beside the original: same category, wrong file name, and broken.
    write_rule(tmp_path, "x", filename="support_tickets_old.yaml", text=_good().replace("P3Y", "3 years"))

    dags = build_dags(tmp_path)

    assert dags["retention__support_tickets"].task_ids != ["rule_is_invalid"]
    assert dags["retention__support_tickets_old"].task_ids == ["rule_is_invalid"]


def test_item08_a_renamed_broken_file_keeps_the_dag_id_of_its_category(tmp_path):
    from retention.interfaces.airflow import build_dags

    # Renamed without changing the category: the mismatch is the problem, and the DAG
    # that turns red is the one that was running for that category.
    write_rule(tmp_path, "x", filename="tickets.yaml", text=_good())

    dags = build_dags(tmp_path)

    assert set(dags) == {"retention__support_tickets"}
    assert "does not match the file name tickets.yaml" in dags["retention__support_tickets"].doc_md


def test_item08_every_plan_task_reports_the_broken_rules(tmp_path, caplog):
    from retention.interfaces.airflow import report_invalid_rules

    write_rule(tmp_path, "customer_accounts", text=_good("customer_accounts"))
    broken = write_rule(tmp_path, "support_tickets", text=_good().replace("P3Y", "3 years"))

    with caplog.at_level(logging.ERROR, logger="retention.interfaces.airflow"):
        problems = report_invalid_rules(tmp_path)

    assert [(p.path, p.line, p.field) for p in problems] == [(str(broken), 5, "retain_for")]
    assert f"{broken}:5: retain_for:" in caplog.text
    assert "not being purged" in caplog.text



def test_item08_the_file_named_after_a_category_keeps_its_id_over_a_broken_copy(tmp_path):
    from retention.interfaces.airflow import build_dags

    # Both broken; the copy sorts first but must not take the id of the rule that ran.
    write_rule(tmp_path, "x", filename="a_copy.yaml", text=_good().replace("P3Y", "3 years"))
    write_rule(tmp_path, "support_tickets", text=_good().replace("P3Y", "3 years"))

    dags = build_dags(tmp_path)

    assert "support_tickets.yaml:5" in dags["retention__support_tickets"].doc_md
    assert "a_copy.yaml" in dags["retention__a_copy"].doc_md
