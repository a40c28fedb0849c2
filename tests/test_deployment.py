"""What a platform team installs: the compose topology, Airflow pools per connection, the extras.

No Docker engine runs here, so docker-compose.yml is checked against the Compose
Specification's JSON schema and by content; the SQL it runs against the audit database is
run against the real local PostgreSQL.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from conftest import write_rule

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"

AIRFLOW_SERVICES = ["airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
                    "airflow-triggerer", "airflow-worker"]
ONE_SHOT = {"airflow-init", "minio-init"}
DEFAULT_PORTS = {5432, 3306, 8080, 9000, 9001, 6379}
INTERPOLATION = re.compile(r"^\$\{([A-Z0-9_]+):\?[^}]*\}$")
# Read by the package, and on purpose not set for the Airflow services:
NOT_FOR_AIRFLOW = {
    "RETENTION_FAILPOINTS": "crash-test hooks; must never be set in a deployment",
    "RETENTION_DEMO_DIR": "only `make demo` reads it",
    "USER": "who places a legal hold: the operator running `retention hold add`",
    "RETENTION_KEYRING": "the verifier's keyring: read by `retention verify`, kept by whoever checks the chain",
}


@pytest.fixture(scope="module")
def compose() -> dict:
    """docker-compose.yml as Compose reads it (YAML merge keys resolved)."""
    return yaml.safe_load(COMPOSE.read_text())


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


# -- item 1: the compose file ----------------------------------------------------------------


def test_item01_compose_file_is_valid_against_the_compose_specification(compose):
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose)]

    assert errors == []
    # and the check is real: a typo in a service key is caught
    broken = json.loads(json.dumps(compose))
    broken["services"]["airflow-scheduler"]["helthcheck"] = broken["services"]["airflow-scheduler"].pop("healthcheck")
    assert list(validator.iter_errors(broken))


def test_item01_services_are_airflows_reference_topology(compose):
    assert set(compose["services"]) == {
        *AIRFLOW_SERVICES, "redis", "airflow-db", "audit-db", "demo-postgres", "demo-mariadb", "minio", "minio-init",
    }
    env = _env(compose["services"]["airflow-worker"])
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    # the metadata database is its own server, not the audit database
    assert "@airflow-db:" in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert "@audit-db:" in env["AIRFLOW_CONN_RETENTION_AUDIT"]
    assert "sqlite" not in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    for name in AIRFLOW_SERVICES[1:]:
        assert "standalone" not in str(compose["services"][name].get("command"))
    assert [compose["services"][n]["command"] for n in AIRFLOW_SERVICES[1:]] == [
        "api-server", "scheduler", "dag-processor", "triggerer", "celery worker"]


def test_item01_every_dependency_waits_for_health_and_every_service_restarts(compose):
    services = compose["services"]
    for name, service in services.items():
        for dependency, spec in (service.get("depends_on") or {}).items():
            condition = spec["condition"]
            if dependency in ONE_SHOT:
                assert condition == "service_completed_successfully", (name, dependency)
            else:
                assert condition == "service_healthy", (name, dependency)
                assert "healthcheck" in services[dependency], dependency
        if name in ONE_SHOT:
            assert service["restart"] == "no", name
        else:
            assert service["restart"] == "unless-stopped", name
            assert service["healthcheck"]["test"], name
    for name in AIRFLOW_SERVICES[1:]:
        assert services[name]["depends_on"]["airflow-init"] == {"condition": "service_completed_successfully"}
        for store in ("airflow-db", "audit-db", "redis", "demo-postgres", "demo-mariadb"):
            assert services[name]["depends_on"][store] == {"condition": "service_healthy"}


def test_item01_images_are_pinned_and_the_package_installs_with_its_dependencies(compose):
    from importlib.metadata import version

    images = {name: s["image"] for name, s in compose["services"].items() if "build" not in s}
    for name, image in images.items():
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest", name
        assert re.search(r"\d+\.\d+|RELEASE\.\d{4}-", tag), f"{name}: {image} is not a pinned version"
    dockerfile = compose["x-airflow-common"]["build"]["dockerfile_inline"]
    base = re.search(r"^FROM (\S+)$", dockerfile, re.M).group(1)
    assert base == f"apache/airflow:{version('apache-airflow')}-python3.11"
    install = next(line for line in dockerfile.splitlines() if "pip install" in line)
    assert "--no-deps" not in install and "/opt/retention[airflow]" in install
    assert "constraints-" + version("apache-airflow") in dockerfile
    # nothing installs at container start
    assert "pip install" not in COMPOSE.read_text().split("dockerfile_inline", 1)[1].split("image:", 1)[1]
    for path in ("pyproject.toml", "plugins", "dags", "retention_rules"):
        assert f"COPY --chown=airflow:0 {path}" in dockerfile, path


def test_item01_no_secret_is_written_in_the_file_and_make_env_provides_each(compose, tmp_path):
    secretive = re.compile(r"PASSWORD|SECRET|FERNET|HASH_KEY|TOKEN")
    required: set[str] = set(re.findall(r"\$\{([A-Z0-9_]+):\?", COMPOSE.read_text()))
    for name, service in compose["services"].items():
        for key, value in _env(service).items():
            if secretive.search(key):
                assert INTERPOLATION.match(value), f"{name}: {key} is written in the file"
            if key.startswith("AIRFLOW_CONN_") or key.endswith("SQL_ALCHEMY_CONN") or key.endswith("_URL"):
                # a URI's password, or a JSON connection's, is always an interpolation
                for secret in re.findall(r"://[^:/@]*:([^@]*)@", value) + re.findall(r'"password": "([^"]*)"', value):
                    assert INTERPOLATION.match(secret), f"{name}: {key} carries a literal password"
    for config in compose["configs"].values():
        assert not re.search(r"PASSWORD\s+'[^:]", config["content"]), "a password literal in SQL"
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    tracked = subprocess.run(["git", "ls-files", ".env"], cwd=ROOT, capture_output=True, text=True).stdout
    assert tracked == ""
    # `make env` writes every variable the file requires, and never overwrites
    (tmp_path / "Makefile").write_text((ROOT / "Makefile").read_text())
    subprocess.run(["make", "-s", "env"], cwd=tmp_path, check=True, capture_output=True)
    first = (tmp_path / ".env").read_text()
    written = dict(line.split("=", 1) for line in first.splitlines() if line and not line.startswith("#"))
    assert required <= set(written), required - set(written)
    assert all(len(v) >= 32 and re.fullmatch(r"[A-Za-z0-9_=-]+", v) for v in written.values())
    assert (tmp_path / ".env").stat().st_mode & 0o077 == 0
    subprocess.run(["make", "-s", "env"], cwd=tmp_path, check=True, capture_output=True)
    assert (tmp_path / ".env").read_text() == first


def test_item01_host_ports_are_configurable_and_off_the_defaults(compose):
    published = []
    for name, service in compose["services"].items():
        for mapping in service.get("ports", []):
            host, _, container = str(mapping).rpartition(":")
            match = re.fullmatch(r"\$\{([A-Z0-9_]+):-(\d+)\}", host)
            assert match, f"{name}: host port {host!r} is not configurable"
            assert int(match.group(2)) not in DEFAULT_PORTS, f"{name}: {mapping} clashes with a local server"
            published.append(int(match.group(2)))
    assert len(published) == len(set(published)) and published


def test_item01_stateful_services_keep_their_data_in_named_volumes(compose):
    declared = set(compose["volumes"])
    data_dirs = {"airflow-db": "/var/lib/postgresql/data", "audit-db": "/var/lib/postgresql/data",
                 "demo-postgres": "/var/lib/postgresql/data", "demo-mariadb": "/var/lib/mysql",
                 "redis": "/data", "minio": "/data"}
    for name, path in data_dirs.items():
        mounts = dict(v.split(":")[:2][::-1] for v in compose["services"][name]["volumes"])
        assert mounts.get(path) in declared, name
    keys = compose["services"]["airflow-worker"]["volumes"]
    assert "retention-keys:/opt/retention/keys:ro" in keys


def _env_vars_the_package_reads() -> set[str]:
    found: set[str] = set()
    for path in (ROOT / "plugins" / "retention").rglob("*.py"):
        text = path.read_text()
        found |= set(re.findall(r"""environ(?:\.get)?\(\s*["']([A-Z0-9_]+)["']""", text))
        found |= set(re.findall(r"""environ\[\s*["']([A-Z0-9_]+)["']\s*\]""", text))
        found |= set(re.findall(r"""^[A-Z0-9_]*_ENV\s*=\s*["']([A-Z0-9_]+)["']""", text, re.M))
    return found


def test_item01_airflow_services_get_every_env_var_the_package_reads(compose):
    from retention.rules.loader import scan_rules

    wanted = _env_vars_the_package_reads()
    assert {"RETENTION_SIGNING_KEY", "RETENTION_HASH_KEY", "RETENTION_CHECKPOINTS"} <= wanted  # the grep works
    wanted -= set(NOT_FOR_AIRFLOW)
    rules, _ = scan_rules(ROOT / "retention_rules")
    assert rules
    connections = {t.connection for r in rules for t in r.rule.targets}
    connections |= {r.rule.archive.connection for r in rules if r.rule.archive}
    wanted |= {f"AIRFLOW_CONN_{c.upper()}" for c in connections | {"retention_audit"}}
    for name in AIRFLOW_SERVICES:
        env = _env(compose["services"][name])
        assert wanted - set(env) == set(), name
        assert "RETENTION_FAILPOINTS" not in env
        assert env["RETENTION_SIGNING_KEY"].startswith("/opt/retention/keys/")
        assert env["RETENTION_CHECKPOINTS"].startswith("s3://")
    # the audit owner's connection is known to the init step only
    assert "AIRFLOW_CONN_RETENTION_AUDIT_OWNER" in _env(compose["services"]["airflow-init"])
    assert all("AIRFLOW_CONN_RETENTION_AUDIT_OWNER" not in _env(compose["services"][n]) for n in AIRFLOW_SERVICES[1:])


def test_item01_init_steps_migrate_create_pools_keys_schema_and_buckets(compose):
    from retention.rules.loader import scan_rules

    init = compose["services"]["airflow-init"]
    script = "\n".join(init["command"])
    assert _env(init)["_AIRFLOW_DB_MIGRATE"] == "true"
    for step in ("/entrypoint airflow version", "retention keygen --out /opt/retention/keys",
                 "ensure_schema(engine)", "audit-grants.sql", "retention airflow sync-pools"):
        assert step in script, step
    buckets = "\n".join(compose["services"]["minio-init"]["command"])
    rules, _ = scan_rules(ROOT / "retention_rules")
    for rule_file in rules:
        rule = rule_file.rule
        for target in rule.targets:
            if target.kind == "s3":
                assert f"mc mb --ignore-existing --with-lock local/{target.bucket}" in buckets
        if rule.archive:
            assert f"local/{rule.archive.bucket}" in buckets
    checkpoints = _env(compose["services"]["airflow-worker"])["RETENTION_CHECKPOINTS"]
    bucket = checkpoints.removeprefix("s3://").split("/")[0]
    assert f"mc mb --ignore-existing --with-lock local/{bucket}" in buckets
    assert re.search(rf"mc retention set --default COMPLIANCE \d+d local/{bucket}$", buckets, re.M)


def test_item01_the_init_steps_python_imports_what_the_package_has(compose):
    # The init step's inline Python ran `from retention.audit import ensure_schema` after the
    # package moved the audit schema to retention.evidence.audit: every deployment's first
    # start would have stopped there. Each of its imports must resolve in this package.
    import importlib

    script = "\n".join(compose["services"]["airflow-init"]["command"])
    imports = re.findall(r"^\s*from (retention[\w.]*) import ([\w, ]+)$", script, re.M)
    assert imports, "the init step imports nothing from retention any more: update this test"
    for module, names in imports:
        loaded = importlib.import_module(module)
        for name in (n.strip() for n in names.split(",")):
            assert hasattr(loaded, name), f"{module} has no {name}"


def test_item01_demo_seed_creates_every_table_a_rule_names_where_its_connection_points(compose):
    from retention.rules.loader import scan_rules

    env = _env(compose["services"]["airflow-worker"])
    seeds = {"demo-postgres": compose["configs"]["demo-postgres-seed"]["content"],
             "demo-mariadb": compose["configs"]["demo-mariadb-seed"]["content"]}
    rules, _ = scan_rules(ROOT / "retention_rules")
    for rule_file in rules:
        for target in rule_file.rule.targets:
            if target.kind != "sql":
                continue
            uri = env[f"AIRFLOW_CONN_{target.connection.upper()}"]
            host, database = re.search(r"@([a-z-]+):\d+/(\w+)$", uri).groups()
            seed = seeds[host]
            tables = [target.table] + [c.table for c in (target.children or [])]
            for table in tables:
                if host == "demo-postgres":
                    block = re.search(rf"-d {database} <<'SQL'\n(.*?)\nSQL", seed, re.S).group(1)
                    assert f"CREATE TABLE {table} (" in block, (target.connection, table)
                else:
                    assert f"CREATE TABLE {database}.{table} (" in seed, (target.connection, table)


def test_item01_demo_postgres_seed_runs_and_leaves_rows_to_purge(compose, new_database):
    """The seed SQL per demo database, run on the real PostgreSQL (each into a throwaway database)."""
    seed = compose["configs"]["demo-postgres-seed"]["content"]
    role = f"rt_purger_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(os.environ.get("RETENTION_TEST_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"),
                             isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE ROLE {role}"))
    made = []
    try:
        for database, block in re.findall(r"-d (crm|support|web) <<'SQL'\n(.*?)\nSQL", seed, re.S):
            db = new_database("postgresql")
            made.append(db)
            db.execute(block.replace("retention_purger", role))
            table = re.search(r"CREATE TABLE (\w+)", block).group(1)
            assert db.scalar(f"SELECT count(*) FROM {table}") == 5000, database
            assert db.scalar(f"SELECT has_table_privilege('{role}', '{table}', 'DELETE')")
            assert not db.scalar(f"SELECT has_table_privilege('{role}', '{table}', 'TRUNCATE')")
    finally:
        for db in made:
            db.execute(f"DROP OWNED BY {role}")  # its grants, database by database
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP ROLE {role}"))
        admin.dispose()


@pytest.fixture
def audit_roles(pg_db):
    """Owner and runtime roles on a fresh audit database, as audit-db's init script makes them."""
    suffix = uuid.uuid4().hex[:8]
    owner, app = f"rt_audit_owner_{suffix}", f"rt_audit_app_{suffix}"
    name = pg_db.url.database
    admin = sa.create_engine(pg_db.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE ROLE {owner} LOGIN"))
        conn.execute(sa.text(f"CREATE ROLE {app} LOGIN"))
        conn.execute(sa.text(f"ALTER DATABASE {name} OWNER TO {owner}"))
        conn.execute(sa.text(f"ALTER SCHEMA public OWNER TO {owner}"))
        conn.execute(sa.text(f"REVOKE ALL ON DATABASE {name} FROM PUBLIC"))
        conn.execute(sa.text(f"GRANT CONNECT ON DATABASE {name} TO {app}"))
    engines = {role: sa.create_engine(pg_db.url.set(username=role)) for role in (owner, app)}
    try:
        yield engines[owner], engines[app], app
    finally:
        for engine in engines.values():
            engine.dispose()
        pg_db.engine.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                 f"WHERE datname = '{name}' AND pid <> pg_backend_pid()"))
            conn.execute(sa.text(f"ALTER DATABASE {name} OWNER TO postgres"))
            for role in (owner, app):
                conn.execute(sa.text(f"REASSIGN OWNED BY {role} TO postgres"))
                conn.execute(sa.text(f"DROP OWNED BY {role}"))
                conn.execute(sa.text(f"DROP ROLE {role}"))
        admin.dispose()


def test_item01_audit_runtime_role_may_only_append_and_read_certificates(compose, audit_roles):
    from sqlalchemy.exc import DBAPIError

    from retention.evidence.audit import ensure_schema

    owner, app, app_role = audit_roles
    grants = compose["configs"]["audit-grants"]["content"]
    assert re.findall(r"GRANT ([A-Z, ]+) ON purge_certificates TO", grants) == ["SELECT, INSERT"]
    ensure_schema(owner)
    with owner.begin() as conn:
        conn.execute(sa.text(grants.replace("retention_app", app_role)))

    ensure_schema(app)  # what every task does on start (open_audit): must work for the runtime role
    row = {"seq": 1, "category": "c", "run_id": "r", "status": "complete", "issued_at": "2026-01-01T00:00:00Z",
           "payload": "{}", "signature": "s", "key_id": "k", "prev_hash": "0" * 64, "entry_hash": "1" * 64}
    with app.begin() as conn:
        conn.execute(sa.text("INSERT INTO purge_certificates VALUES (:seq, :category, :run_id, :status, :issued_at, "
                             ":payload, :signature, :key_id, :prev_hash, :entry_hash)"), row)
        assert conn.execute(sa.text("SELECT count(*) FROM purge_certificates")).scalar() == 1
        conn.execute(sa.text("UPDATE purge_runs SET state = state"))  # the journal is the runtime's to update
    for statement in ("UPDATE purge_certificates SET status = 'partial'", "DELETE FROM purge_certificates",
                      "TRUNCATE purge_certificates", "DELETE FROM legal_hold_events",
                      "CREATE TABLE shadow_certificates (seq bigint)", "DROP TABLE purge_certificates",
                      "ALTER TABLE purge_certificates DISABLE TRIGGER ALL"):
        with pytest.raises(DBAPIError) as refused, app.begin() as conn:
            conn.execute(sa.text(statement))
        # refused by the privilege system, not only by the append-only triggers
        assert refused.value.orig.pgcode in ("42501",), (statement, refused.value.orig)
        assert "permission denied" in str(refused.value.orig) or "must be owner" in str(refused.value.orig)


# -- item 3: pools per connection ------------------------------------------------------------

TWO_CONNECTIONS = """\
category: carts
description: Carts
owner: shop
legal_basis: Purpose limitation
retain_for: P30D
schedule: "@daily"
action: delete
targets:
  - {name: carts, kind: sql, connection: shop_db, table: carts, key: [id], age_column: updated_at}
  - {name: reminders, kind: sql, connection: marketing_db, table: reminders, key: [id], age_column: sent_at}
  - {name: cart_items, kind: sql, connection: shop_db, table: cart_items, key: [id], age_column: updated_at}
"""

ONE_CONNECTION = """\
category: accounts
description: Accounts
owner: crm
legal_basis: Disputes
retain_for: P2Y
schedule: "@daily"
action: delete
targets:
  - {name: customers, kind: sql, connection: crm_db, table: customers, key: [id], age_column: closed_at}
"""


def _rules_dir(tmp_path: Path, pools: str | None = None) -> Path:
    rules = tmp_path / "rules"
    write_rule(rules, "carts", text=TWO_CONNECTIONS)
    write_rule(rules, "accounts", text=ONE_CONNECTION)
    if pools is not None:
        (rules / "_pools.yaml").write_text(pools)
    return rules


def test_item03_pool_config_gives_slots_per_connection_and_a_default(tmp_path):
    from retention.interfaces.pools import DEFAULT_SLOTS, load_pool_config, load_pool_rules, pool_name, required_pools

    rules_dir = _rules_dir(tmp_path, "default_slots: 2\nconnections:\n  shop_db: 3\n")
    config = load_pool_config(rules_dir, known=["shop_db", "marketing_db", "crm_db"])
    pools = required_pools(load_pool_rules(rules_dir), config)

    assert [(p.name, p.slots) for p in pools] == [
        ("retention__crm_db", 2), ("retention__marketing_db", 2), ("retention__shop_db", 3)]
    assert "carts" in pools[2].description
    assert pool_name("crm_db") == "retention__crm_db"
    assert load_pool_config(tmp_path / "nowhere").slots_for("crm_db") == DEFAULT_SLOTS == 1


@pytest.mark.parametrize(("text", "line", "expected"), [
    ("default_slot: 2\n", 1, "default_slot: unknown field; did you mean 'default_slots'?"),
    ("connections:\n  shop_bd: 2\n", 2, "connections.shop_bd: no rule uses connection 'shop_bd'; did you mean 'shop_db'?"),
    ("connections:\n  shop_db: true\n", 2, "connections.shop_db: True is not a number of slots"),
    ("connections:\n  shop_db: 0\n", 2, "connections.shop_db: 0 is not a number of slots"),
    ("default_slots: '2'\n", 1, "default_slots: '2' is not a number of slots"),
    ("connections: [shop_db]\n", 1, "connections: expected a mapping"),
    ("connections:\n  shop_db: 2\n  shop_db: 3\n", 3, "key 'shop_db' appears twice"),
    ("- 1\n", 1, "expected a mapping"),
])
def test_item03_a_wrong_pools_file_is_refused_with_file_line_and_field(tmp_path, text, line, expected):
    from retention.errors import RuleError
    from retention.interfaces.pools import load_pool_config

    rules_dir = _rules_dir(tmp_path, text)
    with pytest.raises(RuleError) as refused:
        load_pool_config(rules_dir, known=["shop_db", "marketing_db", "crm_db"])

    message = str(refused.value.problems[0])
    assert message.startswith(f"{rules_dir / '_pools.yaml'}:{line}:")
    assert expected in message


def test_item03_purge_tasks_carry_the_pool_of_their_targets_connection(tmp_path):
    from retention.interfaces.airflow import build_dags

    dags = build_dags(_rules_dir(tmp_path))

    single = dags["retention__accounts"]
    assert single.get_task("purge").pool == "retention__crm_db"
    assert {t.task_id: t.pool for t in single.tasks if t.task_id != "purge"} == {
        "plan": "default_pool", "certify": "default_pool"}
    split = dags["retention__carts"]
    assert {t.task_id: t.pool for t in split.tasks if t.task_id.startswith("purge")} == {
        "purge__shop_db": "retention__shop_db", "purge__marketing_db": "retention__marketing_db"}
    assert split.get_task("purge__shop_db").op_kwargs_expand_input.value == {"target": ["carts", "cart_items"]}
    assert split.get_task("purge__marketing_db").op_kwargs_expand_input.value == {"target": ["reminders"]}
    assert split.get_task("certify").upstream_task_ids == {"purge__shop_db", "purge__marketing_db"}
    for task_id in ("purge__shop_db", "purge__marketing_db"):
        assert split.get_task(task_id).upstream_task_ids == {"plan"}


def test_item03_the_repositorys_pools_file_fits_the_repositorys_rules():
    from retention.interfaces.pools import load_pool_config, load_pool_rules, required_pools, rule_connections

    rules = load_pool_rules(ROOT / "retention_rules")
    used = sorted({c for r in rules for c in rule_connections(r.rule)})
    pools = required_pools(rules, load_pool_config(ROOT / "retention_rules", known=used))

    assert {p.name for p in pools} == {f"retention__{c}" for c in used}
    assert all(1 <= p.slots <= 4 for p in pools)


def test_item03_sync_pools_dry_run_prints_the_pools_and_changes_nothing(tmp_path, capsys):
    from retention.interfaces.cli import main

    rules_dir = _rules_dir(tmp_path, "connections:\n  shop_db: 2\n")
    assert main(["airflow", "sync-pools", "--rules", str(rules_dir), "--dry-run", "--json"]) == 0

    out, err = capsys.readouterr()
    assert json.loads(out) == {
        "retention__crm_db": {"slots": 1, "description": "retention purges on connection crm_db (accounts)",
                              "include_deferred": False},
        "retention__marketing_db": {"slots": 1, "description": "retention purges on connection marketing_db (carts)",
                                    "include_deferred": False},
        "retention__shop_db": {"slots": 2, "description": "retention purges on connection shop_db (carts)",
                               "include_deferred": False},
    }
    assert "no pool was changed" in err


def test_item03_sync_pools_refuses_a_bad_pools_file_in_one_line_and_exit_2(tmp_path, capsys):
    from retention.interfaces.cli import main

    rules_dir = _rules_dir(tmp_path, "connections:\n  crm: 2\n")
    assert main(["airflow", "sync-pools", "--rules", str(rules_dir)]) == 2

    out, err = capsys.readouterr()
    assert f"{rules_dir / '_pools.yaml'}:2: connections.crm: no rule uses connection 'crm'" in err
    assert "Traceback" not in err and out == ""


def test_item03_sync_pools_without_airflow_says_where_to_run_it(tmp_path, capsys, monkeypatch):
    import importlib.util

    from retention.interfaces.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "airflow" else real(name, *a))
    assert main(["airflow", "sync-pools", "--rules", str(_rules_dir(tmp_path))]) == 2

    err = capsys.readouterr().err
    assert "configuration: Airflow is not installed in this environment" in err and "--json" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.airflow
def test_item03_sync_pools_writes_the_pools_into_airflow_and_resizes_them(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "plugins")}
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True, env=env)
    rules_dir = _rules_dir(tmp_path, "connections:\n  shop_db: 2\n")
    cli = [sys.executable, "-m", "retention.interfaces.cli", "airflow", "sync-pools", "--rules", str(rules_dir)]

    def pools() -> dict[str, int]:
        listed = subprocess.run([sys.executable, "-m", "airflow", "pools", "list", "-o", "json"], check=True,
                                capture_output=True, text=True, env=env).stdout
        return {p["pool"]: int(p["slots"]) for p in json.loads(listed) if p["pool"].startswith("retention__")}

    done = subprocess.run(cli, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert pools() == {"retention__crm_db": 1, "retention__marketing_db": 1, "retention__shop_db": 2}

    (rules_dir / "_pools.yaml").write_text("connections:\n  shop_db: 3\n")
    done = subprocess.run(cli, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert pools()["retention__shop_db"] == 3


# -- item 6: what `pip install retention[airflow]` brings ------------------------------------


def test_item06_the_airflow_extra_brings_postgres_support_and_the_amazon_provider():
    from importlib.metadata import version

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extra = {Requirement(r).name: Requirement(r) for r in project["optional-dependencies"]["airflow"]}

    airflow = extra["apache-airflow"]
    assert "postgres" in airflow.extras
    assert version("apache-airflow") in airflow.specifier
    amazon = extra["apache-airflow-providers-amazon"]
    assert version("apache-airflow-providers-amazon") in amazon.specifier
    # what `airflow db migrate` on PostgreSQL imports, present where the extra was installed
    for module in ("asyncpg", "psycopg2", "airflow.providers.postgres", "airflow.providers.amazon.aws.hooks.s3"):
        __import__(module)


def test_item01_a_whole_run_works_with_the_audit_runtime_role(compose, audit_roles, sqlite_db, keys, tmp_path,
                                                               monkeypatch, capsys):
    """Journal, lock, hold and certificate: everything a run writes fits the grants, nothing more is needed."""
    from datetime import datetime, timezone

    from retention.evidence.audit import ensure_schema
    from retention.interfaces.cli import main

    from conftest import connect
    from sqlpurge import ids, insert_customers, make_customers

    owner, app, app_role = audit_roles
    ensure_schema(owner)
    with owner.begin() as conn:
        conn.execute(sa.text(compose["configs"]["audit-grants"]["content"].replace("retention_app", app_role)))
    url = app.url
    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_AUDIT", f"postgres://{url.username}@{url.host}:{url.port}/{url.database}")
    make_customers(sqlite_db)
    old = datetime(2020, 1, 1, tzinfo=timezone.utc)
    insert_customers(sqlite_db, [(1, "closed", old), (2, "closed", old), (3, "open", None)])
    connect(monkeypatch, "crm_db", sqlite_db)
    rules = tmp_path / "rules"
    write_rule(rules)

    assert main(["hold", "add", "--category", "customer_accounts", "--match", '{"id": 2}', "--case", "CASE-1",
                 "--reason", "dispute", "--rules", str(rules)]) == 0
    assert main(["run", "--rules", str(rules), "--as-of", "2026-06-01T00:00:00Z"]) == 0
    assert main(["hold", "release", "1", "--reason", "settled"]) == 0
    assert main(["run", "--rules", str(rules), "--as-of", "2026-06-02T00:00:00Z"]) == 0
    capsys.readouterr()
    assert main(["verify", "--public-key", str(keys[1])]) == 0
    assert ids(sqlite_db) == {3}
    with owner.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM purge_certificates")).scalar() == 2
