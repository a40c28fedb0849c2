# Two commands matter on a fresh machine: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: install demo test typecheck bench validate plan demo-clean clean env schema

install: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[airflow,test,parquet]'
	touch $@

## A nightly purge of a seeded retail estate through Airflow, then its certificates.
demo: install
	$(BIN)/python -m retention.interfaces.demo

## Lint, then the test suite against this machine's PostgreSQL and MariaDB (and SQLite, moto).
test: install
	$(BIN)/ruff check plugins tests bench dags
	$(BIN)/pytest

## Static types of the engine (not yet clean: issue #10 goes on; joins `test` once it is).
typecheck: install
	$(BIN)/mypy

## Speed and memory figures (not part of the tests; about ten minutes).
bench: install
	$(BIN)/python bench/sql_purge.py
	$(BIN)/python bench/s3_purge.py
	$(BIN)/python bench/archive_purge.py
	$(BIN)/python bench/anonymize_purge.py

validate: install
	$(BIN)/retention validate retention_rules

## The JSON Schema editors check rule files against (tests fail when it is stale).
schema: install
	$(BIN)/retention schema --out docs/rule.schema.json

## Secrets for docker-compose.yml, random, into .env (gitignored; never overwritten).
env: .env

.env:
	@umask 077 && $(PYTHON) -c 'import base64, secrets; hexes = ["AIRFLOW_DB_PASSWORD", "AUDIT_SUPERUSER_PASSWORD", "AUDIT_OWNER_PASSWORD", "AUDIT_APP_PASSWORD", "DEMO_PG_SUPERUSER_PASSWORD", "DEMO_PG_PURGER_PASSWORD", "DEMO_MARIADB_ROOT_PASSWORD", "DEMO_MARIADB_PURGER_PASSWORD", "REDIS_PASSWORD", "MINIO_ROOT_PASSWORD", "AIRFLOW_ADMIN_PASSWORD", "AIRFLOW_API_SECRET_KEY", "AIRFLOW_JWT_SECRET", "RETENTION_HASH_KEY"]; lines = [f"{name}={secrets.token_hex(24)}" for name in hexes]; lines.append("AIRFLOW_FERNET_KEY=" + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()); open(".env", "x").write("# made by make env: secrets for docker-compose.yml; keep out of git\n" + "\n".join(lines) + "\n")'
	@echo "wrote .env (mode 0600); docker compose reads it from this directory"

demo-clean:
	rm -rf .demo

clean: demo-clean
	rm -rf $(VENV) .pytest_cache plugins/*.egg-info
