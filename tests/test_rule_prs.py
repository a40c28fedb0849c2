"""Issue #11 item 4 (rule PRs: schema, modeline, diff) and item 5 (the demo's env file)."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from retention.interfaces.cli import main
from retention.interfaces.ruleschema import schema_text

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "retention_rules"
MODELINE = "# yaml-language-server: $schema=../docs/rule.schema.json"


def _rule_files() -> list[Path]:
    return sorted(p for p in RULES.glob("*.yaml") if not p.name.startswith("_"))


def test_item04_committed_schema_is_current():
    committed = (ROOT / "docs" / "rule.schema.json").read_text(encoding="utf-8")
    assert committed == schema_text(), "docs/rule.schema.json is stale: run `make schema` and commit it"


def test_item04_schema_command_prints_valid_schema_accepting_every_rule(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for path in _rule_files():
        errors = [e.message for e in validator.iter_errors(yaml.safe_load(path.read_text()))]
        assert errors == [], f"{path.name}: {errors}"


@pytest.mark.parametrize("field, value", [
    ("retain_for", "2 years"), ("retain_for", "P"), ("action", "erase"), ("unknown_key", 1),
])
def test_item04_schema_rejects_what_the_loader_rejects(field, value):
    validator = jsonschema.Draft202012Validator(json.loads(schema_text()))
    rule = yaml.safe_load((RULES / "orders.yaml").read_text())
    rule[field] = value
    assert list(validator.iter_errors(rule)), f"{field}={value!r} passed the schema"


def test_item04_schema_describes_parsed_values_as_written():
    defs = json.loads(schema_text())["$defs"]
    assert defs["IsoDuration"]["type"] == "string"
    assert defs["KeyDatePattern"]["type"] == "string"
    validator = jsonschema.Draft202012Validator({**defs["Strategy"], "$defs": defs})
    for good in ("hash", None, {"redact": {"keep_last": 4}}, {"generalize": "year"}, {"generalize": {"prefix": 3}}):
        assert validator.is_valid(good), good
    for bad in ("md5", {"redact": {"keep_last": 99}}, {"generalize": "week"}):
        assert not validator.is_valid(bad), bad


def test_item04_rule_files_carry_the_modeline_and_config_files_do_not():
    for path in _rule_files():
        assert path.read_text().splitlines()[0] == MODELINE, path.name
    for path in RULES.glob("_*.yaml"):
        assert MODELINE not in path.read_text(), path.name
    assert (RULES / "../docs/rule.schema.json").resolve().is_file()


# -- retention diff on a git repository fixture ------------------------------------------


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def rules_repo(tmp_path):
    """A git repository whose first commit holds this project's rules (the base)."""
    repo = tmp_path / "repo"
    shutil.copytree(RULES, repo / "retention_rules")
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@example.com", "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "base")
    return repo


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path.name}"
    path.write_text(text.replace(old, new, 1))


def _diff(repo: Path, capsys, *extra: str) -> tuple[int, str]:
    code = main(["diff", "--base", "main", "--rules", str(repo / "retention_rules"), *extra])
    return code, capsys.readouterr().out


def test_item04_diff_flags_shortened_period_and_raised_max_fraction(rules_repo, capsys):
    rules = rules_repo / "retention_rules"
    _edit(rules / "orders.yaml", "retain_for: P10Y", "retain_for: P9Y")
    _edit(rules / "orders.yaml", "age_column: placed_at\n", "age_column: placed_at\n    max_fraction: 0.9\n")
    code, out = _diff(rules_repo, capsys)
    assert code == 0
    assert "#### `orders` (changed)" in out
    assert "⚠️ **retention shortened: `P10Y` → `P9Y`**" in out
    assert "⚠️ **target `orders` blast radius widened: max_fraction 0.5 → 0.9**" in out
    assert "need a second look" in out
    assert main(["diff", "--base", "main", "--rules", str(rules), "--fail-on-flag"]) == 1


def test_item04_diff_lengthening_and_lowering_are_not_flagged(rules_repo, capsys):
    rules = rules_repo / "retention_rules"
    _edit(rules / "orders.yaml", "retain_for: P10Y", "retain_for: P11Y")
    _edit(rules / "orders.yaml", "age_column: placed_at\n", "age_column: placed_at\n    max_fraction: 0.1\n")
    code, out = _diff(rules_repo, capsys, "--fail-on-flag")
    assert code == 0, out
    assert "retention lengthened: `P10Y` → `P11Y`" in out
    assert "max_fraction lowered" in out
    assert "⚠️" not in out


def test_item04_diff_month_against_days_compares_lengths_not_text(rules_repo, capsys):
    rules = rules_repo / "retention_rules"
    base = yaml.safe_load((rules / "web_sessions.yaml").read_text())["retain_for"]
    # One month is 28 to 31 days: P30D is shorter than P1M in some months, so it is flagged.
    _edit(rules / "web_sessions.yaml", f"retain_for: {base}", "retain_for: P1M")
    _git(rules_repo, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qam", "P1M")
    _edit(rules / "web_sessions.yaml", "retain_for: P1M", "retain_for: P30D")
    code, out = _diff(rules_repo, capsys)
    assert "retention shortened: `P1M` → `P30D`" in out


def test_item04_diff_flags_removed_max_records_targets_and_actions(rules_repo, capsys):
    rules = rules_repo / "retention_rules"
    # Base with a max_records limit, then remove it in the change.
    _edit(rules / "orders.yaml", "age_column: placed_at\n", "age_column: placed_at\n    max_records: 1000\n")
    _git(rules_repo, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qam", "limit")
    _edit(rules / "orders.yaml", "    max_records: 1000\n", "")
    _edit(rules / "orders.yaml", "    table: orders\n", "    table: orders_archive\n")
    (rules / "web_sessions.yaml").unlink()
    code, out = _diff(rules_repo, capsys)
    assert "max_records 1000 removed" in out
    assert "now purges another place: `shop_db:orders` → `shop_db:orders_archive`" in out
    assert "#### `web_sessions` (removed)" in out and "no longer purged" in out


def test_item04_diff_added_category_and_target_are_flagged(rules_repo, capsys):
    rules = rules_repo / "retention_rules"
    orders = (rules / "orders.yaml").read_text()
    (rules / "old_orders.yaml").write_text(orders.replace("category: orders", "category: old_orders"))
    _edit(rules / "orders.yaml", "targets:\n", "targets:\n  - {name: extra, kind: sql, connection: shop_db, "
          "table: extra, key: [id], age_column: placed_at}\n")
    code, out = _diff(rules_repo, capsys)
    assert "#### `old_orders` (added)" in out and "new category" in out
    assert "target added: `extra`" in out


def test_item04_diff_without_changes_says_so(rules_repo, capsys):
    code, out = _diff(rules_repo, capsys)
    assert code == 0 and "No change to the retention schedule." in out


def test_item04_diff_free_text_cannot_inject_markdown(rules_repo, capsys):
    rules = rules_repo / "retention_rules"
    _edit(rules / "orders.yaml", "owner: checkout-team", "owner: checkout-team2")
    text = (rules / "orders.yaml").read_text()
    line = next(l for l in text.splitlines() if l.startswith("legal_basis:"))
    _edit(rules / "orders.yaml", line, 'legal_basis: "<img src=x onerror=alert(1)> [click](http://evil) | `x`"')
    code, out = _diff(rules_repo, capsys)
    assert "<img" not in out and "[click](" not in out and "\\|" in out and "&lt;img" in out


@pytest.mark.parametrize("base", ["--output=/tmp/x", "no-such-branch", "main;rm -rf /", ""])
def test_item04_diff_bad_base_is_one_line_error(rules_repo, capsys, base):
    code = main(["diff", f"--base={base}", "--rules", str(rules_repo / "retention_rules")])
    captured = capsys.readouterr()
    assert code == 2
    assert "--base" in captured.err and "Traceback" not in captured.err
    assert captured.out == ""


def test_item04_diff_invalid_head_rules_exit_2_naming_the_file(rules_repo, capsys):
    rules = rules_repo / "retention_rules"
    _edit(rules / "orders.yaml", "retain_for: P10Y", "retain_for: ten years")
    code = main(["diff", "--base", "main", "--rules", str(rules)])
    err = capsys.readouterr().err
    assert code == 2 and "orders.yaml:" in err and "retain_for" in err


def test_item04_diff_broken_base_file_is_listed_not_fatal(rules_repo, capsys):
    rules = rules_repo / "retention_rules"
    good = (rules / "orders.yaml").read_text()
    (rules / "orders.yaml").write_text(good.replace("retain_for: P10Y", "retain_for: nonsense"))
    _git(rules_repo, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qam", "break")
    (rules / "orders.yaml").write_text(good)
    code, out = _diff(rules_repo, capsys)
    assert code == 0
    assert "did not load" in out and "main:orders.yaml" in out
    assert "#### `orders` (added)" in out


def test_item04_diff_does_not_touch_the_work_tree(rules_repo, capsys):
    rules = rules_repo / "retention_rules"
    _edit(rules / "orders.yaml", "retain_for: P10Y", "retain_for: P9Y")
    before = _git(rules_repo, "status", "--porcelain")
    _diff(rules_repo, capsys)
    assert _git(rules_repo, "status", "--porcelain") == before
    assert "P9Y" in (rules / "orders.yaml").read_text()


def test_item04_ci_recipe_runs_validate_diff_and_plan():
    recipe = (ROOT / "docs" / "rule-prs.md").read_text()
    workflow = yaml.safe_load(recipe.split("```yaml", 1)[1].split("```", 1)[0])
    steps = " ".join(str(s.get("run", "")) for s in workflow["jobs"]["retention-rules"]["steps"])
    for command in ("retention validate", "retention diff --base", "retention plan --json"):
        assert command in steps, command
    assert any(s.get("with", {}).get("fetch-depth") == 0 for s in workflow["jobs"]["retention-rules"]["steps"])


# -- item 5: the demo leaves something to explore -----------------------------------------


def test_item05_demo_env_file_sourced_reaches_the_demo_data(tmp_path):
    from retention.interfaces import demo as demo_module

    demo = tmp_path / "a demo's dir"
    (demo / "keys").mkdir(parents=True)
    (demo / "keys" / "hash.key").write_text("00ff" * 16 + "\n")
    databases = {"shop_db": demo / "data" / "shop.db", "crm_db": demo / "data" / "crm.db"}
    env = demo_module.environment(demo, databases, "http://127.0.0.1:1")
    path = demo_module.write_env_file(demo, env)
    assert path == demo / "env" and (path.stat().st_mode & 0o077) == 0
    text = path.read_text()
    assert "00ff" * 16 not in text, "the HMAC key is read from its file, not copied"
    assert "AWS_DEFAULT" not in text, "the demo's S3 is gone; no connection to a dead port"
    names = ["AIRFLOW_CONN_SHOP_DB", "AIRFLOW_CONN_CRM_DB", "AIRFLOW_CONN_RETENTION_AUDIT",
             "RETENTION_RULES_DIR", "AIRFLOW_HOME", demo_module.SIGNING_KEY_ENV, demo_module.CHECKPOINTS_ENV]
    script = f"source {shlex.quote(str(path))} && " + " && ".join(f'printf "%s\\0" "${n}"' for n in names + [demo_module.HASH_KEY_ENV])
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin"}).stdout
    values = out.split("\0")[:-1]
    assert values == [env[n] for n in names] + ["00ff" * 16]
    message = demo_module.explore_text(demo, path)
    assert f"source {path}" in message and "retention certificates" in message and "retention verify" in message


def test_item04_diff_base_directory_named_like_a_rule_is_not_read(rules_repo, capsys):
    rules = rules_repo / "retention_rules"
    (rules / "trap.yaml").mkdir()
    (rules / "trap.yaml" / "x.txt").write_text("not a rule")
    _git(rules_repo, "add", "-A")
    _git(rules_repo, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "dir")
    shutil.rmtree(rules / "trap.yaml")
    code, out = _diff(rules_repo, capsys)
    assert code == 0 and "No change to the retention schedule." in out, out
