"""Certificates: signed, chained, append-only; every kind of tampering is caught by verify."""

from __future__ import annotations

import base64
import json
import os
import threading
from datetime import datetime, timedelta, timezone

import pytest
import rfc8785
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization

from retention.audit import open_audit
from retention.certificates import entry_hash, read_certificates, verify_chain
from retention.cli import main
from retention.connections import from_environment
from retention.rules import load_rule_file
from retention.signing import PublicKeys, Signer, generate_keypair

from conftest import connect, write_rule
from sqlpurge import insert_customers, make_customers, runner

UTC = timezone.utc


@pytest.fixture
def chain(pg_db, sqlite_db, monkeypatch, keys, tmp_path):
    """Four certificates in a PostgreSQL audit database, from real runs on a SQLite table."""
    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_AUDIT", pg_db.airflow_uri)
    connect(monkeypatch, "crm_db", sqlite_db)
    make_customers(sqlite_db)
    insert_customers(sqlite_db, [(i, "closed", datetime(2020, 1, 1, tzinfo=UTC) + timedelta(days=30 * i))
                                 for i in range(1, 41)])
    rules = write_rule(tmp_path / "rules").parent
    for night in range(4):
        as_of = f"2023-0{night + 1}-01T03:00:00Z"
        assert main(["run", "--rules", str(rules), "--as-of", as_of, "--run-id", f"night-{night + 1}"]) == 0
    return pg_db


def verify(capsys, public_key) -> tuple[int, str]:
    code = main(["verify", "--public-key", str(public_key)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def tamper(db, statement: str, params=None) -> None:
    """What a superuser can do: switch the append-only triggers off and edit rows."""
    with db.engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE purge_certificates DISABLE TRIGGER ALL"))
        conn.execute(sa.text(statement), params or {})
        for trigger in ("purge_certificates_no_change", "purge_certificates_no_truncate"):
            conn.execute(sa.text(f"ALTER TABLE purge_certificates ENABLE ALWAYS TRIGGER {trigger}"))


def test_an_untouched_chain_verifies(chain, keys, capsys):
    code, output = verify(capsys, keys[1])

    assert code == 0
    assert "4 certificates verified" in output
    assert "seq 1–4" in output


def test_an_edited_payload_is_caught(chain, keys, capsys):
    payload = chain.scalar("SELECT payload FROM purge_certificates WHERE seq = 2")
    data = json.loads(payload)
    data["totals"]["deleted"] += 1000
    tamper(chain, "UPDATE purge_certificates SET payload = :p WHERE seq = 2",
           {"p": rfc8785.dumps(data).decode()})

    code, output = verify(capsys, keys[1])

    assert code == 1
    assert "seq 2" in output and "signature does not match" in output


def test_a_deleted_middle_certificate_is_caught(chain, keys, capsys):
    tamper(chain, "DELETE FROM purge_certificates WHERE seq = 3")

    code, output = verify(capsys, keys[1])

    assert code == 1
    assert "seq 4" in output and "3 is missing" in output


def test_swapped_certificates_are_caught(chain, keys, capsys):
    tamper(chain, "UPDATE purge_certificates SET seq = -seq WHERE seq IN (2, 3)")
    tamper(chain, "UPDATE purge_certificates SET seq = CASE seq WHEN -2 THEN 3 ELSE 2 END WHERE seq < 0")

    code, output = verify(capsys, keys[1])

    assert code == 1
    assert "seq 2" in output and "reordered" in output


def test_a_forged_signature_is_caught(chain, keys, capsys):
    forged = base64.b64encode(os.urandom(64)).decode()
    tamper(chain, "UPDATE purge_certificates SET signature = :s WHERE seq = 1", {"s": forged})

    code, output = verify(capsys, keys[1])

    assert code == 1
    assert "seq 1" in output and "signature does not match" in output


@pytest.mark.parametrize("claim_key", ["attacker", "original"])
def test_a_row_re_signed_with_another_key_is_caught(chain, keys, capsys, tmp_path, claim_key):
    attacker = Signer.from_pem_file(generate_keypair(tmp_path / "attacker")[0])
    row = chain.rows("SELECT payload, key_id FROM purge_certificates WHERE seq = 4")[0]
    data = json.loads(row[0])
    data["targets"][0]["deleted"] = 0
    key_id = attacker.key_id if claim_key == "attacker" else row[1]
    data["key_id"] = key_id
    body = rfc8785.dumps(data)
    tamper(
        chain,
        "UPDATE purge_certificates SET payload = :p, signature = :s, key_id = :k, entry_hash = :h WHERE seq = 4",
        {"p": body.decode(), "s": attacker.sign(body), "k": key_id, "h": entry_hash(body)},
    )

    code, output = verify(capsys, keys[1])

    assert code == 1
    assert "seq 4" in output
    assert ("not one of the trusted public keys" if claim_key == "attacker" else "signature does not match") in output


def test_the_certificates_table_is_append_only_on_postgresql(chain):
    for statement in ("UPDATE purge_certificates SET status = 'complete'",
                      "DELETE FROM purge_certificates WHERE seq = 1",
                      "TRUNCATE purge_certificates"):
        with pytest.raises(sa.exc.DBAPIError, match="append-only"):
            chain.execute(statement)
    # Replication mode skips ordinary triggers, not ENABLE ALWAYS ones.
    with pytest.raises(sa.exc.DBAPIError, match="append-only"):
        with chain.engine.begin() as conn:
            conn.execute(sa.text("SET session_replication_role = replica"))
            conn.execute(sa.text("DELETE FROM purge_certificates"))
    assert chain.scalar("SELECT count(*) FROM purge_certificates") == 4


@pytest.mark.parametrize("backend", ["mariadb", "sqlite"])
def test_the_certificates_table_rejects_edits_elsewhere(backend, request, monkeypatch, keys):
    db = request.getfixturevalue({"mariadb": "mysql_db", "sqlite": "sqlite_db"}[backend])
    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_AUDIT", db.airflow_uri)
    engine = open_audit(from_environment)
    db.execute(
        "INSERT INTO purge_certificates (seq, category, run_id, status, issued_at, payload, signature, key_id, "
        "prev_hash, entry_hash) VALUES (1, 'c', 'r', 'complete', '2026-01-01 00:00:00', '{}', 's', 'k', 'p', 'e')"
    )
    for statement in ("UPDATE purge_certificates SET status = 'failed'", "DELETE FROM purge_certificates"):
        with pytest.raises(sa.exc.DBAPIError, match="append-only"):
            db.execute(statement)
    engine.dispose()


def test_concurrent_appends_never_fork_the_chain(pg_db, sqlite_db, monkeypatch, keys, tmp_path):
    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_AUDIT", pg_db.airflow_uri)
    connect(monkeypatch, "crm_db", sqlite_db)
    make_customers(sqlite_db)
    runs = []
    for n in range(8):  # eight categories, so their runs may overlap
        rule_file = load_rule_file(write_rule(tmp_path / "rules", f"category_{n}"))
        r = runner()
        run, _ = r.start(rule_file, run_id=f"run-{n}", as_of=datetime(2026, 1, 1, tzinfo=UTC))
        r.purge(rule_file, run, "customers")
        runs.append((r, run))
    barrier = threading.Barrier(len(runs))
    results, errors = [], []

    def certify(r, run):
        barrier.wait()
        try:
            results.append(r.certify(run))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=certify, args=pair) for pair in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert sorted(c.seq for c in results) == list(range(1, 9))
    assert verify_chain(runs[0][0].journal.engine, PublicKeys.from_pem_files([keys[1]])).ok


def test_a_certificate_says_what_happened_and_nothing_personal(chain, keys):
    engine = open_audit(from_environment)
    certificates = list(read_certificates(engine))
    first = certificates[0]
    data = first.data

    assert set(data) >= {"seq", "prev_hash", "category", "rule", "code_version", "run_id", "as_of", "cutoff",
                         "action", "targets", "started_at", "finished_at", "status", "issued_at", "key_id"}
    assert data["prev_hash"] == "0" * 64
    assert data["rule"]["path"] == "rules/customer_accounts.yaml"
    assert len(data["rule"]["sha256"]) == 64
    assert data["as_of"] == "2023-01-01T03:00:00.000000Z"
    assert data["cutoff"] == "2021-01-01T03:00:00.000000Z"
    assert set(data["targets"][0]) >= {"name", "matched", "deleted", "failed", "status", "location"}
    assert sum(c.data["totals"]["deleted"] for c in certificates) == 40 - _left()
    everything = " ".join(c.payload for c in certificates)
    assert "@example.com" not in everything and "person" not in everything
    # Anyone can check a certificate with the public key and nothing of ours.
    public = serialization.load_pem_public_key(keys[1].read_bytes())
    public.verify(base64.b64decode(first.signature), first.payload.encode())
    assert rfc8785.dumps(json.loads(first.payload)).decode() == first.payload


def _left() -> int:
    crm = from_environment("crm_db")
    target = sa.create_engine(f"sqlite:///{crm.host}")
    with target.connect() as conn:
        left = conn.execute(sa.text("SELECT count(*) FROM customers")).scalar()
    target.dispose()
    return left


def test_a_chain_signed_by_two_keys_verifies_with_both(chain, keys, tmp_path, monkeypatch, capsys):
    second_private, second_public = generate_keypair(tmp_path / "rotated")
    monkeypatch.setenv("RETENTION_SIGNING_KEY", str(second_private))
    rules = tmp_path / "rules"
    assert main(["run", "--rules", str(rules), "--as-of", "2023-06-01T03:00:00Z", "--run-id", "after-rotation"]) == 0
    capsys.readouterr()

    assert main(["verify", "--public-key", str(keys[1]), "--public-key", str(second_public)]) == 0
    assert "2 keys" in capsys.readouterr().out
    code, output = verify(capsys, keys[1])
    assert code == 1 and "seq 5" in output
