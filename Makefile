# Two commands matter on a fresh machine: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: install demo test bench validate plan demo-clean clean

install: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[airflow,test,parquet]'
	touch $@

## A nightly purge of a seeded retail estate through Airflow, then its certificates.
demo: install
	$(BIN)/python -m retention.demo

## The test suite, against this machine's PostgreSQL and MariaDB (and SQLite, moto).
test: install
	$(BIN)/pytest

## Speed and memory figures (not part of the tests; about ten minutes).
bench: install
	$(BIN)/python bench/sql_purge.py
	$(BIN)/python bench/s3_purge.py
	$(BIN)/python bench/archive_purge.py
	$(BIN)/python bench/anonymize_purge.py

validate: install
	$(BIN)/retention validate retention_rules

demo-clean:
	rm -rf .demo

clean: demo-clean
	rm -rf $(VENV) .pytest_cache plugins/*.egg-info
