"""Set-based anonymize gives today's values: the same rows, on every backend, as the per-row
Python path computes them (hash, redact, generalize, null; NULLs, empty strings, non-ASCII
text, a latin1 column, dates, naive and zoned timestamps), and survives a kill like it."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import subprocess
import sys
from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

from retention.connections import from_environment
from retention.evidence.audit import open_audit
from retention.evidence.chain import read_certificates
from retention.rules.loader import load_rule_file
from retention.rules.strategies import Strategy
from retention.targets.sql.anonymize import Anonymizer, AnonymizeRows
from retention.targets.sql.anonymize_sql import HmacPads, sql_values

from conftest import connect, write_rule
from sqlpurge import runner

UTC = timezone.utc
AS_OF = datetime(2026, 6, 15, tzinfo=UTC)
CUTOFF = datetime(2024, 6, 15, tzinfo=UTC)
SHORT_KEY = "a-test-key-of-more-than-16-bytes"
LONG_KEY = "a-key-longer-than-the-64-byte-sha256-block-so-hmac-hashes-it-first-0123456789"
ZONED = {"postgresql": "TIMESTAMPTZ", "mariadb": "TIMESTAMP(6) NULL", "sqlite": "TIMESTAMP"}
NAIVE = {"postgresql": "TIMESTAMP", "mariadb": "DATETIME(6)", "sqlite": "TIMESTAMP"}
STRATEGIES = (
    "        email: hash\n        note: hash\n        legacy: hash\n"
    "        phone: {redact: {keep_last: 2}}\n        code: {redact: {keep_last: 0}}\n"
    "        tag: {redact: {keep_last: 9}}\n        full_name: 'null'\n"
    "        postcode: {generalize: {prefix: 3}}\n        initial: {generalize: {prefix: 0}}\n"
    "        birth_date: {generalize: year}\n        visit_date: {generalize: month}\n"
    "        joined_at: {generalize: month}\n        seen_at: {generalize: year}\n"
)
TEXTS = ["person{i}@example.com", "", "José Müller {i}", "naïve café ß {i}", "  spaced {i}  ", "日本語テキスト{i}",
         "emoji 🙂 {i}", "x", None]
LATIN1 = ["Crème brûlée {i}", "", "plain {i}", "Øre {i}", None]


def create_people(db) -> None:
    latin1 = " CHARACTER SET latin1" if db.backend == "mariadb" else ""
    db.execute(
        "CREATE TABLE people (id INTEGER PRIMARY KEY, email VARCHAR(255), note TEXT, "
        f"legacy VARCHAR(100){latin1}, phone VARCHAR(30), code VARCHAR(40), tag VARCHAR(10), "
        "full_name VARCHAR(100), postcode VARCHAR(10), initial VARCHAR(10), birth_date DATE, visit_date DATE, "
        f"joined_at {ZONED[db.backend]}, seen_at {NAIVE[db.backend]}, closed_at {NAIVE[db.backend]}, "
        f"anonymized_at {NAIVE[db.backend]})"
    )
    db.execute("CREATE INDEX people_closed_at ON people (closed_at)")


def fill_people(db, n: int = 45) -> set[int]:
    """``n`` people, every other one closed before the cutoff, with awkward values throughout."""
    expired = {i for i in range(1, n + 1) if i % 2}
    people = []
    for i in range(1, n + 1):
        def text(options: list[str | None], shift: int = 0, i: int = i) -> str | None:
            choice = options[(i + shift) % len(options)]
            return None if choice is None else choice.format(i=i)

        # Summer and winter moments, near midnight and the turn of a month, with microseconds.
        moment = datetime(2020, 1, 1, tzinfo=UTC) + timedelta(days=37 * i, hours=(5 * i) % 24, microseconds=i)
        closed = CUTOFF - timedelta(days=i) if i in expired else CUTOFF + timedelta(days=i)
        people.append({
            "id": i, "email": text(TEXTS), "note": text(TEXTS, 3), "legacy": text(LATIN1),
            "phone": text(["+44 7700 900{i:03d}", "1", "", None, "+33 6 12 34 56 78"]),
            "code": text(["CODE-{i}", "é", None]), "tag": text(["ab", "abcdefghij", "äöü", None, "123456789"]),
            "full_name": text(["Person {i}", None]), "postcode": text(["SW{i}A 1AA", "75", "Ü", "", None]),
            "initial": text(["Q", None]),
            "birth_date": None if i % 7 == 0 else date(1950, 1, 1) + timedelta(days=271 * i),
            "visit_date": None if i % 5 == 0 else date(2021, 1, 31) + timedelta(days=29 * i),
            "joined_at": None if i % 6 == 0 else _stored(db, moment, zoned=True),
            "seen_at": None if i % 8 == 0 else _stored(db, moment - timedelta(hours=3), zoned=False),
            "closed_at": _stored(db, closed, zoned=False), "anonymized_at": None,
        })
    with db.engine.begin() as conn:
        conn.execute(sa.Table("people", sa.MetaData(), autoload_with=conn).insert(), people)
    return expired


def _stored(db, moment: datetime, *, zoned: bool) -> datetime:
    return moment if db.backend == "postgresql" and zoned else moment.replace(tzinfo=None)


def people_rule(tmp_path, *, max_batch_rows: int = 4, columns: str = STRATEGIES):
    text = (
        "category: closed_people\ndescription: d\nowner: crm\nlegal_basis: l\nretain_for: P2Y\naction: anonymize\n"
        "targets:\n  - name: people\n    kind: sql\n    connection: crm_db\n    table: people\n    key: [id]\n"
        f"    age_column: closed_at\n    max_batch_rows: {max_batch_rows}\n    max_fraction: 1.0\n"
        "    anonymize:\n      marker: anonymized_at\n      columns:\n" + columns
    )
    return write_rule(tmp_path / "rules", "closed_people", text=text)


def snapshot(db) -> dict[int, dict]:
    with db.engine.connect() as conn:
        t = sa.Table("people", sa.MetaData(), autoload_with=conn)
        return {r["id"]: dict(r) for r in conn.execute(sa.select(t)).mappings()}


def anonymize(db, rule_path, monkeypatch, *, set_based: bool, run_id: str):
    """A fresh ``people`` table anonymized by one run on the chosen path; its rows and certificate."""
    db.execute("DROP TABLE IF EXISTS people")
    create_people(db)
    expired = fill_people(db)
    monkeypatch.setattr(AnonymizeRows, "set_based", set_based)
    certificate = runner().run(load_rule_file(rule_path), run_id=run_id, as_of=AS_OF)
    assert certificate.status == "complete"
    assert certificate.data["targets"][0]["anonymized"] == len(expired)
    return snapshot(db), expired


@pytest.fixture
def crm(db, monkeypatch, audit_db, keys):
    connect(monkeypatch, "crm_db", db)
    monkeypatch.setenv("RETENTION_HASH_KEY", SHORT_KEY)
    return db


def _path_taken(caplog) -> set[str]:
    messages = [r.getMessage() for r in caplog.records if r.name == "retention.targets.sql.anonymize"]
    return {"set-based" if "one UPDATE per batch" in m else "python" for m in messages if "anonymized" in m}


@pytest.mark.parametrize("key", [SHORT_KEY, LONG_KEY], ids=["key-32-bytes", "key-over-64-bytes"])
def test_set_based_gives_the_python_paths_rows_exactly(crm, tmp_path, monkeypatch, caplog, key):
    monkeypatch.setenv("RETENTION_HASH_KEY", key)
    rule_path = people_rule(tmp_path)
    caplog.set_level(logging.INFO, logger="retention.targets.sql.anonymize")

    python_rows, expired = anonymize(crm, rule_path, monkeypatch, set_based=False, run_id="python")
    assert _path_taken(caplog) == {"python"}
    caplog.clear()
    sql_rows, _ = anonymize(crm, rule_path, monkeypatch, set_based=True, run_id="sql")

    # SQLite keeps the Python path; the server backends compute every strategy in SQL.
    assert _path_taken(caplog) == ({"python"} if crm.backend == "sqlite" else {"set-based"})
    assert sql_rows == python_rows
    assert 9 in expired and sql_rows[9]["email"] == hmac.new(key.encode(), b"person9@example.com",
                                                             hashlib.sha256).hexdigest()
    assert sql_rows[1]["email"] == hmac.new(key.encode(), b"", hashlib.sha256).hexdigest()  # empty is not NULL
    assert {i for i, row in sql_rows.items() if row["anonymized_at"] is not None} == expired


@pytest.mark.parametrize("zone", ["America/New_York", "Europe/London", "UTC"])
def test_generalized_timestamps_equal_pythons_in_any_session_time_zone(pg_db, zone):
    # Engines set their sessions to UTC, but the expression must not rely on it: the driver
    # hands Python a timestamptz at the zone's offset of that moment, and truncating keeps
    # that offset (which the first of the month may not have).
    create_people(pg_db)
    fill_people(pg_db)
    strategies = {"joined_at": Strategy.parse({"generalize": "month"}), "seen_at": Strategy.parse({"generalize": "year"}),
                  "birth_date": Strategy.parse({"generalize": "year"}),
                  "visit_date": Strategy.parse({"generalize": "month"})}
    with pg_db.engine.connect() as conn:
        conn.execute(sa.text("SELECT set_config('TimeZone', :zone, false)"), {"zone": zone})
        people = sa.Table("people", sa.MetaData(), autoload_with=conn)
        values, why = sql_values(people, strategies, conn.dialect, None)
        assert values is not None, why
        names = list(strategies)
        query = sa.select(*[people.c[n] for n in names], *[values[n].label(f"sql_{n}") for n in names])
        rows = conn.execute(query).all()

    python = Anonymizer(None)
    for row in rows:
        for j, name in enumerate(names):
            assert row[len(names) + j] == python.apply(strategies[name], row[j]), (zone, name, row[j])
    if zone == "America/New_York":
        new_york = ZoneInfo(zone)
        kept = [row[len(names)] for row in rows if row[len(names)] and row[len(names)].astimezone(new_york).hour]
        assert kept  # some values began their month at another offset than their own


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_a_column_sql_cannot_compute_exactly_sends_its_table_to_python(backend, new_database, audit_db, keys,
                                                                       tmp_path, monkeypatch, caplog):
    db = new_database(backend)
    connect(monkeypatch, "crm_db", db)
    db.execute("CREATE TABLE people (id INTEGER PRIMARY KEY, phone CHAR(12), email VARCHAR(100), "
               "closed_at DATE, anonymized_at DATE)")
    db.execute("INSERT INTO people VALUES (1, 'abc', 'a@example.com', '2020-01-01', NULL), "
               "(2, '0123456789', 'b@example.com', '2026-01-01', NULL)")
    caplog.set_level(logging.INFO, logger="retention.targets.sql.anonymize")
    rule_path = people_rule(tmp_path, columns="        phone: {redact: {keep_last: 2}}\n        email: 'null'\n")
    with db.engine.connect() as conn:
        (before,) = conn.execute(sa.text("SELECT phone FROM people WHERE id = 1")).one()

    certificate = runner().run(load_rule_file(rule_path), run_id="r1", as_of=AS_OF)

    assert certificate.data["targets"][0]["anonymized"] == 1
    assert _path_taken(caplog) == {"python"}
    assert any("redact(keep_last=2) of 'phone'" in r.getMessage() for r in caplog.records)
    rows = snapshot(db)
    # PostgreSQL hands Python a CHAR padded to its length (which SQL's char_length ignores).
    assert rows[1]["phone"] == Anonymizer(None).apply(Strategy.parse({"redact": {"keep_last": 2}}), before)
    assert rows[1]["email"] is None and rows[2]["email"] == "b@example.com" and rows[2]["phone"].rstrip() == "0123456789"


@pytest.mark.parametrize("length", [16, 32, 64, 65, 200])
def test_the_pads_are_the_ones_hmac_derives(length):
    key = bytes(range(length)) if length < 256 else os.urandom(length)
    pads = HmacPads.of(key)
    for message in (b"", b"person@example.com", "José 🙂".encode()):
        inner = hashlib.sha256(pads.inner + message).digest()
        assert hashlib.sha256(pads.outer + inner).hexdigest() == hmac.new(key, message, hashlib.sha256).hexdigest()
    assert repr(pads) == "HmacPads()"  # as secret as the key: never in a log line


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
@pytest.mark.parametrize("point", ["sql.before_commit=2", "sql.after_commit=2"])
def test_a_set_based_run_killed_mid_batch_settles_on_the_next_run(backend, point, new_database, audit_db, keys,
                                                                   tmp_path, monkeypatch):
    db = new_database(backend)
    connect(monkeypatch, "crm_db", db)
    monkeypatch.setenv("RETENTION_HASH_KEY", SHORT_KEY)
    rule_path = people_rule(tmp_path)
    create_people(db)
    expired = fill_people(db)

    killed = _cli(rule_path.parent, "killed", point)
    assert killed.returncode == -9, killed.stderr
    finished = _cli(rule_path.parent, "next")
    assert finished.returncode == 0, finished.stderr
    after_crash = snapshot(db)
    assert {i for i, row in after_crash.items() if row["anonymized_at"] is not None} == expired

    certificates = [c for c in read_certificates(open_audit(from_environment)) if c.category == "closed_people"]
    assert sorted(c.run_id for c in certificates) == ["killed", "next"]
    assert sum(c.data["targets"][0]["anonymized"] for c in certificates) == len(expired)  # none lost, none twice
    python_rows, _ = anonymize(db, rule_path, monkeypatch, set_based=False, run_id="python")
    assert after_crash == python_rows  # what an uninterrupted run on the Python path leaves


def _cli(rules_dir, run_id: str, point: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if point:
        env["RETENTION_FAILPOINTS"] = f"{point}:kill"
    return subprocess.run(
        [sys.executable, "-m", "retention.interfaces.cli", "run", "--rules", str(rules_dir), "--as-of",
         "2026-06-15T00:00:00Z", "--run-id", run_id],
        capture_output=True, text=True, env=env,
    )


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_two_walkers_anonymize_every_expired_row_once_set_based(backend, new_database, audit_db, keys, tmp_path,
                                                                monkeypatch, caplog):
    """``workers: 2`` (the way past one backend's speed): each expired row hashed exactly once
    (a hash of the hash would differ), every other row untouched, both walkers used."""
    import threading

    db = new_database(backend)
    connect(monkeypatch, "crm_db", db)
    monkeypatch.setenv("RETENTION_HASH_KEY", SHORT_KEY)
    db.execute(f"CREATE TABLE people (id INTEGER PRIMARY KEY, email VARCHAR(100), phone VARCHAR(30), "
               f"closed_at {NAIVE[backend]} NOT NULL, anonymized_at {NAIVE[backend]} NULL)")
    db.execute("CREATE INDEX people_closed_at ON people (closed_at)")
    # 30,000 people, 24,000 closed before the cutoff (enough for two shares), many sharing a closing minute.
    closed = (CUTOFF - timedelta(days=400)).replace(tzinfo=None)
    with db.engine.begin() as conn:
        if backend == "postgresql":
            conn.exec_driver_sql(
                "INSERT INTO people SELECT g, 'p' || g || '@example.com', '+44 ' || g, "
                f"CASE WHEN g <= 24000 THEN timestamp '{closed}' + (g / 7) * interval '1 minute' "
                "ELSE timestamp '2026-06-01 00:00:00' END, NULL FROM generate_series(1, 30000) g")
        else:
            conn.exec_driver_sql(
                "INSERT INTO people SELECT seq, CONCAT('p', seq, '@example.com'), CONCAT('+44 ', seq), "
                f"IF(seq <= 24000, TIMESTAMP '{closed}' + INTERVAL (seq DIV 7) MINUTE, TIMESTAMP '2026-06-01 00:00:00'), "
                "NULL FROM seq_1_to_30000")
    text = (
        "category: closed_people\ndescription: d\nowner: crm\nlegal_basis: l\nretain_for: P2Y\naction: anonymize\n"
        "targets:\n  - name: people\n    kind: sql\n    connection: crm_db\n    table: people\n    key: [id]\n"
        "    age_column: closed_at\n    max_batch_rows: 2000\n    max_fraction: 1.0\n    workers: 2\n"
        "    anonymize:\n      marker: anonymized_at\n      columns:\n"
        "        email: hash\n        phone: {redact: {keep_last: 2}}\n"
    )
    rule_path = write_rule(tmp_path / "rules", "closed_people", text=text)
    caplog.set_level(logging.INFO, logger="retention.targets.sql.anonymize")
    threads = set()

    certificate = runner().run(load_rule_file(rule_path), run_id="r1", as_of=AS_OF,
                               progress=lambda *a: threads.add(threading.current_thread().name))

    assert certificate.status == "complete"
    assert certificate.data["targets"][0]["anonymized"] == 24000
    assert _path_taken(caplog) == {"set-based"}
    assert len({name for name in threads if name.startswith("walk-")}) == 2
    redact = Strategy.parse({"redact": {"keep_last": 2}})
    wrong = []
    for i, row in snapshot(db).items():
        email, phone = f"p{i}@example.com", f"+44 {i}"
        if i <= 24000:
            expected = (hmac.new(SHORT_KEY.encode(), email.encode(), hashlib.sha256).hexdigest(),
                        Anonymizer(None).apply(redact, phone), True)
        else:
            expected = (email, phone, False)
        if (row["email"], row["phone"], row["anonymized_at"] is not None) != expected:
            wrong.append(i)
    assert wrong == []


def test_the_plan_says_when_the_anonymize_rewrites_indexed_columns(db, monkeypatch, audit_db, keys, tmp_path):
    """An index on an anonymized column (or the marker) makes every row's update write index
    entries too (on PostgreSQL: no HOT update): the plan tells the reviewer which columns."""
    from retention.plan.builder import build_plan
    from retention.targets import Targets

    connect(monkeypatch, "crm_db", db)
    monkeypatch.setenv("RETENTION_HASH_KEY", SHORT_KEY)
    create_people(db)
    fill_people(db)
    rule_file = load_rule_file(people_rule(tmp_path))

    def index_notes() -> list[str]:
        with Targets(from_environment) as targets:
            notes = build_plan(rule_file, AS_OF, targets).targets[0].notes
        return [n for n in notes if "indexed columns" in n]

    assert index_notes() == []  # closed_at (the age) and id (the key) are indexed, but never rewritten
    db.execute("CREATE INDEX people_email ON people (email)")
    db.execute("CREATE INDEX people_seen ON people (seen_at, closed_at)")
    if db.backend == "postgresql":  # a partial index reads the marker
        db.execute("CREATE INDEX people_todo ON people (closed_at) WHERE anonymized_at IS NULL")
    (note,) = index_notes()
    expected = "email, seen_at, anonymized_at" if db.backend == "postgresql" else "email, seen_at"
    assert f"rewrites indexed columns ({expected})" in note
    assert ("no HOT update" in note) == (db.backend == "postgresql")
