"""The SQL walk and the archive action retry through the one retry policy (retention.retry):
a batch that hits a transient database error is tried again after each of the table's
delays and then given up, and a two-phase archive batch whose rows keep changing is
archived at most three times. Real PostgreSQL and MariaDB; S3 through moto."""

from __future__ import annotations

import logging
from datetime import datetime, timezone

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import OperationalError

from retention.archive.store import ArchiveStore
from retention.errors import TransientError
from retention.evidence.audit import purge_batches
from retention.rules.loader import load_rule_file
from retention.targets.sql.archive import ARCHIVE_ATTEMPTS
from retention.targets.sql.delete import DeleteRows
from retention.targets.sql.table import SqlTable

from conftest import connect, write_rule
from sqlpurge import ids, insert_customers, make_customers, runner
from test_archive import ARCHIVE, archive_rule, aws, create_shop, fill_shop, make_runner  # noqa: F401 (aws: fixture)

UTC = timezone.utc
AS_OF = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)
OLD = datetime(2020, 1, 1, tzinfo=UTC)


class TimesOutFirst(DeleteRows):
    """Deletes as DeleteRows does, but its first ``failures`` batches run into PostgreSQL's
    statement timeout (SQLSTATE 57014: transient) on the walker's own connection."""

    def __init__(self, failures: int):
        self.failures = failures
        self.tries = 0

    def apply(self, table, conn, batch):
        self.tries += 1
        if self.tries <= self.failures:
            with conn.begin():
                conn.execute(sa.text("SET LOCAL statement_timeout = '1ms'"))
                conn.execute(sa.text("SELECT pg_sleep(1)"))
        return super().apply(table, conn, batch)


def _customers_table(pg_db, monkeypatch, tmp_path, action, delays):
    connect(monkeypatch, "crm_db", pg_db)
    make_customers(pg_db)
    insert_customers(pg_db, [(i, "closed", OLD) for i in range(1, 31)])
    rule_file = load_rule_file(write_rule(tmp_path / "rules", targets=[{"where": "{status: closed}"}]))
    r = runner()
    run, _ = r.start(rule_file, run_id="r1", as_of=AS_OF)
    target = rule_file.rule.target("customers")
    table = SqlTable(target, r.targets.sql_engine(target.connection), action=action, retry_delays=delays)
    return table, r.journal.ledger(run, "customers"), run


def test_a_batch_that_hits_a_transient_error_is_tried_again_after_each_delay(pg_db, audit_db, keys, tmp_path,
                                                                              monkeypatch, caplog):
    action = TimesOutFirst(failures=2)
    table, ledger, run = _customers_table(pg_db, monkeypatch, tmp_path, action, delays=(0.01, 0.02))

    with caplog.at_level(logging.WARNING, logger="retention.retry"):
        outcome = table.purge(run.cutoff, ledger)

    assert outcome.deleted == 30 and outcome.remaining == 0 and ids(pg_db) == set()
    assert action.tries == 3  # two timeouts, then the batch that took every row
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 2
    assert "canceling statement due to statement timeout (transient); retrying in 0.0s (attempt 2)" in retries[0]
    assert "(attempt 3)" in retries[1]


def test_a_transient_error_outlasting_the_delays_is_raised_with_nothing_left_pending(pg_db, audit_db, keys,
                                                                                    tmp_path, monkeypatch):
    action = TimesOutFirst(failures=3)
    table, ledger, run = _customers_table(pg_db, monkeypatch, tmp_path, action, delays=(0.01, 0.01))

    with pytest.raises(OperationalError, match="statement timeout"):
        table.purge(run.cutoff, ledger)

    assert action.tries == 3  # the first try and one after each delay
    assert len(ids(pg_db)) == 30
    assert ledger.unresolved() == []


def test_rows_that_keep_changing_while_archived_give_up_after_three_tries(mysql_db, aws, audit_db, keys,  # noqa: F811
                                                                         tmp_path, monkeypatch):
    """Two-phase archive (MariaDB): each try archives, finds an order edited meanwhile, removes
    its objects and deletes nothing; after the last, the purge fails as transient (Airflow
    retries it later)."""
    connect(monkeypatch, "shop_db", mysql_db)
    create_shop(mysql_db)
    expired = fill_shop(mysql_db, orders=9)
    real_put = ArchiveStore.put_verified
    edits: list[str] = []

    def put_then_someone_edits(self, key, body, **kwargs):
        stored = real_put(self, key, body, **kwargs)
        if kwargs.get("table") == "orders":
            mysql_db.execute(f"UPDATE orders SET notes = 'edited {len(edits)}' WHERE id = 3")
            edits.append(key)
        return stored

    monkeypatch.setattr(ArchiveStore, "put_verified", put_then_someone_edits)
    rule_file = archive_rule(tmp_path)
    r = make_runner()
    run, _ = r.start(rule_file, run_id="r1", as_of=AS_OF)

    with pytest.raises(TransientError, match="rows kept changing while being archived"):
        r.purge(rule_file, run, "orders")

    assert len(edits) == ARCHIVE_ATTEMPTS == 3
    assert len(set(edits)) == 3  # each try was a batch of its own number
    assert expired <= ids(mysql_db, "orders")  # nothing deleted
    assert aws.list_objects_v2(Bucket=ARCHIVE).get("KeyCount") == 0  # every try removed its objects
    with r.journal.engine.connect() as conn:
        states = list(conn.execute(sa.select(purge_batches.c.state).where(purge_batches.c.run_id == "r1")).scalars())
    assert states == ["void"] * 3
