"""``retention schedule``: the published retention schedule, generated from the rules."""

from __future__ import annotations

import csv
import io
import json

import pytest

from retention.interfaces.cli import main
from retention.interfaces.schedule import schedule_entries
from retention.rules.loader import load_rules

from conftest import write_rule

ARCHIVE_RULE = """\
category: orders
description: "Orders | closed =HYPERLINK(\\"x\\") <script>alert(1)</script>"
owner: shop-team
legal_basis: "=cmd|' /C calc'!A0"
retain_for: P1Y6M
action: archive
archive: {connection: aws_default, bucket: shop-archive, prefix: orders/}
targets:
  - {name: orders, kind: sql, connection: shop_db, table: orders, key: [id], age_column: closed_at}
  - {name: receipts, kind: s3, connection: aws_default, bucket: shop-receipts, prefix: r/}
"""


@pytest.fixture
def rules(tmp_path):
    directory = tmp_path / "rules"
    write_rule(directory, "customer_accounts", retain_for="P2Y")
    write_rule(directory, "orders", text=ARCHIVE_RULE)
    return directory


def schedule(capsys, rules, fmt) -> str:
    assert main(["schedule", "--rules", str(rules), "--format", fmt]) == 0
    return capsys.readouterr().out


def test_item03_entries_say_how_long_in_words(rules):
    accounts, orders = schedule_entries(load_rules(rules))

    assert accounts.category == "customer_accounts" and accounts.retention == "2 years after closed at"
    assert accounts.then == "deleted" and accounts.owner == "test-team" and accounts.legal_basis == "Tests"
    assert orders.period == "1 year and 6 months"
    assert orders.starts == "closed at (orders) / the object was last modified (receipts)"
    assert orders.then.startswith("archived to s3://shop-archive/orders/") and orders.then.endswith("deleted from the source")


def test_item03_json_and_csv_carry_every_entry(rules, capsys):
    as_json = json.loads(schedule(capsys, rules, "json"))
    rows = list(csv.DictReader(io.StringIO(schedule(capsys, rules, "csv"))))

    assert [e["category"] for e in as_json] == ["customer_accounts", "orders"]
    assert as_json[0]["retention"] == "2 years after closed at" and as_json[0]["retain_for"] == "P2Y"
    assert [r["category"] for r in rows] == ["customer_accounts", "orders"]
    assert rows[1]["legal_basis"].startswith("'=")  # a spreadsheet shows it, never runs it
    assert rows[1]["targets"] == "orders (shop_db:orders); receipts (s3://shop-receipts/r/)"


def test_item03_markdown_text_cannot_break_the_table(rules, capsys):
    text = schedule(capsys, rules, "md")
    rows = [line for line in text.splitlines() if line.startswith("| ")]

    assert len(rows) == 3  # header and two entries
    assert all(line.count("|") - line.count("\\|") == 7 for line in rows)
    assert "<script>" not in text and "&lt;script&gt;" in text
    assert "2 years after closed at" in rows[1]


def test_item03_html_escapes_rule_text(rules, capsys):
    text = schedule(capsys, rules, "html")

    assert "<script>alert" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "1 year and 6 months after closed at (orders)" in text


def test_item03_invalid_rules_are_refused_in_one_line(tmp_path, capsys):
    write_rule(tmp_path / "rules", "customer_accounts", retain_for="P2X")
    assert main(["schedule", "--rules", str(tmp_path / "rules")]) == 2
    err = capsys.readouterr().err
    assert "customer_accounts.yaml:5" in err and "retain_for" in err and "Traceback" not in err


def test_item03_unwritable_out_is_refused(rules, tmp_path, capsys):
    assert main(["schedule", "--rules", str(rules), "--out", str(tmp_path / "no" / "such" / "dir.md")]) == 2
    assert "cannot write" in capsys.readouterr().err
