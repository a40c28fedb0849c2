"""MariaDB deletes a batch by its primary-key range only when that range holds the batch's rows
and nothing else (targets/sql/delete.py clustered_range): the exact expired set goes, and no
key range a delete walks holds a row the batch does not take (the delete would lock, so wait
on, it)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from retention.rules.loader import load_rule_file
from retention.targets.sql import delete as delete_action

from conftest import connect, write_rule
from sqlpurge import ids, insert_customers, make_customers, runner

UTC = timezone.utc
AS_OF = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)
OLD = datetime(2020, 1, 1, tzinfo=UTC)
YOUNG = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def server(mysql_db, monkeypatch, audit_db, keys):
    connect(monkeypatch, "crm_db", mysql_db)
    make_customers(mysql_db)
    return mysql_db


def rule(tmp_path, **target):
    target.setdefault("where", "{status: closed}")
    return load_rule_file(write_rule(tmp_path / "rules", targets=[target]))


@pytest.fixture
def ranges(monkeypatch):
    """Every key range a batch delete used, checked as it is used (in the batch's
    transaction): how many rows in it the batch does not take (must be none)."""
    used: list[int] = []
    original = delete_action.clustered_range

    def checked(table, conn, selection, batch=None):
        conditions = original(table, conn, selection, batch)
        for condition in conditions:
            foreign = sa.select(sa.func.count()).select_from(table.table).where(condition, sa.not_(selection))
            used.append(conn.execute(foreign).scalar_one())
        return conditions

    monkeypatch.setattr(delete_action, "clustered_range", checked)
    return used


def test_keys_growing_with_age_are_deleted_by_their_key_range(server, tmp_path, ranges):
    insert_customers(server, [(i, "closed", OLD + timedelta(minutes=i)) for i in range(1, 301)]
                     + [(i, "closed", YOUNG + timedelta(minutes=i)) for i in range(301, 351)])

    certificate = runner().run(rule(tmp_path, max_batch_rows=20), run_id="r1", as_of=AS_OF)

    assert ids(server) == set(range(301, 351))
    assert certificate.data["totals"]["deleted"] == 300
    batches = -(-300 // 20)
    assert len(ranges) >= batches - 1 and set(ranges) == {0}  # the last batch may go by the age index


@pytest.mark.parametrize("order", ["keys against age", "keys shuffled", "filter interleaved", "young among old"])
def test_keys_that_do_not_follow_age_still_lose_exactly_the_expired_rows(server, tmp_path, order, ranges):
    n = 240
    if order == "keys against age":
        rows = [(i, "closed", OLD + timedelta(minutes=n - i)) for i in range(1, n + 1)]
    elif order == "keys shuffled":
        rows = [(i, "closed", OLD + timedelta(minutes=(i * 97) % n)) for i in range(1, n + 1)]
    elif order == "filter interleaved":  # every fifth row is kept by the rule's filter, among the batches' keys
        rows = [(i, "open" if i % 5 == 0 else "closed", OLD + timedelta(minutes=i)) for i in range(1, n + 1)]
    else:  # every 30th row is young (kept), its key among the expired rows'
        rows = [(i, "closed", (YOUNG if i % 30 == 0 else OLD) + timedelta(minutes=i)) for i in range(1, n + 1)]
    rows += [(i, "closed", YOUNG + timedelta(minutes=i)) for i in range(n + 1, n + 21)]
    insert_customers(server, rows)
    expired = {i for i, status, closed in rows if status == "closed" and closed < YOUNG}

    certificate = runner().run(rule(tmp_path, max_batch_rows=16), run_id="r1", as_of=AS_OF)

    assert ids(server) == {i for i, _, _ in rows} - expired
    assert certificate.status == "complete" and certificate.data["totals"]["deleted"] == len(expired)
    assert set(ranges) <= {0}  # no key range a delete used held a row it did not take
