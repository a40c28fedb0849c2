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

from retention.connections import from_environment
from retention.evidence.audit import ensure_schema, metadata, open_audit
from retention.evidence.chain import entry_hash, read_certificates
from retention.evidence.checkpoints import CHECKPOINTS_ENV, Checkpoint, CheckpointError, sign
from retention.evidence.notes import sign_note
from retention.evidence.signing import PublicKeys, Signer, generate_keypair
from retention.evidence.stores import DirectoryStore, S3Store
from retention.evidence.verify import verify_chain
from retention.identity import who
from retention.interfaces.cli import main
from retention.rules.loader import load_rule_file
from retention.run.journal import RunJournal
from retention.run.runner import Runner
from retention.targets import Targets

from conftest import connect, write_rule
from sqlpurge import insert_customers, make_customers, runner

UTC = timezone.utc


@pytest.fixture
def chain(pg_db, sqlite_db, monkeypatch, keys, tmp_path):
    """Four certificates in a PostgreSQL audit database, from real runs on a SQLite table;
    their signed checkpoints in ``tmp_path/checkpoints``."""
    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_AUDIT", pg_db.airflow_uri)
    monkeypatch.setenv(CHECKPOINTS_ENV, str(tmp_path / "checkpoints"))
    connect(monkeypatch, "crm_db", sqlite_db)
    make_customers(sqlite_db)
    insert_customers(sqlite_db, [(i, "closed", datetime(2020, 1, 1, tzinfo=UTC) + timedelta(days=30 * i))
                                 for i in range(1, 41)])
    rules = write_rule(tmp_path / "rules").parent
    for night in range(4):
        as_of = f"2023-0{night + 1}-01T03:00:00Z"
        assert main(["run", "--rules", str(rules), "--as-of", as_of, "--run-id", f"night-{night + 1}"]) == 0
    return pg_db


def verify(capsys, public_key, *checkpoints) -> tuple[int, str]:
    code = main(["verify", "--public-key", str(public_key), *(f"--checkpoint={c}" for c in checkpoints)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def tamper(db, statement: str, params=None) -> None:
    """What a superuser can do: switch the append-only triggers off and edit rows."""
    with db.engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE purge_certificates DISABLE TRIGGER ALL"))
        conn.execute(sa.text(statement), params or {})
        for trigger in ("purge_certificates_no_change", "purge_certificates_no_truncate"):
            conn.execute(sa.text(f"ALTER TABLE purge_certificates ENABLE ALWAYS TRIGGER {trigger}"))


def test_one_certificate_reads_in_full(chain, capsys):
    assert main(["certificates", "--seq", "2"]) == 0
    shown = capsys.readouterr().out
    assert main(["certificates", "--seq", "99"]) == 1
    missing = capsys.readouterr().err

    assert shown.startswith("certificate 2: customer_accounts, complete\n  run        night-2\n")
    assert "rules/customer_accounts.yaml (sha256 " in shown
    assert "delete records older than 2021-02-01 03:00:00Z (as of 2023-02-01 03:00:00Z)" in shown
    assert "customers  crm_db:customers  complete        1        1     0       0" in shown
    assert "no certificate with seq 99" in missing


@pytest.mark.parametrize("backend", ["postgresql", "mariadb", "sqlite"])
def test_certificates_of_a_period(backend, request, sqlite_db, monkeypatch, keys, tmp_path, capsys):
    audit = request.getfixturevalue({"postgresql": "pg_db", "mariadb": "mysql_db", "sqlite": "audit_db"}[backend])
    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_AUDIT", audit.airflow_uri)
    connect(monkeypatch, "crm_db", sqlite_db)
    make_customers(sqlite_db)
    rule_file = load_rule_file(write_rule(tmp_path / "rules"))
    for day in (1, 2, 3):  # issued at 23:30 UTC on Nov 1, 2 and 3
        issued = datetime(2026, 11, day, 23, 30, tzinfo=UTC)
        r = Runner(RunJournal(open_audit(from_environment), clock=lambda issued=issued: issued),
                   Targets(from_environment), Signer.from_environment())
        r.run(rule_file, run_id=f"night-{day}", as_of=issued)

    assert main(["certificates", "--since", "2026-11-02", "--until", "2026-11-03T23:30:00Z"]) == 0
    listed = capsys.readouterr().out
    assert main(["certificates", "--since", "2026-11-02T00:30:00+01:00", "--json"]) == 0  # = Nov 1, 23:30Z
    as_json = [json.loads(line)["run_id"] for line in capsys.readouterr().out.splitlines()]

    assert "night-2" in listed and "night-1" not in listed and "night-3" not in listed
    assert as_json == ["night-1", "night-2", "night-3"]


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


@pytest.mark.parametrize("backend", ["postgresql", "mariadb", "sqlite"])
def test_workers_starting_at_once_on_a_new_audit_database_all_get_the_schema(backend, request):
    db = request.getfixturevalue({"postgresql": "pg_db", "mariadb": "mysql_db", "sqlite": "sqlite_db"}[backend])
    engines = [sa.create_engine(db.url) for _ in range(6)]
    barrier = threading.Barrier(len(engines))
    errors = []

    def start(engine):
        barrier.wait()
        try:
            ensure_schema(engine)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(engine,)) for engine in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for engine in engines:
        engine.dispose()

    assert errors == []
    assert set(sa.inspect(db.engine).get_table_names()) >= set(metadata.tables)


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
                         "action", "targets", "started_at", "finished_at", "status", "issued_at", "key_id",
                         "issued_by"}
    assert data["issued_by"] == who()  # the service user and host that certified the run
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


# -- signed checkpoints: what the chain alone cannot show --------------------------------


def test_every_run_writes_a_signed_checkpoint_that_verify_accepts(chain, keys, tmp_path, capsys):
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    newest = (tmp_path / "checkpoints" / names[-1]).read_text()
    head = chain.scalar("SELECT entry_hash FROM purge_certificates WHERE seq = 4")

    code, output = verify(capsys, keys[1], tmp_path / "checkpoints")

    assert names == [f"00000000000{n}.checkpoint" for n in range(1, 5)]
    assert newest.startswith(f"retention/purge-certificates\n4\n{base64.b64encode(bytes.fromhex(head)).decode()}\n\n— ")
    assert code == 0
    assert "4 signed checkpoints agree with the chain; the newest, seq 4," in output


def test_a_removed_tail_is_caught_against_the_checkpoints(chain, keys, tmp_path, capsys):
    tamper(chain, "DELETE FROM purge_certificates WHERE seq >= 3")

    alone = verify(capsys, keys[1])
    code, output = verify(capsys, keys[1], tmp_path / "checkpoints")

    assert alone[0] == 0 and "seq 1–2 without gaps" in alone[1]  # the chain alone cannot tell
    assert code == 1
    assert "seq 3: certificate 3–4 is missing" in output and "reached seq 4" in output


def test_a_removed_tail_then_a_new_run_fails_loudly(chain, keys, tmp_path, capsys):
    """Someone deletes the newest certificate; the next night's certificate takes its seq.
    The chain looks whole, but its checkpoint cannot be written and verify names the seq."""
    tamper(chain, "DELETE FROM purge_certificates WHERE seq = 4")
    rules = tmp_path / "rules"

    code = main(["run", "--rules", str(rules), "--as-of", "2023-05-01T03:00:00Z", "--run-id", "night-5"])
    run_output = capsys.readouterr().err
    verified, output = verify(capsys, keys[1], tmp_path / "checkpoints")

    assert code == 1 and "000000000004.checkpoint already exists and differs" in run_output
    assert chain.scalar("SELECT run_id FROM purge_certificates WHERE seq = 4") == "night-5"
    assert verified == 1 and "seq 4: differs from the signed checkpoint" in output


def test_a_forged_or_foreign_checkpoint_is_refused(chain, keys, tmp_path, capsys):
    directory = tmp_path / "checkpoints"
    forged = directory / "000000000009.checkpoint"
    forged.write_text((directory / "000000000004.checkpoint").read_text().replace("\n4\n", "\n9\n"))
    code, output = verify(capsys, keys[1], forged)
    assert code == 1 and "no valid signature by a trusted public key" in output

    attacker = Signer.from_pem_file(generate_keypair(tmp_path / "attacker")[0])
    DirectoryStore(tmp_path / "foreign").put("000000000002.checkpoint", sign_note(
        Checkpoint(2, "ab" * 32).body(), "retention/purge-certificates", attacker.private_key))
    code, output = verify(capsys, keys[1], tmp_path / "foreign")
    assert code == 1 and "no valid signature" in output


def test_an_emptied_checkpoint_store_fails_verify(chain, keys, tmp_path, capsys):
    for path in (tmp_path / "checkpoints").iterdir():
        path.unlink()

    code, output = verify(capsys, keys[1], tmp_path / "checkpoints")

    assert code == 1 and "no checkpoints at" in output


def test_before_the_first_certificate_an_empty_checkpoint_store_is_fine(audit_db, keys, tmp_path, capsys):
    ensure_schema(audit_db.engine)  # a deployment's init step makes the audit tables before any run
    (tmp_path / "checkpoints").mkdir()

    code, output = verify(capsys, keys[1], tmp_path / "checkpoints")

    assert code == 0 and "no certificates to verify yet" in output


def test_checkpoint_anchors_an_existing_chain_and_refuses_a_broken_one(chain, keys, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(CHECKPOINTS_ENV)
    anchor = tmp_path / "anchored"

    assert main(["checkpoint", "--to", str(anchor)]) == 0
    written = capsys.readouterr().out
    tamper(chain, "DELETE FROM purge_certificates WHERE seq >= 3")
    code, output = verify(capsys, keys[1], anchor)
    tamper(chain, "UPDATE purge_certificates SET signature = :s WHERE seq = 1",
           {"s": base64.b64encode(os.urandom(64)).decode()})
    refused = main(["checkpoint", "--to", str(tmp_path / "again")])

    assert "signed checkpoint of seq 4" in written and [p.name for p in anchor.iterdir()] == ["000000000004.checkpoint"]
    assert code == 1 and "certificate 3–4 is missing" in output
    assert refused == 1 and "not signing a chain that does not verify" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()


def test_a_run_that_could_not_write_its_checkpoint_does_not_start(chain, tmp_path, monkeypatch, capsys):
    (tmp_path / "a-file").write_text("not a directory")
    monkeypatch.setenv(CHECKPOINTS_ENV, str(tmp_path / "a-file" / "checkpoints"))
    before, rows = chain.scalar("SELECT count(*) FROM purge_certificates"), _left()

    code = main(["run", "--rules", str(tmp_path / "rules"), "--as-of", "2023-09-01T03:00:00Z"])

    assert code == 2 and "checkpoints: cannot create directory" in capsys.readouterr().err
    assert chain.scalar("SELECT count(*) FROM purge_certificates") == before  # no run was opened
    assert _left() == rows  # and nothing was touched (five rows had expired by then)


def test_a_killed_writers_temporary_file_is_swept_by_the_next(keys, tmp_path):
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    store = DirectoryStore(directory)
    (directory / "000000000001.checkpoint").write_bytes(b"an earlier run's")
    stale, live = directory / ".000000000002.checkpoint.k1ll3d", directory / ".000000000003.checkpoint.wr1t1ng"
    stale.write_bytes(b"half")
    live.write_bytes(b"half")
    os.utime(stale, (1_700_000_000, 1_700_000_000))

    store.put("000000000004.checkpoint", sign(Checkpoint(4, "ab" * 32), Signer.from_pem_file(keys[0])))

    assert sorted(p.name for p in directory.iterdir()) == [
        ".000000000003.checkpoint.wr1t1ng", "000000000001.checkpoint", "000000000004.checkpoint"]


def test_the_note_format_is_the_c2sp_signed_note_of_the_go_reference():
    """golang.org/x/mod/sumdb/note's documented example, byte for byte (Ed25519 is deterministic)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from retention.evidence.notes import note_key_hash, open_note

    seed = base64.b64decode("AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz")[1:]  # PRIVATE+KEY+PeterNeumann+c74f20a3+…
    key = Ed25519PrivateKey.from_private_bytes(seed)
    text = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
    expected = (text + "\n— PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZ"
                "b6KE6RyyBwJnAM=\n")

    assert note_key_hash("PeterNeumann", key.public_key()).hex() == "c74f20a3"
    assert sign_note(text, "PeterNeumann", key).decode() == expected
    assert open_note(expected.encode(), "PeterNeumann", [key.public_key()]) == text
    assert open_note(expected.replace("problem,", "problem;").encode(), "PeterNeumann", [key.public_key()]) is None


def test_an_s3_checkpoint_is_written_once_and_never_replaced(aws_server, keys, tmp_path):
    aws_server.create_bucket(Bucket="audit-checkpoints")
    store = S3Store("s3://audit-checkpoints/retention/prod", aws_server)
    signer, rotated = Signer.from_pem_file(keys[0]), Signer.from_pem_file(generate_keypair(tmp_path / "new")[0])
    head = Checkpoint(1, "ab" * 32)

    store.put("000000000001.checkpoint", sign(head, signer))
    store.put("000000000001.checkpoint", sign(head, signer))  # a retried certify writes the same note: fine
    store.put("000000000001.checkpoint", sign(head, rotated))  # or the same text under a rotated key
    with pytest.raises(CheckpointError, match="already exists and differs"):
        store.put("000000000001.checkpoint", sign(Checkpoint(1, "cd" * 32), signer))

    assert list(store.notes()) == [("s3://audit-checkpoints/retention/prod/000000000001.checkpoint",
                                    sign(head, signer))]


@pytest.mark.parametrize("command", [["verify"], ["certificates"], ["checkpoint", "--to", "{dir}"],
                                     ["status", "--rules", "{rules}"]])
def test_evidence_read_from_a_database_without_audit_tables_is_refused_and_nothing_is_created(
        audit_db, keys, tmp_path, capsys, command):
    # Pointed at the wrong database, `verify` said "no certificates to verify yet" (exit 0, a
    # green for an auditor) and left ten empty audit tables there; `status` did the same.
    (tmp_path / "checkpoints").mkdir()
    write_rule(tmp_path / "rules")
    args = [a.replace("{dir}", str(tmp_path / "checkpoints")).replace("{rules}", str(tmp_path / "rules"))
            for a in command]
    if command[0] == "verify":
        args += ["--public-key", str(keys[1])]
    if command[0] == "checkpoint":
        args += ["--public-key", str(keys[1])]
    code = main(args)
    captured = capsys.readouterr()
    assert code == 2, captured.out + captured.err
    assert "retention_audit" in captured.err and "no audit tables" in captured.err
    assert "✓" not in captured.out
    assert sa.inspect(audit_db.engine).get_table_names() == []


@pytest.mark.parametrize("command", [["erase", "list"], ["erase", "receipt", "DSR-1"], ["hold", "list"]])
def test_other_readers_of_a_database_without_audit_tables_refuse_and_create_nothing(audit_db, capsys, command):
    code = main(command)
    captured = capsys.readouterr()
    assert code == 2, captured.out + captured.err
    assert "retention_audit" in captured.err and "no audit tables" in captured.err
    assert sa.inspect(audit_db.engine).get_table_names() == []


@pytest.mark.parametrize("command", [["plan"], ["run", "--dry-run"]])
def test_a_plan_against_an_audit_database_without_tables_creates_none(pg_db, monkeypatch, audit_db, keys, tmp_path,
                                                                     capsys, command):
    # A dry run changes nothing, the audit database included: with no audit tables there is no
    # hold anywhere, and the plan says so.
    connect(monkeypatch, "crm_db", pg_db)
    make_customers(pg_db)
    write_rule(tmp_path / "rules")
    code = main([*command, "--rules", str(tmp_path / "rules")])
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    assert "no legal holds: audit connection retention_audit has no audit tables yet" in captured.err
    assert sa.inspect(audit_db.engine).get_table_names() == []
