"""Rule loading and validation: what loads, what is refused, and where the refusal points.

No database is needed. Every refusal is checked down to the :class:`RuleProblem` it
produces (file, line, field, advice), because a user fixing a rule reads nothing else.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from retention.errors import RuleError, RuleProblem, TerminalError
from retention.rules.fields import IsoDuration
from retention.rules.loader import load_rule_file, load_rules
from retention.rules.models import RetentionRule

from conftest import write_rule

UTC = timezone.utc

# Line numbers in the tests below refer to this text.
VALID_RULE = """\
category: customer_accounts
description: Closed customer accounts
owner: crm-team
legal_basis: GDPR Art. 5(1)(e), storage limitation
retain_for: P2Y
schedule: "30 3 * * *"
action: delete
targets:
  - name: customers
    kind: sql
    connection: crm_db
    table: customers
    key: [id]
    age_column: closed_at
    where: {status: closed}
"""
#  1 category        6 schedule      11 connection
#  2 description     7 action        12 table
#  3 owner           8 targets       13 key
#  4 legal_basis     9 - name        14 age_column
#  5 retain_for     10 kind          15 where


def _rule(old: str = "", new: str = "") -> str:
    """VALID_RULE with the one occurrence of ``old`` replaced by ``new``."""
    if old:
        assert VALID_RULE.count(old) == 1, f"{old!r} must occur exactly once"
    return VALID_RULE.replace(old, new) if old else VALID_RULE


def _problems(path: Path) -> list[RuleProblem]:
    """The problems ``load_rule_file`` reports for ``path`` (it must refuse the file)."""
    with pytest.raises(RuleError) as caught:
        load_rule_file(path)
    assert caught.value.problems, "a RuleError must carry at least one problem"
    return caught.value.problems


def _only_problem(path: Path) -> RuleProblem:
    problems = _problems(path)
    assert len(problems) == 1, problems
    return problems[0]


def _problem_at(problems: list[RuleProblem], field: str) -> RuleProblem:
    found = [p for p in problems if p.field == field]
    assert len(found) == 1, f"expected one problem for {field!r}, got {problems}"
    return found[0]


# -- a valid rule ----------------------------------------------------------------------


def test_valid_rule_loads_with_every_field(tmp_path):
    path = write_rule(tmp_path, text=VALID_RULE)

    loaded = load_rule_file(path)

    rule = loaded.rule
    assert rule.category == "customer_accounts"
    assert rule.owner == "crm-team"
    assert rule.action == "delete"
    assert str(rule.retain_for) == "P2Y"
    assert (rule.retain_for.years, rule.retain_for.months, rule.retain_for.days) == (2, 0, 0)
    assert rule.schedule == "30 3 * * *"
    [target] = rule.targets
    assert (target.name, target.kind, target.connection, target.table) == (
        "customers", "sql", "crm_db", "customers"
    )
    assert target.key == ["id"]
    assert target.age_column == "closed_at"
    assert target.where == {"status": "closed"}
    assert target.max_batch_rows == 1_000_000
    assert target.location == "crm_db:customers"
    assert rule.target("customers") is target
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.display_path == f"{tmp_path.name}/customer_accounts.yaml"


def test_omitted_schedule_defaults_to_daily(tmp_path):
    path = write_rule(tmp_path, text=_rule('schedule: "30 3 * * *"\n', ""))

    assert load_rule_file(path).rule.schedule == "@daily"


def test_schema_qualified_table_is_accepted(tmp_path):
    path = write_rule(tmp_path, text=_rule("table: customers", "table: crm.customers"))

    assert load_rule_file(path).rule.targets[0].table == "crm.customers"


# -- retention periods and cutoffs -----------------------------------------------------

AS_OF = datetime(2025, 6, 15, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("duration", "cutoff"),
    [
        ("P2Y", datetime(2023, 6, 15, 12, 0, tzinfo=UTC)),
        ("P18M", datetime(2023, 12, 15, 12, 0, tzinfo=UTC)),
        ("P90D", datetime(2025, 3, 17, 12, 0, tzinfo=UTC)),
        ("PT36H", datetime(2025, 6, 14, 0, 0, tzinfo=UTC)),
        ("P1Y2M3DT4H", datetime(2024, 4, 12, 8, 0, tzinfo=UTC)),
        ("P2W", datetime(2025, 6, 1, 12, 0, tzinfo=UTC)),
        ("PT90M", datetime(2025, 6, 15, 10, 30, tzinfo=UTC)),
        ("p2y", datetime(2023, 6, 15, 12, 0, tzinfo=UTC)),
    ],
)
def test_cutoff_is_calendar_arithmetic(tmp_path, duration, cutoff):
    path = write_rule(tmp_path, text=_rule("retain_for: P2Y", f"retain_for: {duration}"))

    assert load_rule_file(path).rule.cutoff(AS_OF) == cutoff


def test_one_year_before_a_leap_day_is_the_last_day_of_february():
    leap_day = datetime(2024, 2, 29, 0, 0, tzinfo=UTC)

    assert IsoDuration.parse("P1Y").before(leap_day) == datetime(2023, 2, 28, tzinfo=UTC)


def test_as_of_with_an_offset_is_normalised_to_utc_before_subtracting():
    # 01:00 on 1 March at +02:00 is still 28 February in UTC; a month before that is
    # 28 January. Subtracting in local time first would give 31 January.
    as_of = datetime(2025, 3, 1, 1, 0, tzinfo=timezone(timedelta(hours=2)))

    cutoff = IsoDuration.parse("P1M").before(as_of)

    assert cutoff == datetime(2025, 1, 28, 23, 0, tzinfo=UTC)
    assert cutoff.utcoffset() == timedelta(0)


def test_as_of_without_time_zone_is_refused():
    with pytest.raises(ValueError, match="time zone"):
        IsoDuration.parse("P1D").before(datetime(2025, 6, 15, 12, 0))


@pytest.mark.parametrize("zero", ["P0D", "PT0S", "P0Y0M"])
def test_zero_retention_period_is_refused(tmp_path, zero):
    path = write_rule(tmp_path, text=_rule("retain_for: P2Y", f"retain_for: {zero}"))

    problem = _only_problem(path)

    assert (problem.path, problem.line, problem.field) == (str(path), 5, "retain_for")
    assert "zero" in problem.message


@pytest.mark.parametrize("text", ["2 years", "P", "PT", "P1.5Y", "P-1D", "P1YT", "730", "1Y"])
def test_malformed_duration_is_refused_with_examples(tmp_path, text):
    path = write_rule(tmp_path, text=_rule("retain_for: P2Y", f'retain_for: "{text}"'))

    problem = _only_problem(path)

    assert (problem.path, problem.line, problem.field) == (str(path), 5, "retain_for")
    assert repr(text) in problem.message
    assert "ISO 8601" in problem.message and "P90D" in problem.message


def test_a_period_that_validates_also_yields_a_cutoff(tmp_path):
    """A rule `validate` accepts must not crash `plan` or `run` when they take its cutoff."""
    path = write_rule(tmp_path, text=_rule("retain_for: P2Y", "retain_for: P3000Y"))

    try:
        rule = load_rule_file(path).rule
    except RuleError as exc:  # refusing it at load time is fine, if it says where
        [problem] = exc.problems
        assert (problem.line, problem.field) == (5, "retain_for")
    else:
        rule.cutoff(AS_OF)


# -- YAML that is not a rule -----------------------------------------------------------


def test_invalid_yaml_names_the_line(tmp_path):
    path = write_rule(tmp_path, text=_rule("owner: crm-team", "owner: crm: team"))

    problem = _only_problem(path)

    assert (problem.path, problem.line, problem.field) == (str(path), 3, None)
    assert "not valid YAML" in problem.message


def test_unclosed_bracket_points_at_the_bracket(tmp_path):
    # The parser only notices at line 5, or at the end of the file; the user has to
    # look at line 2.
    path = write_rule(tmp_path, text="category: customer_accounts\nkey: [id, email\n\n\nowner: crm-team\n")

    problem = _only_problem(path)

    assert problem.path == str(path)
    assert "not valid YAML" in problem.message
    assert problem.line == 2 or "line 2" in problem.message, (
        f"{problem}: names neither line 2, where the '[' is opened, nor mentions it"
    )


def test_unclosed_bracket_at_end_of_file_names_a_line_of_the_file(tmp_path):
    path = write_rule(tmp_path, text="category: customer_accounts\nkey: [id\n")

    problem = _only_problem(path)

    assert problem.line is not None and 1 <= problem.line <= 2, problem
    assert "not valid YAML" in problem.message


def test_self_referencing_alias_is_a_rule_problem_not_a_crash(tmp_path):
    path = write_rule(tmp_path, text=_rule("description: Closed customer accounts", "description: &d [*d]"))

    problems = _problems(path)

    assert all(p.path == str(path) for p in problems)


def test_duplicate_key_names_both_lines(tmp_path):
    path = write_rule(tmp_path, text=_rule("action: delete\n", "action: delete\nowner: someone-else\n"))

    problem = _only_problem(path)

    assert (problem.path, problem.line) == (str(path), 8)
    assert "'owner'" in problem.message and "line 3" in problem.message


def test_duplicate_key_inside_a_target_names_both_lines(tmp_path):
    path = write_rule(tmp_path, text=_rule("    age_column: closed_at\n",
                                           "    age_column: closed_at\n    table: orders\n"))

    problem = _only_problem(path)

    assert problem.line == 15
    assert "'table'" in problem.message and "line 12" in problem.message


def test_empty_file_is_refused(tmp_path):
    path = write_rule(tmp_path, text="")

    problem = _only_problem(path)

    assert (problem.path, problem.line) == (str(path), 1)
    assert "empty" in problem.message


def test_comment_only_file_is_empty(tmp_path):
    path = write_rule(tmp_path, text="# retention for closed accounts: to do\n")

    assert "empty" in _only_problem(path).message


@pytest.mark.parametrize("text", ["- category: customer_accounts\n- retain_for: P2Y\n", "just some text\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    path = write_rule(tmp_path, text=text)

    problem = _only_problem(path)

    assert (problem.path, problem.line) == (str(path), 1)
    assert "mapping" in problem.message


def test_non_utf8_file_is_refused(tmp_path):
    path = tmp_path / "customer_accounts.yaml"
    path.write_bytes(VALID_RULE.replace("Closed", "Geschlo\xdfen").encode("latin-1"))

    problem = _only_problem(path)

    assert problem.path == str(path)
    assert "UTF-8" in problem.message


# -- unknown and missing keys ----------------------------------------------------------


def test_unknown_top_level_key_suggests_the_right_one(tmp_path):
    path = write_rule(tmp_path, text=_rule("retain_for: P2Y", "retain_fr: P2Y"))

    problems = _problems(path)

    typo = _problem_at(problems, "retain_fr")
    assert (typo.path, typo.line) == (str(path), 5)
    assert "unknown key 'retain_fr'" in typo.message
    assert "did you mean 'retain_for'?" in typo.message
    missing = _problem_at(problems, "retain_for")
    assert missing.message == "is required"
    assert [p.line for p in problems] == sorted(p.line for p in problems)


def test_unknown_target_key_suggests_the_right_one(tmp_path):
    path = write_rule(tmp_path, text=_rule("connection: crm_db", "conection: crm_db"))

    problems = _problems(path)

    typo = _problem_at(problems, "targets[0].conection")
    assert (typo.path, typo.line) == (str(path), 11)
    assert "did you mean 'connection'?" in typo.message
    missing = _problem_at(problems, "targets[0].connection")
    assert (missing.line, missing.message) == (9, "is required")


def test_unknown_key_without_a_close_match_lists_the_allowed_keys(tmp_path):
    path = write_rule(tmp_path, text=_rule("    where: {status: closed}\n",
                                           "    where: {status: closed}\n    zzz: 1\n"))

    problem = _only_problem(path)

    assert (problem.line, problem.field) == (16, "targets[0].zzz")
    assert "allowed here:" in problem.message
    assert "age_column" in problem.message and "max_batch_rows" in problem.message
    assert "retain_for" not in problem.message  # a top-level key is not allowed in a target


def test_missing_table_points_at_the_target(tmp_path):
    path = write_rule(tmp_path, text=_rule("    table: customers\n", ""))

    problem = _only_problem(path)

    assert (problem.path, problem.line, problem.field) == (str(path), 9, "targets[0].table")
    assert problem.message == "is required"


def test_missing_top_level_field_points_at_the_document(tmp_path):
    path = write_rule(tmp_path, text=_rule("legal_basis: GDPR Art. 5(1)(e), storage limitation\n", ""))

    problem = _only_problem(path)

    assert (problem.line, problem.field, problem.message) == (1, "legal_basis", "is required")


def test_problem_in_second_target_names_its_index_and_line(tmp_path):
    second = (
        "  - name: orders\n"
        "    kind: sql\n"
        "    connection: crm_db\n"
        "    table: orders\n"
        "    key: [id]\n"
        "    age_column: created-at\n"
    )
    path = write_rule(tmp_path, text=VALID_RULE + second)

    problem = _only_problem(path)

    assert (problem.line, problem.field) == (21, "targets[1].age_column")


# -- schedules -------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ['"61 3 * * *"', '"0 25 * * *"', '"* * * *"', '"0 0 * * * *"',
                                      '"@every_minute"', "5", '"daily"'])
def test_invalid_schedule_is_refused(tmp_path, schedule):
    path = write_rule(tmp_path, text=_rule('schedule: "30 3 * * *"', f"schedule: {schedule}"))

    problem = _only_problem(path)

    assert (problem.path, problem.line, problem.field) == (str(path), 6, "schedule")
    assert "is not a schedule" in problem.message
    assert "5-field cron" in problem.message and "@daily" in problem.message


@pytest.mark.parametrize(
    ("schedule", "loaded"),
    [('"0 3 * * 1-5"', "0 3 * * 1-5"), ('"*/15 * * * *"', "*/15 * * * *"), ('"@weekly"', "@weekly"),
     ('"@quarterly"', "@quarterly"), ("null", None), ("", None)],
)
def test_valid_schedule_loads(tmp_path, schedule, loaded):
    path = write_rule(tmp_path, text=_rule('schedule: "30 3 * * *"', f"schedule: {schedule}"))

    assert load_rule_file(path).rule.schedule == loaded


# -- identifiers: nothing but plain names reaches SQL ----------------------------------


@pytest.mark.parametrize(
    ("old", "new", "line", "field"),
    [
        ("table: customers", 'table: "customers; drop table orders"', 12, "targets[0].table"),
        ("table: customers", "table: crm.public.customers", 12, "targets[0].table"),
        ("table: customers", 'table: "\\"customers\\""', 12, "targets[0].table"),
        ("key: [id]", 'key: ["id; --"]', 13, "targets[0].key[0]"),
        ("key: [id]", "key: [id, 1st]", 13, "targets[0].key[1]"),
        ("age_column: closed_at", "age_column: closed at", 14, "targets[0].age_column"),
        ("age_column: closed_at", "age_column: closed_at)--", 14, "targets[0].age_column"),
        ("age_column: closed_at", f"age_column: {'c' * 64}", 14, "targets[0].age_column"),
        ("name: customers", "name: customer-rows", 9, "targets[0].name"),
        ("connection: crm_db", "connection: crm db", 11, "targets[0].connection"),
    ],
)
def test_identifier_that_is_not_a_plain_name_is_refused(tmp_path, old, new, line, field):
    path = write_rule(tmp_path, text=_rule(old, new))

    problem = _only_problem(path)

    assert (problem.path, problem.line, problem.field) == (str(path), line, field)


def test_injection_in_table_name_is_quoted_back_with_advice(tmp_path):
    path = write_rule(tmp_path, text=_rule("table: customers", 'table: "customers; drop table orders"'))

    problem = _only_problem(path)

    assert "'customers; drop table orders' is not a table name" in problem.message
    assert "schema.table" in problem.message


def test_identifier_of_63_characters_is_accepted(tmp_path):
    path = write_rule(tmp_path, text=_rule("age_column: closed_at", f"age_column: {'c' * 63}"))

    assert load_rule_file(path).rule.targets[0].age_column == "c" * 63


@pytest.mark.parametrize("category", ["Customer-Accounts", "customer accounts", "1accounts", "customer-accounts"])
def test_category_must_be_a_lower_case_name(tmp_path, category):
    path = write_rule(tmp_path, text=_rule("category: customer_accounts", f"category: {category}"))

    problem = _only_problem(path)

    assert (problem.path, problem.line, problem.field) == (str(path), 1, "category")
    assert repr(category) in problem.message and "lower-case" in problem.message


def test_key_listed_twice_is_refused(tmp_path):
    path = write_rule(tmp_path, text=_rule("key: [id]", "key: [id, id]"))

    problem = _only_problem(path)

    assert (problem.line, problem.field) == (13, "targets[0].key")
    assert "more than once: id" in problem.message


def test_duplicate_target_names_are_refused(tmp_path):
    second = (
        "  - name: customers\n"
        "    kind: sql\n"
        "    connection: billing_db\n"
        "    table: invoices\n"
        "    key: [id]\n"
        "    age_column: issued_at\n"
    )
    path = write_rule(tmp_path, text=VALID_RULE + second)

    problem = _only_problem(path)

    second_name_line = VALID_RULE.count("\n") + 1
    assert (problem.path, problem.line, problem.field) == (str(path), second_name_line, "targets[1].name")
    assert "'customers' is already used on line 9" in problem.message


# -- where filters ---------------------------------------------------------------------


def test_where_with_in_list_loads(tmp_path):
    path = write_rule(tmp_path, text=_rule("where: {status: closed}",
                                           "where: {status: {in: [closed, deleted]}, tier: 2}"))

    assert load_rule_file(path).rule.targets[0].where == {"status": {"in": ["closed", "deleted"]}, "tier": 2}


@pytest.mark.parametrize(
    ("where", "says"),
    [
        ("{status: {like: 'clos%'}}", "unknown operator 'like'"),
        ("{status: {in: closed}}", "non-empty list"),
        ("{status: {in: []}}", "non-empty list"),
        ("{status: {in: [closed, [a]]}}", "plain strings, numbers or booleans"),
        ("{status: {in: [closed, null]}}", "plain strings, numbers or booleans"),
        ("{status: [closed, deleted]}", "got a list"),
        ("[status, closed]", "expected a mapping"),
    ],
)
def test_invalid_where_is_refused(tmp_path, where, says):
    path = write_rule(tmp_path, text=_rule("where: {status: closed}", f"where: {where}"))

    problem = _only_problem(path)

    assert (problem.path, problem.line) == (str(path), 15)
    assert problem.field is not None and problem.field.startswith("targets[0].where")
    assert says in problem.message


def test_where_column_must_be_a_plain_name(tmp_path):
    path = write_rule(tmp_path, text=_rule("where: {status: closed}", "where: {'status = status or 1': 1}"))

    problem = _only_problem(path)

    assert problem.line == 15 and problem.field.startswith("targets[0].where")
    assert "not a plain SQL identifier" in problem.message


@pytest.mark.parametrize("word", ["NO", "no", "yes", "Y", "on", "Off"])
def test_yaml_11_boolean_words_stay_strings(tmp_path, word):
    path = write_rule(tmp_path, text=_rule("where: {status: closed}", f"where: {{country: {word}, active: true}}"))

    where = load_rule_file(path).rule.targets[0].where

    assert where == {"country": word, "active": True}
    assert where["active"] is True


def test_false_is_a_boolean_in_any_case(tmp_path):
    path = write_rule(tmp_path, text=_rule("where: {status: closed}", "where: {a: false, b: FALSE, c: False}"))

    assert load_rule_file(path).rule.targets[0].where == {"a": False, "b": False, "c": False}


# -- a directory of rules --------------------------------------------------------------


def test_load_rules_returns_every_category_in_file_order(tmp_path):
    write_rule(tmp_path, "support_tickets")
    write_rule(tmp_path, "customer_accounts")

    rules = load_rules(tmp_path)

    assert [r.rule.category for r in rules] == ["customer_accounts", "support_tickets"]


def test_duplicate_category_is_a_problem_of_the_second_file(tmp_path):
    # Files are named after their category, so only .yaml and .yml can collide.
    first = write_rule(tmp_path, "customer_accounts")
    second = write_rule(tmp_path, "customer_accounts", filename="customer_accounts.yml")

    with pytest.raises(RuleError) as caught:
        load_rules(tmp_path)

    [problem] = caught.value.problems
    assert (problem.path, problem.line, problem.field) == (str(second), 1, "category")
    assert "'customer_accounts'" in problem.message and str(first) in problem.message


def test_one_invalid_file_fails_the_whole_directory(tmp_path):
    write_rule(tmp_path, "customer_accounts")
    bad = write_rule(tmp_path, "support_tickets", retain_for="P1.5Y")

    with pytest.raises(RuleError) as caught:
        load_rules(tmp_path, category="customer_accounts")

    [problem] = caught.value.problems
    assert (problem.path, problem.line, problem.field) == (str(bad), 5, "retain_for")


def test_every_invalid_file_is_reported_at_once(tmp_path):
    first = write_rule(tmp_path, "customer_accounts", retain_for="2 years")
    second = write_rule(tmp_path, "support_tickets", targets=[{"table": '"t; drop table x"'}])

    with pytest.raises(RuleError) as caught:
        load_rules(tmp_path)

    assert [(p.path, p.line, p.field) for p in caught.value.problems] == [
        (str(first), 5, "retain_for"),
        (str(second), 12, "targets[0].table"),
    ]


def test_unknown_category_suggests_the_close_one(tmp_path):
    write_rule(tmp_path, "customer_accounts")
    write_rule(tmp_path, "support_tickets")

    with pytest.raises(RuleError) as caught:
        load_rules(tmp_path, category="customer_account")

    [problem] = caught.value.problems
    assert (problem.path, problem.field) == (str(tmp_path), "category")
    assert "did you mean 'customer_accounts'?" in problem.message


def test_unknown_category_without_a_close_one_lists_the_known(tmp_path):
    write_rule(tmp_path, "customer_accounts")
    write_rule(tmp_path, "support_tickets")

    with pytest.raises(RuleError) as caught:
        load_rules(tmp_path, category="invoices")

    assert "known: customer_accounts, support_tickets" in caught.value.problems[0].message


def test_known_category_selects_only_its_rule(tmp_path):
    write_rule(tmp_path, "customer_accounts")
    write_rule(tmp_path, "support_tickets")

    [chosen] = load_rules(tmp_path, category="support_tickets")

    assert chosen.rule.category == "support_tickets"


def test_directory_without_rule_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not a rule")

    with pytest.raises(RuleError) as caught:
        load_rules(tmp_path)

    assert "no rule files" in caught.value.problems[0].message


def test_missing_directory_is_refused(tmp_path):
    with pytest.raises(RuleError) as caught:
        load_rules(tmp_path / "nowhere")

    assert "does not exist" in caught.value.problems[0].message


def test_rule_error_is_terminal_and_reads_file_line_field():
    problem = RuleProblem("rules/x.yaml", 5, "retain_for", "is required")

    error = RuleError([problem])

    assert isinstance(error, TerminalError)
    assert str(problem) == "rules/x.yaml:5: retain_for: is required"
    assert str(error) == str(problem)


def test_rule_model_refuses_unknown_fields_directly():
    """The model itself is strict, not only the file loader."""
    with pytest.raises(ValueError, match="extra"):
        RetentionRule.model_validate({"category": "x", "unexpected": 1})
