"""Evidence that holds up: no secret in an error, a private signing key, rows an attacker
planted, and a keyring that says which key may sign which certificates (issue #9: 13, 14, 15, 18)."""

from __future__ import annotations

import base64
import json
import sqlite3
from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from retention.evidence.checkpoints import CHECKPOINTS_ENV
from retention.evidence.signing import SIGNING_KEY_ENV, generate_keypair
from retention.interfaces.cli import main

from conftest import connect, write_rule
from sqlpurge import ids, insert_customers, make_customers

UTC = timezone.utc
PASSWORD = "Hunter2"


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """Exit code and everything printed (stdout and stderr)."""
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture
def crm(sqlite_db, audit_db, keys, monkeypatch, tmp_path):
    """A SQLite customers table with 40 closed accounts, its rule, a SQLite audit database."""
    connect(monkeypatch, "crm_db", sqlite_db)
    make_customers(sqlite_db)
    insert_customers(sqlite_db, [(i, "closed", datetime(2020, 1, 1, tzinfo=UTC) + timedelta(days=30 * i))
                                 for i in range(1, 41)])
    write_rule(tmp_path / "rules")
    return sqlite_db


def night(capsys, tmp_path, n: int) -> None:
    """One nightly run, as of the first of month ``n`` of 2023."""
    code, output = run_cli(capsys, "run", "--rules", str(tmp_path / "rules"),
                           "--as-of", f"2023-{n:02d}-01T03:00:00Z", "--run-id", f"night-{n}")
    assert code == 0, output


# -- 13: no secret in an error ----------------------------------------------------------------


@pytest.mark.parametrize("value", [
    f"postgres://svc:{PASSWORD}#x@host:5432/db",           # '#' starts a fragment: the port became the password
    f"postgres://svc:{PASSWORD}/x@host:5432/db",           # '/' ends the authority early
    f"postgres://svc:{PASSWORD}?x@host:5432/db",           # '?' starts the query early
    f"postgres://svc:{PASSWORD}[x@host:5432/db",           # '[' reads as an IPv6 literal
    "postgres://svc:5432#x@host:5432/db",                  # a numeric password would pass as a port
    json.dumps({"conn_type": "postgres", "host": "h", "login": "svc", "password": PASSWORD, "port": PASSWORD}),
    json.dumps({"conn_type": "postgres", "host": "h", "password": PASSWORD, "extra": "{" + PASSWORD}),
    f'{{"conn_type": "postgres", "password": "{PASSWORD}",',
    json.dumps(["postgres", PASSWORD]),
])
def test_item13_a_malformed_connection_never_shows_its_password(value, crm, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("AIRFLOW_CONN_CRM_DB", value)

    code, output = run_cli(capsys, "plan", "--rules", str(tmp_path / "rules"), "--as-of", "2023-01-01T00:00:00Z")

    secret = "5432#x" if value.startswith("postgres://svc:5432#") else PASSWORD
    assert code == 2
    assert "connection crm_db" in output
    assert secret not in output and "Traceback" not in output


def test_item13_a_malformed_audit_connection_never_shows_its_password(monkeypatch, capsys):
    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_AUDIT", f"postgres://svc:{PASSWORD}#x@host:5432/db")

    code, output = run_cli(capsys, "certificates")

    assert code == 2 and "connection retention_audit" in output and PASSWORD not in output


def test_item13_a_database_error_never_shows_the_password(pg_db, monkeypatch, capsys):
    """The driver's message is printed, scrubbed of every password the process was given."""
    # A database whose name is the password: the server's refusal names it.
    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_AUDIT", f"postgres://postgres:{PASSWORD}x@127.0.0.1:5432/{PASSWORD}x")

    code, output = run_cli(capsys, "certificates")

    assert code == 1 and "database error:" in output
    assert PASSWORD not in output and "***" in output


def test_item13_a_well_formed_uri_still_parses():
    from retention.connections import ConnectionSpec

    spec = ConnectionSpec.from_uri("crm_db", "postgres://svc:Hunter2%23x@db.example:5432/crm")

    assert (spec.login, spec.password, spec.host, spec.port, spec.schema) == ("svc", "Hunter2#x", "db.example", 5432,
                                                                              "crm")


# -- 14: the signing key is private ----------------------------------------------------------


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_item14_a_signing_key_others_can_read_is_refused_before_anything_is_touched(mode, crm, keys, audit_db,
                                                                                       tmp_path, capsys):
    keys[0].chmod(mode)
    before = ids(crm)

    code, output = run_cli(capsys, "run", "--rules", str(tmp_path / "rules"), "--as-of", "2023-01-01T03:00:00Z")
    checkpoint = run_cli(capsys, "checkpoint", "--to", str(tmp_path / "cp"))

    assert code == 2
    assert f"signing key {keys[0]}" in output and f"{mode:04o}" in output and f"chmod 600 {keys[0]}" in output
    assert ids(crm) == before
    assert audit_db.scalar("SELECT count(*) FROM sqlite_master WHERE name = 'purge_runs'") == 0  # not even opened
    assert checkpoint[0] == 2 and "chmod 600" in checkpoint[1]


def test_item14_a_private_signing_key_is_used(crm, keys, tmp_path, capsys):
    keys[0].chmod(0o400)

    night(capsys, tmp_path, 1)


# -- 15: rows an attacker planted ------------------------------------------------------------


class Sql(str):
    """A value planted as this SQL expression (to store bytes that are not UTF-8 as TEXT)."""


def _plant(audit_db, **row) -> None:
    """Insert a row as a superuser would: triggers off, any type in any column (SQLite allows it)."""
    conn = sqlite3.connect(audit_db.url.database)
    values = {"category": "customer_accounts", "run_id": "planted", "status": "complete",
              "issued_at": "2023-03-01 03:00:00.000000", "payload": "{}", "signature": "AAAA",
              "key_id": "0" * 64, "prev_hash": "1" * 64, "entry_hash": "2" * 64} | row
    with conn:
        conn.execute("DROP TRIGGER IF EXISTS purge_certificates_no_update")
        conn.execute("DROP TRIGGER IF EXISTS purge_certificates_no_delete")
        columns = ", ".join(values)
        marks = ", ".join(v if isinstance(v, Sql) else "?" for v in values.values())
        conn.execute(f"INSERT INTO purge_certificates ({columns}) VALUES ({marks})",
                     [v for v in values.values() if not isinstance(v, Sql)])
    conn.close()


DEEP = "[" * 200_000 + "]" * 200_000

PLANTED = {
    "seq-not-a-number": {"seq": "abc"},
    "payload-nested-200000-deep": {"seq": 3, "payload": DEEP},
    "payload-a-blob": {"seq": 3, "payload": b'{"seq": 3}'},
    "issued-at-not-a-time": {"seq": 3, "issued_at": "yesterday"},
    "signature-a-blob": {"seq": 3, "signature": b"\x01\x02", "key_id": b"\x07"},
    "payload-a-json-list": {"seq": 3, "payload": "[1, 2]"},
    "payload-not-utf8": {"seq": 3, "payload": Sql("CAST(x'7bff7d' AS TEXT)")},
    "run-id-not-utf8": {"seq": 3, "run_id": Sql("CAST(x'706c616e746564ff' AS TEXT)")},
}


@pytest.mark.parametrize("planted", PLANTED, ids=list(PLANTED))
def test_item15_verify_names_a_malformed_row_and_exits_1(planted, crm, keys, audit_db, tmp_path, capsys):
    night(capsys, tmp_path, 1)
    night(capsys, tmp_path, 2)
    _plant(audit_db, **PLANTED[planted])

    code, output = run_cli(capsys, "verify", "--public-key", str(keys[1]))
    as_json = run_cli(capsys, "verify", "--public-key", str(keys[1]), "--json")

    assert code == 1
    assert "certificate seq 3" in output and "unreadable" in output and "run " in output
    if planted == "seq-not-a-number":
        assert "'abc'" in output
    assert "Traceback" not in output
    assert as_json[0] == 1 and json.loads(as_json[1])["bad_seq"] == 3


def test_item15_listings_show_malformed_rows_as_unreadable_and_go_on(crm, keys, audit_db, tmp_path, capsys):
    night(capsys, tmp_path, 1)
    night(capsys, tmp_path, 2)
    _plant(audit_db, seq="abc", run_id="planted-a")
    _plant(audit_db, seq=3, payload=DEEP, run_id="planted-b", prev_hash="3" * 64, entry_hash="4" * 64)
    _plant(audit_db, seq=4, payload=b"\x00\xff", run_id="planted-c", prev_hash="5" * 64, entry_hash="6" * 64)
    _plant(audit_db, seq=5, issued_at="yesterday", run_id="planted-d", prev_hash="7" * 64, entry_hash="8" * 64)
    _plant(audit_db, seq=6, payload='{"totals": {"held": "lots"}, "targets": [1]}', run_id="planted-e",
           prev_hash="9" * 64, entry_hash="a" * 64)

    listed = run_cli(capsys, "certificates")
    as_json = run_cli(capsys, "certificates", "--json")
    one = run_cli(capsys, "certificates", "--seq", "3")
    odd = run_cli(capsys, "certificates", "--seq", "6")
    status = run_cli(capsys, "status", "--rules", str(tmp_path / "rules"), "--as-of", "2023-02-01T04:00:00Z")

    assert listed[0] == 0 and "Traceback" not in listed[1]
    assert "night-1" in listed[1] and "night-2" in listed[1]
    assert sum("unreadable" in line for line in listed[1].splitlines()) == 5
    lines = [json.loads(line) for line in as_json[1].splitlines()]
    assert as_json[0] == 0 and [line.get("run_id") for line in lines[:2]] == ["night-1", "night-2"]
    # seq 6 is JSON, so its payload is printed as stored; 'abc' sorts after every number in SQLite
    assert [line.get("unreadable", False) for line in lines] == [False, False, True, True, True, False, True]
    assert one[0] == 1 and "certificate 3 is unreadable" in one[1] and "Traceback" not in one[1]
    assert odd[0] == 1 and "certificate 6 is unreadable" in odd[1]
    assert status[0] in (0, 1) and "Traceback" not in status[1]
    assert "customer_accounts" in status[1] and "unreadable" in status[1]


def test_item15_a_row_whose_text_is_not_utf8_is_listed_as_unreadable(crm, keys, audit_db, tmp_path, capsys):
    night(capsys, tmp_path, 1)
    _plant(audit_db, seq=2, payload=Sql("CAST(x'7bff7d' AS TEXT)"))

    listed = run_cli(capsys, "certificates")
    verified = run_cli(capsys, "verify", "--public-key", str(keys[1]))

    assert listed[0] == 0 and "night-1" in listed[1] and "unreadable" in listed[1]
    assert verified[0] == 1 and "certificate seq 2: the row seq 2" in verified[1] and "not UTF-8" in verified[1]


# -- 18: a keyring; checkpoints name their log -----------------------------------------------


def raw_key(public_pem) -> str:
    """The keyring's form of a public key: base64 of its 32 raw bytes."""
    return base64.b64encode(load_pem_public_key(public_pem.read_bytes()).public_bytes_raw()).decode()


@pytest.fixture
def rotated(crm, keys, tmp_path, monkeypatch, capsys):
    """Seq 1-2 signed with the first key, seq 3 with a second: its public keys' raw forms."""
    night(capsys, tmp_path, 1)
    night(capsys, tmp_path, 2)
    second_private, second_public = generate_keypair(tmp_path / "second")
    monkeypatch.setenv(SIGNING_KEY_ENV, str(second_private))
    night(capsys, tmp_path, 3)
    return raw_key(keys[1]), raw_key(second_public)


def keyring(tmp_path, text: str):
    path = tmp_path / "keyring"
    path.write_text(text)
    return str(path)


def test_item18_a_keyring_accepts_each_key_in_its_own_range(rotated, tmp_path, capsys):
    first, second = rotated
    ring = keyring(tmp_path, f"# first key, retired after seq 2\n{first} 1 2\n{second} 3   # current\n")

    code, output = run_cli(capsys, "verify", "--keyring", ring)

    assert code == 0, output
    assert "3 certificates verified" in output and "2 keys" in output


@pytest.mark.parametrize("ranges, bad_seq, why", [
    ("{first} 1 1\n{second} 2\n", 2, "retired"),             # seq 2 was signed by the first key after it retired
    ("{first} 1 2\n{second} 4\n", 3, "before"),              # seq 3 was signed by the second key before it was due
])
def test_item18_a_certificate_signed_outside_its_keys_range_is_refused(ranges, bad_seq, why, rotated, tmp_path,
                                                                         capsys):
    first, second = rotated
    ring = keyring(tmp_path, ranges.format(first=first, second=second))

    code, output = run_cli(capsys, "verify", "--keyring", ring)

    assert code == 1
    assert f"certificate seq {bad_seq}:" in output and why in output
    # Without a keyring, both keys passed as PEM files verify it all, as they always did.


def test_item18_public_key_pems_still_verify_a_rotated_chain(rotated, keys, tmp_path, capsys):
    code, output = run_cli(capsys, "verify", "--public-key", str(keys[1]),
                           "--public-key", str(tmp_path / "second" / "retention-signing.pub.pem"))

    assert code == 0 and "3 certificates verified" in output


@pytest.mark.parametrize("text, where", [
    ("{first} 1\nnot-base64! 3\n", "keyring:2: key:"),
    ("{first} one\n", "keyring:1: first seq:"),
    ("{first} 5 2\n", "keyring:1: last seq:"),
    ("{first} 1 2 3\n", "keyring:1:"),
    ("{first} 1\n{first} 3\n", "keyring:2: key:"),
    ("{first} 1\n{second} 3\n", "keyring:2: first seq:"),   # the first key's range is still open
    ("{first} 1 4\n{second} 3\n", "keyring:2: first seq:"),  # ranges overlap
    ("# nothing\n", "keyring: no keys"),
])
def test_item18_a_malformed_keyring_is_refused_naming_line_and_field(text, where, keys, audit_db, tmp_path, capsys):
    first, second = raw_key(keys[1]), raw_key(generate_keypair(tmp_path / "second")[1])
    ring = keyring(tmp_path, text.format(first=first, second=second))

    code, output = run_cli(capsys, "verify", "--keyring", ring)

    assert code == 2 and where in output and "Traceback" not in output


def test_item18_checkpoints_name_the_log_so_two_chains_with_one_key_cannot_be_swapped(
        crm, keys, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RETENTION_LOG_ID", "example.com/retention/eu")
    monkeypatch.setenv(CHECKPOINTS_ENV, str(tmp_path / "eu-checkpoints"))
    night(capsys, tmp_path, 1)
    night(capsys, tmp_path, 2)
    written = (tmp_path / "eu-checkpoints" / "000000000002.checkpoint").read_text()

    same = run_cli(capsys, "verify", "--public-key", str(keys[1]), "--checkpoint", str(tmp_path / "eu-checkpoints"))
    monkeypatch.setenv("RETENTION_LOG_ID", "example.com/retention/us")
    swapped = run_cli(capsys, "verify", "--public-key", str(keys[1]), "--checkpoint",
                      str(tmp_path / "eu-checkpoints"))
    flag = run_cli(capsys, "verify", "--public-key", str(keys[1]), "--log-id", "example.com/retention/eu",
                   "--checkpoint", str(tmp_path / "eu-checkpoints"))
    monkeypatch.delenv("RETENTION_LOG_ID")
    unconfigured = run_cli(capsys, "verify", "--public-key", str(keys[1]), "--checkpoint",
                           str(tmp_path / "eu-checkpoints"))

    assert written.startswith("example.com/retention/eu\n2\n") and "\n— example.com/retention/eu " in written
    assert same[0] == 0, same[1]
    assert swapped[0] == 1 and "example.com/retention/eu" in swapped[1] and "example.com/retention/us" in swapped[1]
    assert flag[0] == 0
    assert unconfigured[0] == 1 and "retention/purge-certificates" in unconfigured[1]


def test_item18_checkpoints_of_the_default_log_still_verify_when_none_is_configured(crm, keys, tmp_path, monkeypatch,
                                                                                    capsys):
    monkeypatch.delenv("RETENTION_LOG_ID", raising=False)
    monkeypatch.setenv(CHECKPOINTS_ENV, str(tmp_path / "checkpoints"))
    night(capsys, tmp_path, 1)

    code, output = run_cli(capsys, "verify", "--public-key", str(keys[1]), "--checkpoint", str(tmp_path / "checkpoints"))

    assert (tmp_path / "checkpoints" / "000000000001.checkpoint").read_text().startswith("retention/purge-certificates\n1\n")
    assert code == 0, output


@pytest.mark.parametrize("log_id", ["has space", "plus+sign", "", "x" * 300, "line\nbreak"])
def test_item18_a_malformed_log_identity_is_refused_before_a_run(log_id, crm, keys, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RETENTION_LOG_ID", log_id)
    monkeypatch.setenv(CHECKPOINTS_ENV, str(tmp_path / "checkpoints"))
    before = ids(crm)

    code, output = run_cli(capsys, "run", "--rules", str(tmp_path / "rules"), "--as-of", "2023-01-01T03:00:00Z")

    if log_id == "":  # unset in effect: the default log
        assert code == 0
        return
    assert code == 2 and "RETENTION_LOG_ID" in output and ids(crm) == before


def test_item18_certificates_past_the_newest_checkpoint_are_reported(crm, keys, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(CHECKPOINTS_ENV, str(tmp_path / "checkpoints"))
    for n in range(1, 5):
        night(capsys, tmp_path, n)
    for n in (2, 3, 4):
        (tmp_path / "checkpoints" / f"00000000000{n}.checkpoint").unlink()

    code, output = run_cli(capsys, "verify", "--public-key", str(keys[1]), "--checkpoint", str(tmp_path / "checkpoints"))
    as_json = run_cli(capsys, "verify", "--public-key", str(keys[1]), "--checkpoint", str(tmp_path / "checkpoints"),
                      "--json")

    assert code == 0
    assert "3 certificates not yet checkpointed (seq 2–4)" in output
    assert json.loads(as_json[1])["not_checkpointed"] == 3


def test_item18_keygen_prints_a_keyring_line(tmp_path, capsys):
    code, output = run_cli(capsys, "keygen", "--out", str(tmp_path / "k"))

    key = raw_key(tmp_path / "k" / "retention-signing.pub.pem")
    assert code == 0 and any(key in line and "FIRST_SEQ" in line for line in output.splitlines())
