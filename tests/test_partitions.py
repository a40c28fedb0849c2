"""Whole partitions at O(1) on PostgreSQL and MariaDB: a table range-partitioned by month on
its age column loses every partition before the cutoff as a unit, and only the boundary
partition (and partitions something could keep a row of) is walked in batches."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timezone

import pytest
import sqlalchemy as sa

from retention.connections import from_environment
from retention.evidence.audit import open_audit, purge_batches
from retention.evidence.chain import read_certificates
from retention.holds import HoldRegistry
from retention.rules.loader import load_rule_file
from retention.targets.base import RecordLimit
from retention.targets.sql.partition_catalog import list_partitions

from conftest import connect, write_rule
from sqlpurge import ids, runner

UTC = timezone.utc
AS_OF = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)
CUTOFF = datetime(2024, 6, 15, 12, 0, tzinfo=UTC)  # AS_OF - P2Y
MONTHS = range(1, 9)  # January to August 2024: January to May lie wholly before the cutoff
DAYS = (1, 10, 20)  # in June, the 1st and 10th have expired and the 20th has not
CUSTOMERS = (1, 2, 3)
OLD_MONTHS = range(1, 6)


def _name(backend: str, month: int) -> str:
    return f"public.events_2024_{month:02d}" if backend == "postgresql" else f"p2024_{month:02d}"


def _create_pg(db, *, default: bool = False) -> None:
    db.execute("CREATE TABLE events (id BIGINT NOT NULL, customer_id INT NOT NULL, created_at TIMESTAMPTZ NOT NULL, "
               "note TEXT, PRIMARY KEY (id, created_at)) PARTITION BY RANGE (created_at)")
    db.execute("CREATE INDEX events_created_at ON events (created_at)")
    for month in MONTHS:
        db.execute(f"CREATE TABLE events_2024_{month:02d} PARTITION OF events FOR VALUES "
                   f"FROM ('2024-{month:02d}-01 00:00+00') TO ('2024-{month + 1:02d}-01 00:00+00')")
    db.execute("CREATE TABLE events_later PARTITION OF events FOR VALUES FROM ('2024-09-01 00:00+00') TO (MAXVALUE)")
    if default:
        db.execute("CREATE TABLE events_other PARTITION OF events DEFAULT")


def _create_mariadb(db, *, scheme: str = "columns") -> None:
    if scheme == "columns":
        parts = [f"PARTITION p2024_{m:02d} VALUES LESS THAN ('2024-{m + 1:02d}-01')" for m in MONTHS]
        by = "RANGE COLUMNS(created_at)"
    else:
        parts = [f"PARTITION p2024_{m:02d} VALUES LESS THAN (TO_DAYS('2024-{m + 1:02d}-01'))" for m in MONTHS]
        by = "RANGE (TO_DAYS(created_at))"
    db.execute("CREATE TABLE events (id BIGINT NOT NULL, customer_id INT NOT NULL, created_at DATETIME(6) NOT NULL, "
               "note VARCHAR(100), PRIMARY KEY (id, created_at), KEY events_created_at (created_at)) "
               f"PARTITION BY {by} ({', '.join(parts)}, PARTITION plater VALUES LESS THAN (MAXVALUE))")


def _fill(db) -> dict[int, tuple[int, datetime]]:
    """Three customers' events on three days of every month; id -> (customer, created_at)."""
    rows = {}
    for month in MONTHS:
        for day in DAYS:
            for customer in CUSTOMERS:
                rows[len(rows) + 1] = (customer, datetime(2024, month, day, 8, customer, tzinfo=UTC))
    events = sa.Table("events", sa.MetaData(), autoload_with=db.engine)
    naive = db.backend != "postgresql"
    with db.engine.begin() as conn:
        conn.execute(events.insert(), [
            {"id": i, "customer_id": c, "note": f"event {i}",
             "created_at": at.replace(tzinfo=None) if naive else at} for i, (c, at) in rows.items()])
    return rows


def _expired(rows, keep=lambda i, customer: False) -> set[int]:
    return {i for i, (customer, at) in rows.items() if at < CUTOFF and not keep(i, customer)}


@pytest.fixture(params=["postgresql", "mariadb", "mariadb-to_days"])
def shop(request, monkeypatch, audit_db, keys):
    """An events table partitioned by month on created_at, reachable as shop_db; its rows."""
    backend, _, scheme = request.param.partition("-")
    db = request.getfixturevalue("pg_db" if backend == "postgresql" else "mysql_db")
    connect(monkeypatch, "shop_db", db)
    if backend == "postgresql":
        _create_pg(db)
    else:
        _create_mariadb(db, scheme=scheme or "columns")
    return db, _fill(db)


def _rule(tmp_path, directory: str = "rules", **target):
    spec = {"name": "events", "connection": "shop_db", "table": "events", "key": "[id, created_at]",
            "age_column": "created_at", **target}
    return load_rule_file(write_rule(tmp_path / directory, targets=[spec]))


def _partitions(db, tmp_path, **target) -> set[str]:
    """The table's partitions on its age column, as the engine sees them."""
    rule = _rule(tmp_path, "probe", **target).rule
    with runner().targets as targets:
        return {p.qualified for p in list_partitions(targets.open(rule.target("events")))}


def _write_once_at(monkeypatch, point: str, db, statement: str, params: dict) -> None:
    """Another writer runs ``statement`` on ``db`` once, when the purge reaches failpoint ``point``."""
    from retention import failpoints

    hit, written = failpoints.hit, []

    def writer(name: str) -> None:
        if name == point and not written:
            db.execute(statement, params)
            written.append(name)
        hit(name)

    monkeypatch.setattr(failpoints, "hit", writer)


def _batches(run_id: str) -> list[int]:
    """Rows of each done batch of ``run_id`` (a partition drop is one)."""
    with open_audit(from_environment).connect() as conn:
        return list(conn.execute(sa.select(purge_batches.c.rows_done).where(
            purge_batches.c.run_id == run_id, purge_batches.c.state == "done")).scalars())


def test_old_partitions_go_whole_and_the_boundary_partition_by_batches(shop, tmp_path):
    db, rows = shop
    expired = _expired(rows)
    names = _partitions(db, tmp_path)

    certificate = runner().run(_rule(tmp_path), run_id="r1", as_of=AS_OF)

    assert ids(db, "events") == set(rows) - expired  # exactly the expired set
    assert certificate.status == "complete"
    (target,) = certificate.data["targets"]
    per_partition = len(DAYS) * len(CUSTOMERS)
    assert target["partitions"] == {_name(db.backend, m): per_partition for m in OLD_MONTHS}
    assert target["deleted"] == len(expired)
    assert _partitions(db, tmp_path) == names - {_name(db.backend, m) for m in OLD_MONTHS}
    # The boundary partition's expired rows (June 1st and 10th) went in batches of rows.
    assert target["deleted"] - sum(target["partitions"].values()) == 2 * len(CUSTOMERS)
    assert len(_batches("r1")) > len(OLD_MONTHS)


def test_a_hold_inside_an_old_partition_keeps_that_partition_and_its_rows(shop, tmp_path):
    db, rows = shop
    march = next(i for i, (customer, at) in rows.items() if at.month == 3 and customer == 2)
    HoldRegistry(open_audit(from_environment)).add(
        category="customer_accounts", match={"id": march}, case_id="C-1", reason="dispute")

    certificate = runner().run(_rule(tmp_path), run_id="r1", as_of=AS_OF)

    assert ids(db, "events") == set(rows) - _expired(rows, keep=lambda i, _c: i == march)
    (target,) = certificate.data["targets"]
    assert set(target["partitions"]) == {_name(db.backend, m) for m in OLD_MONTHS if m != 3}
    assert target["held"] == 1
    assert _name(db.backend, 3) in _partitions(db, tmp_path)


def test_a_where_filter_walks_every_partition(shop, tmp_path):
    db, rows = shop
    names = _partitions(db, tmp_path)

    certificate = runner().run(_rule(tmp_path, where="{customer_id: 1}"), run_id="r1", as_of=AS_OF)

    assert ids(db, "events") == set(rows) - _expired(rows, keep=lambda _i, customer: customer != 1)
    assert "partitions" not in certificate.data["targets"][0]
    assert _partitions(db, tmp_path) == names


def test_the_limit_is_counted_before_a_partition_goes(shop, tmp_path):
    db, rows = shop
    rule_file = _rule(tmp_path)
    r = runner()
    run, _ = r.start(rule_file, run_id="r1", as_of=AS_OF)
    table = r.targets.open(rule_file.rule.target("events"))

    outcome = table.purge(run.cutoff, r.journal.ledger(run, "events"), limit=RecordLimit(20, "max_records 20"))

    # January and February (9 rows each) fit; March would pass the limit, so batches take 2 of it.
    assert outcome.deleted == 20
    assert outcome.stopped is not None
    left = _partitions(db, tmp_path)
    assert {_name(db.backend, 1), _name(db.backend, 2)}.isdisjoint(left)
    assert _name(db.backend, 3) in left
    assert len(set(rows) - ids(db, "events")) == 20


def test_children_of_a_partitioned_parent_are_purged_with_it(pg_db, monkeypatch, audit_db, keys, tmp_path):
    connect(monkeypatch, "shop_db", pg_db)
    _create_pg(pg_db)
    rows = _fill(pg_db)
    pg_db.execute("CREATE TABLE event_notes (id SERIAL PRIMARY KEY, event_id BIGINT NOT NULL, "
                  "event_created_at TIMESTAMPTZ NOT NULL, body TEXT, FOREIGN KEY (event_id, event_created_at) "
                  "REFERENCES events (id, created_at))")
    pg_db.execute("CREATE INDEX event_notes_event ON event_notes (event_id, event_created_at)")
    pg_db.execute("INSERT INTO event_notes (event_id, event_created_at, body) "
                  "SELECT id, created_at, 'note' FROM events WHERE id % 2 = 0")
    names = _partitions(pg_db, tmp_path)
    children = "[{table: event_notes, foreign_key: [event_id, event_created_at]}]"

    certificate = runner().run(_rule(tmp_path, children=children), run_id="r1", as_of=AS_OF)

    expired = _expired(rows)
    assert ids(pg_db, "events") == set(rows) - expired
    assert {r[0] for r in pg_db.rows("SELECT event_id FROM event_notes")} == {
        i for i in set(rows) - expired if i % 2 == 0}
    assert certificate.status == "complete"
    assert _partitions(pg_db, tmp_path) == names  # the children are purged by batches, partitions stay


def test_a_default_partition_detaches_without_concurrently(pg_db, monkeypatch, audit_db, keys, tmp_path):
    connect(monkeypatch, "shop_db", pg_db)
    _create_pg(pg_db, default=True)
    rows = _fill(pg_db)

    certificate = runner().run(_rule(tmp_path), run_id="r1", as_of=AS_OF)

    assert ids(pg_db, "events") == set(rows) - _expired(rows)
    assert len(certificate.data["targets"][0]["partitions"]) == len(OLD_MONTHS)


def _cli_run(rules_dir, run_id: str, point: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if point:
        env["RETENTION_FAILPOINTS"] = f"{point}:kill"
    return subprocess.run(
        [sys.executable, "-m", "retention.interfaces.cli", "run", "--rules", str(rules_dir), "--as-of",
         AS_OF.isoformat(), "--run-id", run_id], capture_output=True, text=True, env=env)


# MariaDB drops a partition in one statement: it has no detached state to crash in.
CRASHES = [("postgresql", point) for point in ("sql.partition_pending=1", "sql.partition_detached=1",
                                               "sql.partition_detached=3", "sql.partition_dropped=2")] + [
    (backend, point) for backend in ("mariadb", "mariadb-to_days")
    for point in ("sql.partition_pending=1", "sql.partition_dropped=2")]


@pytest.mark.parametrize(("shop", "point"), CRASHES, indirect=["shop"])
def test_a_crash_during_a_drop_settles_on_the_next_run(shop, tmp_path, point):
    db, rows = shop
    certificates = killed_then_finished(db, rows, _rule(tmp_path).path.parent, point, tmp_path)
    dropped = {**certificates["killed"]["targets"][0].get("partitions", {}),
               **certificates["next"]["targets"][0].get("partitions", {})}
    assert dropped == {_name(db.backend, m): len(DAYS) * len(CUSTOMERS) for m in OLD_MONTHS}


def killed_then_finished(db, rows, rules_dir, point: str, tmp_path) -> dict[str, dict]:
    """A run killed at ``point``, then the next one: every expired row gone (the old months'
    partitions with them, no detached table left), every other row there, and the two
    certificates' deletions adding up to the expired rows exactly. Their payloads by run id."""
    killed = _cli_run(rules_dir, "killed", point)
    assert killed.returncode == -9, killed.stderr
    finished = _cli_run(rules_dir, "next")
    assert finished.returncode == 0, finished.stderr

    expired = _expired(rows)
    assert ids(db, "events") == set(rows) - expired
    assert not {_name(db.backend, m) for m in OLD_MONTHS} & _partitions(db, tmp_path)
    if db.backend == "postgresql":  # no detached table is left behind
        assert pg_tables(db) == {"events_2024_06", "events_2024_07", "events_2024_08", "events_later"}
    certificates = {c.run_id: c.data for c in read_certificates(open_audit(from_environment))}
    deleted = [certificates[run]["targets"][0]["deleted"] for run in ("killed", "next")]
    assert sum(deleted) == len(expired)  # nothing lost, nothing counted twice
    return certificates


def pg_tables(db) -> set[str]:
    return {r[0] for r in db.rows("SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                                  "AND tablename LIKE 'events_%'")}


def test_an_unpartitioned_table_has_no_partitions(pg_db, monkeypatch, audit_db, keys, tmp_path):
    connect(monkeypatch, "shop_db", pg_db)
    pg_db.execute("CREATE TABLE events (id BIGINT PRIMARY KEY, customer_id INT NOT NULL, "
                  "created_at TIMESTAMPTZ NOT NULL, note TEXT)")
    pg_db.execute("INSERT INTO events VALUES (1, 1, '2020-01-01T00:00:00Z', 'a'), (2, 1, '2026-01-01T00:00:00Z', 'b')")

    certificate = runner().run(_rule(tmp_path, key="[id]"), run_id="r1", as_of=AS_OF)

    assert ids(pg_db, "events") == {2}
    assert "partitions" not in certificate.data["targets"][0]
    assert _partitions(pg_db, tmp_path, key="[id]") == set()


def test_a_table_another_transaction_holds_is_walked_in_batches(mysql_db, monkeypatch, audit_db, keys, tmp_path):
    connect(monkeypatch, "shop_db", mysql_db)
    _create_mariadb(mysql_db)
    rows = _fill(mysql_db)
    names = _partitions(mysql_db, tmp_path)

    with mysql_db.engine.connect() as reader:
        # An open transaction that read the table holds its metadata lock: no partition can
        # be dropped until it ends, but rows can still be deleted beside it.
        reader.execute(sa.text("SELECT id FROM events WHERE created_at < '2024-02-01' LIMIT 1")).all()
        certificate = runner().run(_rule(tmp_path), run_id="r1", as_of=AS_OF)
        reader.rollback()

    assert ids(mysql_db, "events") == set(rows) - _expired(rows)
    assert certificate.status == "complete"
    assert "partitions" not in certificate.data["targets"][0]
    assert _partitions(mysql_db, tmp_path) == names


def test_a_partition_drop_is_journaled_by_name_and_read_back_byte_for_byte():
    from retention.targets.sql.descriptors import BatchDescriptor, BatchRange
    from retention.targets.sql.partitions import dropped_partitions

    text = BatchDescriptor(BatchRange(None, None), tables={"events": 9}, holds=(), partition="public.events_2024_01").encode()
    assert BatchDescriptor.decode(text).encode() == text
    assert BatchDescriptor.decode(text).partition == "public.events_2024_01"
    rows = BatchDescriptor(BatchRange(None, (5,)), tables={"events": 3}, holds=()).encode()
    assert "partition" not in rows  # batches of rows keep the bytes they always had
    assert dropped_partitions([text, rows, '{"scrubbed": true}']) == {"public.events_2024_01": 9}


def test_a_row_written_into_a_partition_between_its_count_and_its_drop_is_counted(shop, monkeypatch, tmp_path):
    # A late writer (an old event replayed) adds a row to January after the partition was
    # counted and journaled, before it is detached (PostgreSQL) or dropped (MariaDB): the
    # drop takes it, and the certificate and the journal say so; nothing goes uncounted.

    db, rows = shop
    late = datetime(2024, 1, 25, tzinfo=UTC)
    _write_once_at(monkeypatch, "sql.partition_pending", db, "INSERT INTO events VALUES (10000, 1, :at, 'late')",
                   {"at": late if db.backend == "postgresql" else late.replace(tzinfo=None)})
    certificate = runner().run(_rule(tmp_path), run_id="r1", as_of=AS_OF)

    assert ids(db, "events") == set(rows) - _expired(rows)
    (target,) = certificate.data["targets"]
    per_partition = len(DAYS) * len(CUSTOMERS)
    assert target["partitions"][_name(db.backend, 1)] == per_partition + 1
    assert target["deleted"] == len(_expired(rows)) + 1
    assert sum(_batches("r1")) == len(_expired(rows)) + 1


def test_a_detached_partition_given_a_young_row_before_its_drop_is_left_in_place(pg_db, monkeypatch, audit_db,
                                                                                 keys, tmp_path):
    # Detached without CONCURRENTLY (beside a default partition), a partition keeps no
    # range: a row written into it by name could be anything. One that is not expired stops
    # the drop; the table is left for a person. (CONCURRENTLY leaves its range as a CHECK.)
    db = pg_db
    connect(monkeypatch, "shop_db", db)
    _create_pg(db, default=True)
    _fill(db)
    _write_once_at(monkeypatch, "sql.partition_detached", db,
                   "INSERT INTO events_2024_01 VALUES (10000, 1, :at, 'young')", {"at": AS_OF})
    certificate = runner().run(_rule(tmp_path), run_id="r1", as_of=AS_OF)
    (target,) = certificate.data["targets"]
    assert target["status"] == "failed"
    assert "not expired or are held" in target["error"] and "left in place" in target["error"]
    assert db.scalar("SELECT count(*) FROM events_2024_01 WHERE id = 10000") == 1
    assert db.scalar("SELECT count(*) FROM events_2024_01") == len(DAYS) * len(CUSTOMERS) + 1


def test_rows_written_before_the_detach_beyond_the_limit_leave_the_partition_detached(pg_db, monkeypatch, audit_db,
                                                                                      keys, tmp_path):
    # January's 9 rows fit a limit of 9; a late row makes 10: the limit is not passed, the
    # partition is left detached (the pending batch says so), nothing is dropped.
    from retention.targets.sql.partitions import PartitionLeftDetached

    db = pg_db
    connect(monkeypatch, "shop_db", db)
    _create_pg(db)
    _fill(db)
    _write_once_at(monkeypatch, "sql.partition_pending", db, "INSERT INTO events VALUES (10000, 1, :at, 'late')",
                   {"at": datetime(2024, 1, 25, tzinfo=UTC)})
    rule_file = _rule(tmp_path)
    r = runner()
    run, _ = r.start(rule_file, run_id="r1", as_of=AS_OF)
    table = r.targets.open(rule_file.rule.target("events"))
    with pytest.raises(PartitionLeftDetached, match="more than is left of the limit"):
        table.purge(run.cutoff, r.journal.ledger(run, "events"), limit=RecordLimit(9, "max_records 9"))
    assert db.scalar("SELECT count(*) FROM events_2024_01") == len(DAYS) * len(CUSTOMERS) + 1
    assert _batches("r1") == []


def test_mariadb_rows_written_before_the_drop_beyond_the_limit_leave_the_partition_to_the_walk(
        mysql_db, monkeypatch, audit_db, keys, tmp_path):
    # On MariaDB nothing is detached first: a partition given rows beyond the limit between its
    # count and its drop (counted again under LOCK TABLES) is left in place, and the walk, batch
    # by batch, stops at the limit.
    db = mysql_db
    connect(monkeypatch, "shop_db", db)
    _create_mariadb(db)
    _fill(db)
    _write_once_at(monkeypatch, "sql.partition_pending", db, "INSERT INTO events VALUES (10000, 1, :at, 'late')",
                   {"at": datetime(2024, 1, 25)})
    rule_file = _rule(tmp_path)
    r = runner()
    run, _ = r.start(rule_file, run_id="r1", as_of=AS_OF)
    table = r.targets.open(rule_file.rule.target("events"))
    outcome = table.purge(run.cutoff, r.journal.ledger(run, "events"), limit=RecordLimit(9, "max_records 9"))
    assert outcome.deleted == 9 and outcome.stopped is not None
    assert "p2024_01" in {p.split(".")[-1] for p in _partitions(db, tmp_path)}  # not dropped whole
    assert db.scalar("SELECT count(*) FROM events WHERE created_at < '2024-02-01'") == 10  # all still there
    assert sum(_batches("r1")) == 9  # what the limit allowed went instead (a later month, whole)
