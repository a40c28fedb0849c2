# Two commands matter on a fresh machine: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: install demo test typecheck bench validate plan demo-clean clean env schema ui ui-screenshots

install: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[airflow,test,parquet]'
	touch $@

## A nightly purge of a seeded retail estate through Airflow, then its certificates.
demo: install
	$(BIN)/python -m retention.interfaces.demo

## The compliance page on what `make demo` left: api-server, scheduler and dag-processor on the
## demo's SQLite metadata, the plugin at /retention; prints the URL and login. Ctrl-C stops them.
UI_PORT ?= 8080
UI_URL  := http://127.0.0.1:$(UI_PORT)
ui: install
	@test -f .demo/env || { echo "make ui shows what make demo made: run make demo first"; exit 2; }
	@set -a; . ./.demo/env; set +a; \
	export PATH="$(abspath $(BIN)):$$PATH" AIRFLOW__CORE__DAGS_FOLDER="$(CURDIR)/dags" AIRFLOW__CORE__LOAD_EXAMPLES=False \
	  AIRFLOW__CORE__AUTH_MANAGER=airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager \
	  AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=admin:admin \
	  AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE="$$AIRFLOW_HOME/simple_auth_manager_passwords.json" \
	  AIRFLOW__API__HOST=127.0.0.1 AIRFLOW__API__PORT=$(UI_PORT) AIRFLOW__API__BASE_URL=$(UI_URL) \
	  AIRFLOW__CORE__EXECUTION_API_SERVER_URL=$(UI_URL)/execution/ \
	  RETENTION_PUBLIC_KEYS="$(CURDIR)/.demo/keys/retention-signing.pub.pem"; \
	mkdir -p .demo/logs; airflow db migrate > .demo/logs/ui-db-migrate.log 2>&1 || { tail -20 .demo/logs/ui-db-migrate.log; exit 1; }; \
	pids=""; for name in api-server scheduler dag-processor; do \
	  airflow $$name > .demo/logs/ui-$$name.log 2>&1 & pids="$$pids $$!"; done; \
	trap 'kill $$pids 2>/dev/null; wait' EXIT INT TERM; \
	n=0; until python -c 'import sys, urllib.request as u; u.urlopen(sys.argv[1], timeout=5)' $(UI_URL)/api/v2/monitor/health 2>/dev/null; do \
	  n=$$((n + 1)); [ $$n -lt 90 ] || { echo "the api-server did not answer; see .demo/logs/ui-api-server.log"; exit 1; }; sleep 2; done; \
	password=$$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["admin"])' "$$AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"); \
	echo; echo "  Airflow:        $(UI_URL)/   (nav: Browse > Retention)"; \
	echo "  Retention page: $(UI_URL)/retention/"; \
	echo "  Login:          admin / $$password"; \
	echo "  Logs:           .demo/logs/ui-*.log      Ctrl-C stops all three"; echo; \
	wait

## Re-take the screenshots docs/ui.md shows, from the browser test.
ui-screenshots: install
	RETENTION_UI_SCREENSHOTS=$(CURDIR)/docs $(BIN)/pytest -q tests/test_ui_browser.py

## Lint, type-check the engine, then the test suite against this machine's PostgreSQL and MariaDB (and SQLite, moto).
test: install
	$(BIN)/ruff check plugins tests bench dags
	$(BIN)/mypy
	$(BIN)/pytest

## Static types of the engine alone (also part of `test`).
typecheck: install
	$(BIN)/mypy

## Speed and memory figures, every bench script at its default size, each against its peer
## (not part of the tests; long on two cores). tests/test_bench_smoke.py runs them all tiny.
BENCHES := sql_purge command_purge partition_purge shard_purge s3_purge archive_purge anonymize_purge replica_lag
bench: install
	@failed=""; for name in $(BENCHES); do echo "== bench/$$name.py"; \
	  $(BIN)/python bench/$$name.py || failed="$$failed $$name"; done; \
	test -z "$$failed" || { echo "bench: a check failed (or the script broke) in:$$failed"; exit 1; }

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
