"""Erasure requests end to end: a subject named by email, resolved to a customer number, erased
across tables in two databases and an S3 prefix, a held order retained and reported, one
certificate in the purge chain, nothing in clear in the audit database."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from retention.erasure_requests import ErasureRegistry, SubjectKey
from retention.interfaces.cli import main

from conftest import Database, connect

HASH_KEY = "erasure-test-hash-key-0123456789"
ANA_EMAIL, ANA_NAME, ANA = "Ana@Example.com", "Ana Lima", 7
CUSTOMERS = 20
NOW = datetime.now(timezone.utc).replace(microsecond=0, tzinfo=None)

SUBJECTS = """\
identities:
  customer_id:
    description: customer number
  email:
    description: sign-up address
    resolve: {to: customer_id, connection: crm_db, table: customers, match: email, column: id}
"""

RULES = {
    "customer_accounts": """\
category: customer_accounts
description: closed accounts
owner: crm
legal_basis: disputes
retain_for: P2Y
action: delete
targets:
  - {name: customers, kind: sql, connection: crm_db, table: customers, key: [id], age_column: closed_at,
     subject: {customer_id: id}}
""",
    "billing_contacts": """\
category: billing_contacts
description: invoice contacts
owner: finance
legal_basis: accounting
retain_for: P3Y
action: anonymize
targets:
  - name: invoices
    kind: sql
    connection: crm_db
    table: invoices
    key: [id]
    age_column: issued_at
    subject: {email: email}
    anonymize: {marker: anonymized_at, columns: {email: hash, billing_name: "null"}}
""",
    "orders": """\
category: orders
description: orders
owner: shop
legal_basis: tax
retain_for: P10Y
action: delete
targets:
  - name: orders
    kind: sql
    connection: shop_db
    table: orders
    key: [id]
    age_column: placed_at
    subject: {customer_id: customer_id}
    children: [{table: order_items, foreign_key: [order_id]}]
  - name: tickets
    kind: sql
    connection: shop_db
    table: tickets
    key: [id]
    age_column: resolved_at
    subject: {customer_id: customer_id}
""",
    "exports": """\
category: exports
description: data exports
owner: shop
legal_basis: service
retain_for: P30D
action: delete
targets:
  - {name: exports, kind: s3, connection: aws_default, bucket: erasure-exports, prefix: exports/,
     subject_prefix: "exports/{customer_id}/"}
""",
}


def _seed_crm(db: Database) -> None:
    db.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, email VARCHAR(200) NOT NULL, "
               "full_name VARCHAR(200), status VARCHAR(20) NOT NULL, closed_at TIMESTAMP NULL)")
    db.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, email VARCHAR(200) NOT NULL, billing_name "
               "VARCHAR(200), issued_at TIMESTAMP NOT NULL, anonymized_at TIMESTAMP NULL)")
    for i in range(1, CUSTOMERS + 1):
        email, name = (ANA_EMAIL, ANA_NAME) if i == ANA else (f"c{i}@example.org", f"Customer {i}")
        db.execute("INSERT INTO customers VALUES (:i, :e, :n, 'open', NULL)", {"i": i, "e": email, "n": name})
        db.execute("INSERT INTO invoices VALUES (:i, :e, :n, :t, NULL)",
                   {"i": i, "e": email.lower() if i == ANA else email, "n": name, "t": NOW - timedelta(days=i)})


def _seed_shop(db: Database) -> None:
    db.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL, placed_at TIMESTAMP NOT NULL)")
    db.execute("CREATE TABLE order_items (id INTEGER PRIMARY KEY, order_id INTEGER NOT NULL REFERENCES orders (id), "
               "sku VARCHAR(20) NOT NULL)")
    db.execute("CREATE TABLE tickets (id INTEGER PRIMARY KEY, customer_id INTEGER, resolved_at TIMESTAMP NULL)")
    for i in range(1, CUSTOMERS + 1):
        for n in (1, 2):  # order 2i-1 and 2i; items 10*order + 1, + 2
            order = 2 * i - 2 + n
            db.execute("INSERT INTO orders VALUES (:o, :c, :t)", {"o": order, "c": i, "t": NOW})
            for item in (1, 2):
                db.execute("INSERT INTO order_items VALUES (:id, :o, 'SKU')", {"id": 10 * order + item, "o": order})
        db.execute("INSERT INTO tickets VALUES (:i, :c, NULL)", {"i": i, "c": i})


@pytest.fixture
def world(tmp_path, monkeypatch, db, audit_db, keys, aws_server):
    """Rules, the CRM on each backend, the shop on SQLite, exports in S3, a hash key."""
    shop = Database("sqlite", sa.URL.create("sqlite", database=str(tmp_path / "shop.db")))
    connect(monkeypatch, "crm_db", db)
    connect(monkeypatch, "shop_db", shop)
    monkeypatch.setenv("RETENTION_HASH_KEY", HASH_KEY)
    _seed_crm(db)
    _seed_shop(shop)
    aws_server.create_bucket(Bucket="erasure-exports")
    for customer in (ANA, 8, 70):
        for name in ("a.json", "b.json"):
            aws_server.put_object(Bucket="erasure-exports", Key=f"exports/{customer}/{name}", Body=b"{}")
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "_subjects.yaml").write_text(SUBJECTS)
    for category, text in RULES.items():
        (rules / f"{category}.yaml").write_text(text)
    return {"rules": str(rules), "crm": db, "shop": shop, "audit": audit_db, "s3": aws_server, "keys": keys}


def _counts(world) -> dict[str, int]:
    crm, shop = world["crm"], world["shop"]
    keys = world["s3"].list_objects_v2(Bucket="erasure-exports").get("Contents", [])
    return {
        "customers": crm.scalar("SELECT count(*) FROM customers"),
        "ana": crm.scalar(f"SELECT count(*) FROM customers WHERE id = {ANA}"),
        "ana_invoice_clear": crm.scalar("SELECT count(*) FROM invoices WHERE email = 'ana@example.com'"),
        "anonymized": crm.scalar("SELECT count(*) FROM invoices WHERE anonymized_at IS NOT NULL AND billing_name IS NULL"),
        "invoices": crm.scalar("SELECT count(*) FROM invoices"),
        "ana_orders": shop.scalar(f"SELECT count(*) FROM orders WHERE customer_id = {ANA}"),
        "orders": shop.scalar("SELECT count(*) FROM orders"),
        "items": shop.scalar("SELECT count(*) FROM order_items"),
        "tickets": shop.scalar("SELECT count(*) FROM tickets"),
        "objects": len(keys),
        "ana_objects": sum(1 for k in keys if k["Key"].startswith(f"exports/{ANA}/")),
    }


def test_a_subject_is_erased_everywhere_a_hold_wins_and_one_certificate_says_so(world, capsys):
    rules = world["rules"]
    held_order = 2 * ANA  # Ana's second order is evidence in a dispute
    assert main(["hold", "add", "--category", "orders", "--target", "orders", "--match",
                 json.dumps({"id": held_order}), "--case", "CASE-123", "--reason", "chargeback", "--rules", rules]) == 0
    assert main(["erase", "request", "--subject", "email=ana@example.com", "--request", "DSR-1",
                 "--reason", "consent-withdrawn", "--rules", rules]) == 0
    capsys.readouterr()
    assert main(["erase", "plan", "DSR-1", "--rules", rules, "--json"]) == 0
    plan = {s["target"]: s for s in json.loads(capsys.readouterr().out)["steps"]}
    assert plan["customers"]["outcome"] == "erase" and plan["customers"]["matched"] == 1
    assert plan["invoices"]["outcome"] == "anonymize" and plan["invoices"]["matched"] == 1
    assert plan["orders"]["matched"] == 1 and plan["orders"]["held"] == 1
    assert plan["orders"]["holds"][0]["case"] == "CASE-123"
    assert plan["exports"]["matched"] == 2 and plan["tickets"]["matched"] == 1
    before = _counts(world)

    assert main(["erase", "run", "--rules", rules]) == 0  # partial: a hold kept one of Ana's orders (the law)
    out = capsys.readouterr().out
    assert "DSR-1: partial" in out and "retained under legal hold CASE-123" in out
    after = _counts(world)
    assert after["ana"] == 0 and after["customers"] == before["customers"] - 1
    assert after["invoices"] == before["invoices"] and after["ana_invoice_clear"] == 0 and after["anonymized"] == 1
    assert after["ana_orders"] == 1 and after["orders"] == before["orders"] - 1
    assert after["items"] == before["items"] - 2
    assert after["tickets"] == before["tickets"] - 1
    assert after["ana_objects"] == 0 and after["objects"] == before["objects"] - 2

    registry = ErasureRegistry(world["audit"].engine)
    request = registry.get("DSR-1")
    assert request.state == "partial" and request.certificate_seq == 1
    assert [e["event"] for e in registry.history("DSR-1")] == ["pending", "in_progress", "partial"]
    cert = json.loads(world["audit"].scalar("SELECT payload FROM purge_certificates WHERE seq = 1"))
    assert cert["type"] == "retention/erasure-certificate" and cert["status"] == "partial"
    assert cert["subject"]["hmac"] == SubjectKey(HASH_KEY.encode()).digest("email", "ana@example.com")
    by_target = {t["target"]: t for t in cert["targets"]}
    assert by_target["orders"]["tables"] == {"order_items": 2, "orders": 1}
    assert by_target["orders"]["holds"] == [{"id": 1, "case": "CASE-123"}] and by_target["orders"]["held"] == 1
    assert by_target["invoices"]["outcome"] == "anonymized" and by_target["exports"]["deleted"] == 2
    capsys.readouterr()
    assert main(["certificates", "--seq", "1"]) == 0
    shown = capsys.readouterr().out
    assert "erasure request DSR-1 (attempt 1), partial" in shown and "CASE-123" in shown
    assert main(["certificates"]) == 0  # the listing: an erasure has no AS OF, so none is shown
    listed = [line for line in capsys.readouterr().out.splitlines() if line.lstrip().startswith("1 ")]
    assert len(listed) == 1 and " Z " not in listed[0] and not listed[0].split()[-3].endswith("Z"), listed

    # A rerun changes nothing: the request is answered (partial means it is taken up again).
    assert main(["erase", "run", "DSR-1", "--rules", rules]) == 0  # still partial: the hold still holds
    assert _counts(world) == after
    assert world["audit"].scalar("SELECT count(*) FROM purge_certificates") == 2
    second = json.loads(world["audit"].scalar("SELECT payload FROM purge_certificates WHERE seq = 2"))
    assert second["totals"]["deleted"] == 0 and second["totals"]["anonymized"] == 0 and second["totals"]["held"] == 1

    # A purge certificate in the same chain, then the whole chain verifies.
    assert main(["run", "--rules", rules, "--category", "customer_accounts"]) == 0
    assert main(["verify", "--public-key", str(world["keys"][1])]) == 0

    # The audit database never holds the email or the name in clear.
    dump = "\n".join(world["audit"].engine.raw_connection().driver_connection.iterdump()).lower()
    assert "ana@example.com" not in dump and "ana lima" not in dump and "ana" + "@" not in dump


def _hold_anas_second_order(rules: str) -> None:
    assert main(["hold", "add", "--category", "orders", "--target", "orders", "--match",
                 json.dumps({"id": 2 * ANA}), "--case", "CASE-123", "--reason", "chargeback", "--rules", rules]) == 0


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
@pytest.mark.parametrize("json_output", [False, True])
def test_an_erasure_a_hold_keeps_partial_exits_0_and_says_what_is_kept_until_when(world, capsys, json_output):
    # A legal hold beats the erasure (the law keeps that record): the erasure did all it may,
    # as a purge whose held rows stay is complete. It says what is kept, under which hold, and
    # that the next erase run takes it once the hold is released.
    rules = world["rules"]
    _hold_anas_second_order(rules)
    assert main(["erase", "request", "--subject", "email=ana@example.com", "--request", "DSR-1", "--rules", rules]) == 0
    capsys.readouterr()
    assert main(["erase", "run", "DSR-1", "--rules", rules, *(["--json"] if json_output else [])]) == 0
    captured = capsys.readouterr()
    said = captured.err if json_output else captured.out
    assert "DSR-1: erasure partial" in said and "orders/orders: 1 record(s) retained under legal hold CASE-123" in said
    assert "once the hold is released" in said
    if json_output:
        assert json.loads(captured.out)[0]["state"] == "partial"
    assert ErasureRegistry(world["audit"].engine).get("DSR-1").state == "partial"


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
def test_an_erasure_refused_by_its_guard_exits_1_naming_the_target(world, capsys):
    # Ana suddenly owns most tickets: the guard refuses to erase them (the identity may have
    # resolved wrongly); that is a failure someone must look at, not a success.
    for i in range(1000, 1040):
        world["shop"].execute("INSERT INTO tickets VALUES (:i, :c, NULL)", {"i": i, "c": ANA})
    rules = world["rules"]
    assert main(["erase", "request", "--subject", "email=ana@example.com", "--request", "DSR-1", "--rules", rules]) == 0
    capsys.readouterr()
    assert main(["erase", "run", "DSR-1", "--rules", rules]) == 1
    err = capsys.readouterr().err
    assert "DSR-1: erasure partial" in err and "orders/tickets: refused: the subject matches 41 of 60 records" in err
    assert err.count("\n") == 1
    assert ErasureRegistry(world["audit"].engine).get("DSR-1").state == "partial"


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
def test_what_a_hold_kept_is_erased_by_the_next_erase_run_once_the_hold_is_released(world, capsys):
    rules = world["rules"]
    _hold_anas_second_order(rules)
    assert main(["erase", "request", "--subject", "email=ana@example.com", "--request", "DSR-1", "--rules", rules]) == 0
    assert main(["erase", "run", "--rules", rules]) == 0
    assert _counts(world)["ana_orders"] == 1
    certificates = world["audit"].scalar("SELECT count(*) FROM purge_certificates")

    # While the hold stands, the nightly erase run leaves the request alone: nothing new to do.
    capsys.readouterr()
    assert main(["erase", "run", "--rules", rules]) == 0
    assert "No pending erasure requests." in capsys.readouterr().out
    assert world["audit"].scalar("SELECT count(*) FROM purge_certificates") == certificates

    # Released: the next erase run takes the request up again, erases the order, and is done.
    assert main(["hold", "release", "1", "--reason", "dispute settled"]) == 0
    capsys.readouterr()
    assert main(["erase", "run", "--rules", rules]) == 0
    assert "DSR-1: done" in capsys.readouterr().out
    assert _counts(world)["ana_orders"] == 0
    registry = ErasureRegistry(world["audit"].engine)
    assert registry.get("DSR-1").state == "done"
    assert [e["event"] for e in registry.history("DSR-1")] == ["pending", "in_progress", "partial", "in_progress",
                                                                "done"]
    capsys.readouterr()
    assert main(["erase", "run", "--rules", rules]) == 0
    assert "No pending erasure requests." in capsys.readouterr().out


def _verify_offline(receipt: dict, public_pem: bytes, identity: str, hash_key: bytes) -> dict:
    """What an auditor does with stock cryptography and rfc8785 only (no retention code)."""
    import base64
    import hashlib
    import hmac

    import rfc8785
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    key = load_pem_public_key(public_pem)
    cert = receipt["certificate"]
    assert hashlib.sha256(key.public_bytes_raw()).hexdigest() == cert["key_id"]
    body = cert["payload"].encode("utf-8")
    key.verify(base64.b64decode(cert["signature"]), body)  # raises InvalidSignature
    payload = json.loads(body)
    assert rfc8785.dumps(payload) == body and hashlib.sha256(body).hexdigest() == cert["entry_hash"]
    kind, value = identity.split("=", 1)
    expected = hmac.new(hash_key, f"{kind}={value.strip().lower()}".encode(), hashlib.sha256).hexdigest()
    assert payload["subject"] == {**payload["subject"], "type": kind, "hmac": expected}
    return payload


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
def test_a_receipt_verifies_offline_and_names_the_subject_only_as_hmac(world, tmp_path, capsys):
    rules = world["rules"]
    assert main(["erase", "request", "--subject", "email= ANA@example.com", "--request", "DSR-2", "--rules", rules]) == 0
    assert main(["erase", "receipt", "DSR-2"]) == 2  # not run yet: no certificate
    assert main(["erase", "run", "DSR-2", "--rules", rules]) == 0
    receipt_file = tmp_path / "receipt.json"
    assert main(["erase", "receipt", "DSR-2", "--out", str(receipt_file)]) == 0
    receipt = json.loads(receipt_file.read_text())
    assert "ana@" not in receipt_file.read_text().lower()
    public = world["keys"][1]
    payload = _verify_offline(receipt, public.read_bytes(), "email=ana@example.com", HASH_KEY.encode())
    assert payload["status"] == "done" and payload["request"] == "DSR-2"

    hash_key_file = tmp_path / "hash.key"
    hash_key_file.write_text(HASH_KEY + "\n")
    capsys.readouterr()
    assert main(["verify-receipt", str(receipt_file), "--public-key", str(public),
                 "--identity", "email=ana@example.com", "--hash-key-file", str(hash_key_file)]) == 0
    assert "the subject is the identity given" in capsys.readouterr().out
    assert main(["verify-receipt", str(receipt_file), "--public-key", str(public),
                 "--identity", "email=bob@example.com", "--hash-key-file", str(hash_key_file)]) == 1
    tampered = dict(receipt, certificate={**receipt["certificate"],
                                          "payload": receipt["certificate"]["payload"].replace('"done"', '"partial"')})
    receipt_file.write_text(json.dumps(tampered))
    assert main(["verify-receipt", str(receipt_file), "--public-key", str(public)]) == 1
    assert "signature does not verify" in capsys.readouterr().err


KILL_POINTS = ["erase.started=1", "erase.before_commit=1", "erase.after_commit=2", "erase.before_commit=4",
               "erase.before_certificate=1", "erase.after_certificate=1"]


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
@pytest.mark.parametrize("point", KILL_POINTS)
def test_killed_anywhere_a_rerun_erases_everything_exactly_once_with_one_certificate(world, point):
    import os
    import subprocess
    import sys

    rules = world["rules"]
    assert main(["erase", "request", "--subject", "email=ana@example.com", "--request", "DSR-3", "--rules", rules]) == 0
    before = _counts(world)
    command = [sys.executable, "-m", "retention.interfaces.cli", "erase", "run", "--rules", rules]
    killed = subprocess.run(command, capture_output=True, text=True,
                            env={**os.environ, "RETENTION_FAILPOINTS": f"{point}:kill"})
    assert killed.returncode == -9, killed.stderr
    rerun = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
    assert rerun.returncode == 0, rerun.stderr
    after = _counts(world)
    assert (after["ana"], after["ana_orders"], after["ana_objects"], after["anonymized"]) == (0, 0, 0, 1)
    assert after["orders"] == before["orders"] - 2 and after["items"] == before["items"] - 4
    assert after["tickets"] == before["tickets"] - 1 and after["objects"] == before["objects"] - 2
    audit = world["audit"]
    assert audit.scalar("SELECT count(*) FROM purge_certificates") == 1
    cert = json.loads(audit.scalar("SELECT payload FROM purge_certificates"))
    assert cert["status"] == "done"
    assert {t["target"]: t["deleted"] + t["anonymized"] for t in cert["targets"]} == {
        "customers": 1, "invoices": 1, "orders": 2, "tickets": 1, "exports": 2}
    assert ErasureRegistry(audit.engine).get("DSR-3").state == "done"
    assert main(["verify", "--public-key", str(world["keys"][1])]) == 0


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
def test_replay_after_restoring_a_dump_erases_the_subject_again(world, tmp_path, capsys):
    import shutil

    from retention.connections import from_environment
    from retention.rules.loader import load_rules
    from retention.run.erase import erased_records
    from retention.targets import Targets

    rules = world["rules"]
    crm_file, shop_file = Path(world["crm"].url.database), Path(world["shop"].url.database)
    shutil.copy(crm_file, tmp_path / "crm.dump")
    shutil.copy(shop_file, tmp_path / "shop.dump")
    assert main(["erase", "request", "--subject", "email=ana@example.com", "--request", "DSR-4", "--rules", rules]) == 0
    assert main(["erase", "run", "--rules", rules]) == 0
    erased = _counts(world)
    # The databases are restored from last night's dump: Ana is back.
    for engine in (world["crm"].engine, world["shop"].engine):
        engine.dispose()
    shutil.copy(tmp_path / "crm.dump", crm_file)
    shutil.copy(tmp_path / "shop.dump", shop_file)
    assert _counts(world)["ana"] == 1 and _counts(world)["ana_orders"] == 2
    registry = ErasureRegistry(world["audit"].engine)
    with Targets(from_environment) as targets:
        back = erased_records(load_rules(rules), registry, targets, SubjectKey(HASH_KEY.encode()))
    assert back == {"customer_accounts/customers": 1, "billing_contacts/invoices": 1, "orders/orders": 2,
                    "orders/tickets": 1}
    capsys.readouterr()
    assert main(["erase", "replay", "--since", datetime.now(timezone.utc).date().isoformat(), "--rules", rules]) == 0
    assert "replaying 1 erasure request" in capsys.readouterr().out
    assert _counts(world) == erased
    assert [e["event"] for e in registry.history("DSR-4")] == ["pending", "in_progress", "done", "in_progress", "done"]
    assert world["audit"].scalar("SELECT count(*) FROM purge_certificates") == 2
    assert main(["erase", "replay", "--since", "2999-01-01", "--rules", rules]) == 0
    assert world["audit"].scalar("SELECT count(*) FROM purge_certificates") == 2


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
def test_overdue_requests_are_listed_and_make_status_fail(world, capsys):
    rules = world["rules"]
    assert main(["erase", "request", "--subject", "customer_id=8", "--request", "DSR-5", "--due", "2020-01-31",
                 "--rules", rules]) == 0
    assert main(["erase", "request", "--subject", "email=nobody@example.com", "--request", "DSR-6",
                 "--rules", rules]) == 0
    assert main(["erase", "request", "--subject", "email=x@example.com", "--request", "DSR-6", "--rules", rules]) == 2
    capsys.readouterr()
    assert main(["erase", "list", "--overdue", "--json"]) == 0
    assert [r["request_id"] for r in json.loads(capsys.readouterr().out)] == ["DSR-5"]
    assert main(["erase", "list", "--state", "pending"]) == 0
    listing = capsys.readouterr().out
    assert "DSR-5" in listing and "OVERDUE" in listing and "DSR-6" in listing
    assert main(["status", "--rules", rules]) == 1
    assert "erasure request DSR-5 is overdue: due 2020-01-31, pending" in capsys.readouterr().err
    assert main(["erase", "plan", "DSR-6", "--rules", rules]) == 0
    assert capsys.readouterr().out.count("not found") == 5


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "mariadb"])
def test_requests_are_never_deleted_and_their_history_never_rewritten(backend, tmp_path, request):
    from datetime import date

    from retention.evidence.audit import ensure_schema

    audit = request.getfixturevalue({"sqlite": "sqlite_db", "postgresql": "pg_db", "mariadb": "mysql_db"}[backend])
    ensure_schema(audit.engine)
    registry = ErasureRegistry(audit.engine)
    key = SubjectKey(HASH_KEY.encode())
    registry.file(request_id="DSR-9", subject_type="customer_id", subject_hmac=key.digest("customer_id", 9),
                  identities=[], key_id=key.key_id, reason="test", due=date(2030, 1, 1))
    registry.transition("DSR-9", "denied", detail={"why": "not our customer"})
    for statement in ("DELETE FROM erasure_requests", "DELETE FROM erasure_request_events",
                      "UPDATE erasure_request_events SET event = 'done'"):
        with pytest.raises(sa.exc.DBAPIError, match="append-only"):
            audit.execute(statement)
    assert [e["event"] for e in registry.history("DSR-9")] == ["pending", "denied"]
    with pytest.raises(Exception, match="cannot become"):
        registry.transition("DSR-9", "in_progress")


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
def test_a_refused_erasure_waits_for_a_person_even_after_its_hold_is_released(world, capsys):
    # Refused on tickets and held on orders: releasing the hold does not make the nightly run
    # retry what the guard refused; `erase run ID` by a person does.
    for i in range(1000, 1040):
        world["shop"].execute("INSERT INTO tickets VALUES (:i, :c, NULL)", {"i": i, "c": ANA})
    rules = world["rules"]
    _hold_anas_second_order(rules)
    assert main(["erase", "request", "--subject", "email=ana@example.com", "--request", "DSR-1", "--rules", rules]) == 0
    assert main(["erase", "run", "--rules", rules]) == 1
    assert main(["hold", "release", "1", "--reason", "dispute settled"]) == 0
    capsys.readouterr()
    assert main(["erase", "run", "--rules", rules]) == 0
    assert "No pending erasure requests." in capsys.readouterr().out
    assert main(["erase", "run", "DSR-1", "--rules", rules]) == 1  # still refused: the person checks the identity
    assert _counts(world)["ana_orders"] == 0  # but the released order went with that attempt
