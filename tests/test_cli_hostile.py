"""The CLI's less-travelled commands under hostile input: every mistake or attack is one clear
line naming the file or flag, a non-zero exit, nothing touched, never a traceback or a hang."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import rfc8785
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.exc import SAWarning

from retention.evidence.audit import ensure_schema
from retention.evidence.payload import ERASURE_PAYLOAD_TYPE
from retention.evidence.receipt import RECEIPT_TYPE
from retention.interfaces.cli import main

from conftest import connect, write_rule

PLUGINS = Path(__file__).resolve().parents[1] / "plugins"


def _signed_receipt(tmp_path: Path) -> tuple[dict, Path]:
    """A receipt signed by a fresh key, as `erase receipt` writes it, and that key's public PEM."""
    key = Ed25519PrivateKey.generate()
    public = key.public_key()
    kid = hashlib.sha256(public.public_bytes_raw()).hexdigest()
    payload = {"type": ERASURE_PAYLOAD_TYPE, "request": "DSR-1", "status": "partial", "seq": 4,
               "prev_hash": "ab" * 32, "key_id": kid, "targets": [], "subject": {"type": "email", "hmac": "00"}}
    body = rfc8785.dumps(payload)
    receipt = {"type": RECEIPT_TYPE, "version": 1, "request": "DSR-1", "status": "partial",
               "certificate": {"seq": 4, "payload": body.decode(), "signature": base64.b64encode(key.sign(body)).decode(),
                               "key_id": kid, "entry_hash": hashlib.sha256(body).hexdigest(), "prev_hash": "ab" * 32}}
    pem = tmp_path / "public.pem"
    pem.write_bytes(public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return receipt, pem


def _verify(tmp_path: Path, content: str | bytes, *extra: str, pem: Path | None = None) -> int:
    pem = pem or _signed_receipt(tmp_path)[1]
    path = tmp_path / "receipt.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return main(["verify-receipt", str(path), "--public-key", str(pem), *extra])


def test_a_genuine_receipt_verifies(tmp_path, capsys):
    receipt, pem = _signed_receipt(tmp_path)
    (tmp_path / "r.json").write_text(json.dumps(receipt))
    assert main(["verify-receipt", str(tmp_path / "r.json"), "--public-key", str(pem)]) == 0
    assert "✓ receipt of DSR-1 verifies" in capsys.readouterr().out


@pytest.mark.parametrize("content", ["[]", "null", "42", '"receipt"'])
def test_a_receipt_that_is_json_but_not_an_object_is_refused(tmp_path, capsys, content):
    assert _verify(tmp_path, content) == 1
    assert "not an erasure receipt" in capsys.readouterr().err


def test_a_deeply_nested_receipt_is_refused_without_a_traceback(tmp_path, capsys):
    assert _verify(tmp_path, "[" * 200_000) == 2
    err = capsys.readouterr().err
    assert "receipt.json" in err and "nested" in err


def test_a_receipt_that_is_not_json_names_the_file_and_line(tmp_path, capsys):
    assert _verify(tmp_path, '{\n  "type": "retention/erasure-receipt",\n  "certificate": {') == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"configuration: receipt {tmp_path / 'receipt.json'}:3: not JSON")
    assert "public key" not in err


def test_a_receipt_larger_than_any_receipt_is_refused_unread(tmp_path, capsys):
    receipt, _ = _signed_receipt(tmp_path)
    receipt["padding"] = "x" * (17 << 20)
    assert _verify(tmp_path, json.dumps(receipt)) == 2
    assert "larger than" in capsys.readouterr().err


def _cli(*args: str, cwd: Path, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    """The CLI in a process of its own, with a time and memory budget: an endless read fails, never hangs."""
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    return subprocess.run([sys.executable, "-m", "retention.interfaces.cli", *args], cwd=cwd,
                          env=dict(os.environ, PYTHONPATH=str(PLUGINS), **env),
                          capture_output=True, text=True, timeout=timeout, preexec_fn=limit)


def test_a_receipt_that_is_a_symlink_to_dev_zero_is_refused(tmp_path):
    _, pem = _signed_receipt(tmp_path)
    (tmp_path / "zero.json").symlink_to("/dev/zero")
    done = _cli("verify-receipt", "zero.json", "--public-key", str(pem), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "zero.json" in done.stderr and "not a regular file" in done.stderr


@pytest.mark.parametrize("read", ["receipt", "public-key", "hash-key-file", "keyring", "signing-key", "rule-file",
                                  "manifest", "checkpoint"])
def test_a_file_that_is_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path, read):
    # open() on a FIFO waits for a writer: `verify-receipt` on one hung forever.
    receipt, pem = _signed_receipt(tmp_path)
    (tmp_path / "r.json").write_text(json.dumps(receipt))
    fifo = tmp_path / {"rule-file": "fifo.yaml", "checkpoint": "checkpoints/000001.checkpoint"}.get(read, "fifo")
    fifo.parent.mkdir(exist_ok=True)
    os.mkfifo(fifo)
    rules = write_rule(tmp_path / "rules").parent
    command, env = {
        "receipt": (["verify-receipt", str(fifo), "--public-key", str(pem)], {}),
        "public-key": (["verify-receipt", "r.json", "--public-key", str(fifo)], {}),
        "hash-key-file": (["verify-receipt", "r.json", "--public-key", str(pem), "--identity", "email=a@b.c",
                           "--hash-key-file", str(fifo)], {}),
        "keyring": (["verify", "--keyring", str(fifo)], {}),
        "signing-key": (["run", "--rules", str(rules)], {"RETENTION_SIGNING_KEY": str(fifo)}),
        "rule-file": (["validate", str(tmp_path)], {}),
        "manifest": (["restore", str(fifo), "--into", "crm_db"], {"AIRFLOW_CONN_AWS_DEFAULT": AWS_UNREACHABLE}),
        "checkpoint": (["verify", "--public-key", str(pem), "--checkpoint", str(fifo.parent)], {}),
    }[read]
    if read in ("signing-key", "manifest", "checkpoint"):
        env["AIRFLOW_CONN_RETENTION_AUDIT"] = '{"conn_type": "sqlite", "host": "%s"}' % (tmp_path / "audit.db")
        ensure_schema(sa.create_engine(f"sqlite:///{tmp_path / 'audit.db'}"))
    done = _cli(*command, cwd=tmp_path, timeout=20, **env)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and str(fifo) in done.stderr and "not a regular file" in done.stderr


@pytest.mark.parametrize("command", [["verify"], ["report", "--since", "2026-01-01", "--until", "2026-02-01"]])
@pytest.mark.parametrize("flag", ["--public-key", "--keyring"])
def test_a_key_file_that_is_dev_zero_is_refused(tmp_path, command, flag):
    done = _cli(*command, flag, "/dev/zero", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "/dev/zero" in done.stderr


@pytest.mark.parametrize("flag", ["--public-key", "--keyring"])
def test_a_key_file_that_is_a_directory_is_refused(tmp_path, capsys, flag):
    assert main(["verify", flag, str(tmp_path)]) == 2
    assert str(tmp_path) in capsys.readouterr().err


def test_verify_receipt_with_a_public_key_that_is_a_directory_names_it(tmp_path, capsys):
    receipt, _ = _signed_receipt(tmp_path)
    (tmp_path / "r.json").write_text(json.dumps(receipt))
    assert main(["verify-receipt", str(tmp_path / "r.json"), "--public-key", str(tmp_path)]) == 2
    assert f"public key {tmp_path}" in capsys.readouterr().err


@pytest.mark.parametrize("hash_key", ["missing-file", "."])
def test_a_hash_key_file_that_cannot_be_read_is_a_clear_error(tmp_path, capsys, hash_key):
    receipt, pem = _signed_receipt(tmp_path)
    path = str(tmp_path / hash_key)
    assert _verify(tmp_path, json.dumps(receipt), "--identity", "email=a@b.c", "--hash-key-file", path, pem=pem) == 2
    assert f"--hash-key-file {path}" in capsys.readouterr().err


@pytest.mark.parametrize("forge", [
    lambda r: r.update(status="done"),
    lambda r: r.update(request="DSR-2"),
    lambda r: r["certificate"].update(seq=9),
    lambda r: r["certificate"].update(prev_hash="cd" * 32),
])
def test_unsigned_fields_that_contradict_the_signed_payload_fail(tmp_path, capsys, forge):
    receipt, pem = _signed_receipt(tmp_path)
    assert _verify(tmp_path, json.dumps(receipt), pem=pem) == 0
    capsys.readouterr()
    forge(receipt)
    assert _verify(tmp_path, json.dumps(receipt), pem=pem) == 1
    assert "✗" in capsys.readouterr().err


@pytest.fixture
def subjects_dir(tmp_path, monkeypatch):
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "_subjects.yaml").write_text("identities:\n  customer_id:\n    description: customer number\n")
    monkeypatch.setenv("RETENTION_HASH_KEY", "0123456789abcdef0123456789abcdef")
    return rules


@pytest.mark.parametrize("request_id", ["DSR\x1b[31mRED", "DSR\nINFO filed", "DSR\rX", "DSR\u202eevil",
                                        "DSR\u200b1", " DSR-1", "DSR-1 "])
def test_a_request_id_with_control_characters_or_edge_spaces_is_refused(
        audit_db, subjects_dir, capsys, request_id):
    code = main(["erase", "request", "--rules", str(subjects_dir), "--subject", "customer_id=3",
                 "--request", request_id])
    assert code == 2
    assert "request id" in capsys.readouterr().err
    assert main(["erase", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_a_request_id_with_letters_of_any_script_is_filed(audit_db, subjects_dir, capsys):
    assert main(["erase", "request", "--rules", str(subjects_dir), "--subject", "customer_id=3",
                 "--request", "DSR-ü-2026"]) == 0


@pytest.mark.parametrize("flag, value", [("--case", "CASE\x1b[2J"), ("--reason", "dispute\nINFO released"),
                                         ("--case", "CASE\u202e1")])
def test_a_hold_with_control_characters_is_refused(audit_db, tmp_path, capsys, flag, value):
    args = {"--case": "CASE-1", "--reason": "dispute"} | {flag: value}
    code = main(["hold", "add", "--category", "orders", "--force", "--rules", str(tmp_path),
                 "--case", args["--case"], "--reason", args["--reason"]])
    assert code == 2
    assert {"--case": "case id", "--reason": "reason"}[flag] in capsys.readouterr().err
    assert main(["hold", "list", "--all", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_certificates_with_a_negative_limit_is_a_usage_error(audit_db, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["certificates", "--limit", "-5"])
    assert exit_.value.code == 2
    assert "--limit" in capsys.readouterr().err


def test_certificates_until_before_since_is_refused(audit_db, capsys):
    assert main(["certificates", "--since", "2026-12-01", "--until", "2026-01-01"]) == 2
    assert "--until 2026-01-01" in capsys.readouterr().err


def test_reading_certificates_warns_of_nothing(audit_db, capsys):
    ensure_schema(audit_db.engine)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SAWarning)
        assert main(["certificates"]) == 0


def test_a_release_reason_with_control_characters_is_refused(audit_db, tmp_path, capsys):
    assert main(["hold", "add", "--category", "orders", "--force", "--rules", str(tmp_path),
                 "--case", "CASE-1", "--reason", "dispute"]) == 0
    assert main(["hold", "release", "1", "--reason", "settled\x1b[1A\x1b[2K"]) == 2
    assert "reason" in capsys.readouterr().err
    assert main(["hold", "list", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 1


@pytest.fixture
def customers_rule(subjects_dir, sqlite_db, monkeypatch) -> Path:
    """A rule on a SQLite customers table whose subject is customer_id, beside _subjects.yaml."""
    sqlite_db.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, closed_at TIMESTAMP NULL)")
    sqlite_db.execute("INSERT INTO customers VALUES (3, NULL)")
    connect(monkeypatch, "crm_db", sqlite_db)
    (subjects_dir / "customer_accounts.yaml").write_text(
        "category: customer_accounts\ndescription: closed accounts\nowner: crm\nlegal_basis: disputes\n"
        "retain_for: P2Y\naction: delete\ntargets:\n  - {name: customers, kind: sql, connection: crm_db, "
        "table: customers, key: [id], age_column: closed_at, subject: {customer_id: id}}\n")
    return subjects_dir


@pytest.fixture
def erased(audit_db, keys, customers_rule, capsys) -> Path:
    """A chain of one certificate: request DSR-1 erased from a SQLite customers table."""
    rules = ["--rules", str(customers_rule)]
    assert main(["erase", "request", *rules, "--subject", "customer_id=3", "--request", "DSR-1"]) == 0
    assert main(["erase", "run", *rules, "DSR-1"]) == 0
    capsys.readouterr()
    return customers_rule


@pytest.mark.parametrize("out", ["missing-dir/receipt.json", ".", "/dev/full"])
def test_a_receipt_out_path_that_cannot_be_written_is_a_clear_error(erased, tmp_path, capsys, out):
    path = out if out.startswith("/") else str(tmp_path / out)
    assert main(["erase", "receipt", "DSR-1", "--out", path]) == 2
    assert f"--out {path}" in capsys.readouterr().err


@pytest.mark.parametrize("to", ["/dev/full", "a-file"])
def test_a_checkpoint_to_a_path_that_is_not_a_directory_is_a_clear_error(erased, tmp_path, capsys, to):
    path = to if to.startswith("/") else str(tmp_path / to)
    if not to.startswith("/"):
        Path(path).write_text("x")
    assert main(["checkpoint", "--to", path]) == 2
    assert path in capsys.readouterr().err


AWS_UNREACHABLE = json.dumps({"conn_type": "aws", "login": "AKIAHOSTILE", "password": "AwsSecretHostile",
                              "extra": {"endpoint_url": "http://127.0.0.1:1", "region_name": "us-east-1"}})


def test_checkpoints_in_an_unreachable_s3_are_one_line_without_the_secret(erased, keys, monkeypatch, capsys):
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", AWS_UNREACHABLE)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    assert main(["verify", "--public-key", str(keys[1]), "--checkpoint", "s3://checkpoints/retention"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "127.0.0.1:1" in err and "AwsSecretHostile" not in err


def test_restoring_a_local_manifest_that_is_dev_zero_is_refused(audit_db, tmp_path):
    (tmp_path / "manifest.json").symlink_to("/dev/zero")
    done = _cli("restore", "manifest.json", "--into", "crm_db", cwd=tmp_path, AIRFLOW_CONN_AWS_DEFAULT=AWS_UNREACHABLE)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "manifest.json" in done.stderr


@pytest.mark.parametrize("seq, problem", [(99, "no certificate with seq 99"),
                                          (1, "certificate seq 1 records no archive manifest")])
def test_restore_of_a_seq_that_is_no_archive_certificate_is_refused_before_any_s3_connection(
        erased, monkeypatch, capsys, seq, problem):
    # It asked for the aws_default connection first: "connection aws_default is not defined" hid
    # that seq 99 does not exist (or is an erasure, not an archive run).
    monkeypatch.delenv("AIRFLOW_CONN_AWS_DEFAULT", raising=False)
    assert main(["restore", "--seq", str(seq), "--into", "crm_db"]) == 2
    err = capsys.readouterr().err
    assert problem in err and "aws_default" not in err and err.count("\n") == 1


@pytest.mark.parametrize("reason", ["", " "])
def test_a_request_without_a_reason_is_refused(audit_db, subjects_dir, capsys, reason):
    assert main(["erase", "request", "--rules", str(subjects_dir), "--subject", "customer_id=3",
                 "--request", "DSR-1", "--reason", reason]) == 2
    assert "reason" in capsys.readouterr().err
    assert main(["erase", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


@pytest.mark.parametrize("command", [["hold", "list"], ["erase", "list"], ["certificates"], ["erase", "receipt", "X"]])
def test_an_unreachable_audit_database_is_one_line_without_the_password(monkeypatch, capsys, command):
    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_AUDIT", "postgres://postgres:Hunter2Secret@127.0.0.1:1/audit")
    assert main(command) == 1
    err = capsys.readouterr().err
    assert err.startswith("database error: ") and "port 1" in err
    assert err.count("\n") == 1 and "Hunter2Secret" not in err
    assert "connection retention_audit" in err  # which connection failed


@pytest.mark.parametrize("backend", ["postgres", "mysql"])
def test_a_database_error_names_the_connection_that_failed_and_never_its_password(
        audit_db, customers_rule, monkeypatch, backend):
    # The audit database answers; the target's connection crm_db does not: the message must say
    # which one of them failed, without the URI's password, in one line.
    assert main(["erase", "request", "--rules", str(customers_rule), "--subject", "customer_id=3",
                 "--request", "DSR-1"]) == 0
    monkeypatch.setenv("AIRFLOW_CONN_CRM_DB", f"{backend}://crm:Hunter2Secret@127.0.0.1:1/crm")
    done = _cli("erase", "plan", "--rules", str(customers_rule), "DSR-1", cwd=customers_rule)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("database error: connection crm_db: "), done.stderr
    assert done.stderr.count("\n") == 1 and "Hunter2Secret" not in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("backend", ["sqlite_db", "pg_db", "mysql_db"])
def test_request_ids_that_differ_only_in_case_are_one_id_on_every_backend(
        backend, subjects_dir, monkeypatch, capsys, request):
    connect(monkeypatch, "retention_audit", request.getfixturevalue(backend))
    rules = ["--rules", str(subjects_dir)]
    assert main(["erase", "request", *rules, "--subject", "customer_id=3", "--request", "DSR-Ü-1"]) == 0
    assert main(["erase", "request", *rules, "--subject", "customer_id=4", "--request", "dsr-ü-1"]) == 2
    assert "DSR-Ü-1" in capsys.readouterr().err
    assert main(["erase", "plan", *rules, "dsr-ü-1"]) == 2  # a lookup is exact too (MariaDB's collation is not)
    assert "no erasure request 'dsr-ü-1'" in capsys.readouterr().err
    assert main(["erase", "list", "--json"]) == 0
    assert [r["request_id"] for r in json.loads(capsys.readouterr().out)] == ["DSR-Ü-1"]


@pytest.mark.parametrize("value", ["99999999999999999999999999", "-9223372036854775809", "NaN", "-Infinity"])
def test_a_hold_match_value_no_column_can_hold_is_refused(audit_db, tmp_path, capsys, value):
    code = main(["hold", "add", "--category", "orders", "--force", "--rules", str(tmp_path),
                 "--match", '{"customer_id": %s}' % value, "--case", "CASE-1", "--reason", "dispute"])
    assert code == 2
    assert "--match 'customer_id'" in capsys.readouterr().err
    assert sa.inspect(audit_db.engine).get_table_names() == []  # refused before anything was touched


def test_tables_show_control_characters_written_into_the_audit_database_escaped(audit_db, tmp_path, capsys):
    assert main(["hold", "add", "--category", "orders", "--force", "--rules", str(tmp_path),
                 "--case", "CASE-1", "--reason", "dispute"]) == 0
    audit_db.execute("UPDATE legal_holds SET case_id = :c, reason = :r", {"c": "CASE\x1b[2J", "r": "a\nFAKE ROW"})
    capsys.readouterr()
    assert main(["hold", "list"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "FAKE ROW" in out and len(out.strip().splitlines()) == 3
    assert "CASE\\x1b[2J" in out


@pytest.mark.parametrize("payload", ["not json", '{"type": "retention/purge-certificate"}'])
def test_a_receipt_of_a_tampered_certificate_is_refused_naming_it(erased, audit_db, capsys, payload):
    for (trigger,) in audit_db.rows("SELECT name FROM sqlite_master WHERE type = 'trigger' "
                                    "AND tbl_name = 'purge_certificates'"):
        audit_db.execute(f"DROP TRIGGER {trigger}")
    audit_db.execute("UPDATE purge_certificates SET payload = :p", {"p": payload})
    assert main(["erase", "receipt", "DSR-1"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "certificate 1" in captured.err and "retention verify" in captured.err


@pytest.mark.parametrize("column, value", [("identities", "garbage"), ("identities", '{"a": 1}'), ("due", "soon"),
                                           ("state", "bogus")])
@pytest.mark.parametrize("command", [["erase", "list"], ["erase", "run", "DSR-1"], ["status"]])
def test_a_request_row_edited_in_the_audit_database_is_an_error_naming_it(
        audit_db, keys, customers_rule, capsys, column, value, command):
    subjects_dir = customers_rule
    assert main(["erase", "request", "--rules", str(subjects_dir), "--subject", "customer_id=3", "--request", "DSR-1"]) == 0
    for (trigger,) in audit_db.rows("SELECT name FROM sqlite_master WHERE type = 'trigger'"):
        audit_db.execute(f"DROP TRIGGER {trigger}")
    audit_db.execute(f"UPDATE erasure_requests SET {column} = :v", {"v": value})
    capsys.readouterr()
    assert main([*command, "--rules", str(subjects_dir)] if command[0] != "erase" or command[1] != "list"
                else command) == 1
    err = capsys.readouterr().err
    assert "erasure request 'DSR-1'" in err and column in err


@pytest.mark.parametrize("column, value", [("match", "garbage"), ("match", "[1, 2]"), ("until", "never")])
@pytest.mark.parametrize("command", [["hold", "list"], ["plan"]])
def test_a_hold_row_edited_in_the_audit_database_is_an_error_naming_it(
        audit_db, customers_rule, capsys, column, value, command):
    assert main(["hold", "add", "--category", "customer_accounts", "--match", '{"id": 3}', "--rules", str(customers_rule),
                 "--case", "CASE-1", "--reason", "dispute"]) == 0
    for (trigger,) in audit_db.rows("SELECT name FROM sqlite_master WHERE type = 'trigger'"):
        audit_db.execute(f"DROP TRIGGER {trigger}")
    audit_db.execute(f"UPDATE legal_holds SET {column} = :v", {"v": value})
    capsys.readouterr()
    assert main([*command, "--rules", str(customers_rule)] if command == ["plan"] else command) == 1
    err = capsys.readouterr().err
    assert "hold 1" in err and column in err


def test_a_signing_key_that_is_a_device_is_refused_as_not_a_key(audit_db, customers_rule, tmp_path):
    (tmp_path / "key.pem").symlink_to("/dev/zero")
    done = _cli("erase", "run", "--rules", str(customers_rule), cwd=tmp_path,
                RETENTION_SIGNING_KEY=str(tmp_path / "key.pem"))
    assert done.returncode == 2, done.stderr
    assert "not a regular file" in done.stderr and "chmod" not in done.stderr


@pytest.mark.parametrize("run_id", ["run\x1b[2J", "run\n1", " run-1"])
def test_a_run_id_with_control_characters_is_refused_before_anything_is_touched(
        audit_db, keys, customers_rule, sqlite_db, capsys, run_id):
    assert main(["run", "--rules", str(customers_rule), "--run-id", run_id]) == 2
    assert "--run-id" in capsys.readouterr().err
    assert sqlite_db.scalar("SELECT count(*) FROM customers") == 1
    # Nothing certified: the audit database did not even get its tables.
    assert sa.inspect(audit_db.engine).get_table_names() == []


@pytest.mark.parametrize("command", [["certificates", "--seq", "99999999999999999999"],
                                     ["certificates", "--limit", "99999999999999999999"],
                                     ["certificates", "--seq", "0"],
                                     ["hold", "release", "99999999999999999999999", "--reason", "r"],
                                     ["restore", "--seq", "99999999999999999999", "--into", "crm_db"]])
def test_numbers_past_64_bits_are_usage_errors(audit_db, capsys, command):
    with pytest.raises(SystemExit) as exit_:
        main(command)
    assert exit_.value.code == 2
    assert "whole number" in capsys.readouterr().err


@pytest.mark.parametrize("instant", ["9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00"])
@pytest.mark.parametrize("command", [["plan", "--as-of"], ["run", "--as-of"], ["certificates", "--since"],
                                     ["report", "--until", "2026-01-01", "--since"]])
def test_an_instant_outside_the_calendar_in_utc_is_a_usage_error(tmp_path, capsys, instant, command):
    with pytest.raises(SystemExit) as exit_:
        main([*command, instant])
    assert exit_.value.code == 2
    assert instant in capsys.readouterr().err


def test_a_request_reason_longer_than_its_column_is_refused_naming_it(audit_db, subjects_dir, capsys):
    assert main(["erase", "request", "--rules", str(subjects_dir), "--subject", "customer_id=3",
                 "--request", "DSR-1", "--reason", "r" * 201]) == 2
    assert "reason is 201 characters; it may be at most 200" in capsys.readouterr().err
    assert main(["erase", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


@pytest.mark.parametrize("planted", ["dev-zero", "directory"])
def test_a_checkpoint_directory_with_a_planted_entry_is_a_clear_error(erased, keys, tmp_path, planted):
    store = tmp_path / "checkpoints"
    store.mkdir()
    if planted == "dev-zero":
        (store / "000001.checkpoint").symlink_to("/dev/zero")
    else:
        (store / "000001.checkpoint").mkdir()
    done = _cli("verify", "--public-key", str(keys[1]), "--checkpoint", str(store), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "000001.checkpoint" in done.stderr


def test_a_checkpoint_written_where_a_fifo_was_planted_is_refused_without_waiting(erased, tmp_path):
    # Writing found the name taken and read what was there to compare: a FIFO made it wait forever.
    store = tmp_path / "checkpoints"
    store.mkdir()
    os.mkfifo(store / "000000000001.checkpoint")
    done = _cli("checkpoint", "--to", str(store), cwd=tmp_path, timeout=20)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "000000000001.checkpoint" in done.stderr
    assert "not a regular file" in done.stderr


@pytest.mark.parametrize("flag", ["--category", "--target"])
def test_a_forced_hold_on_a_name_with_control_characters_is_refused(audit_db, tmp_path, capsys, flag):
    names = {"--category": "orders", "--target": "orders"} | {flag: "ord\x1b[2Jers"}
    assert main(["hold", "add", "--category", names["--category"], "--target", names["--target"], "--force",
                 "--rules", str(tmp_path), "--case", "CASE-1", "--reason", "dispute"]) == 2
    assert main(["hold", "list", "--all", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_errors_show_control_characters_of_what_was_typed_escaped(audit_db, subjects_dir, capsys):
    assert main(["erase", "request", "--rules", str(subjects_dir), "--subject", "customer\x1b[2J_id=3",
                 "--request", "DSR-1"]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "customer\\x1b[2J_id" in err


def test_a_reader_that_goes_away_is_no_traceback():
    # `retention … | head` closes the pipe before the command has written: the command stops
    # quietly (non-zero: its output was not all delivered), as other Unix tools do.
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "plugins")}
    child = subprocess.Popen([sys.executable, "-m", "retention.interfaces.cli", "schema"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env)
    assert child.stdout is not None and child.stderr is not None
    child.stdout.close()
    stderr = child.stderr.read().decode()
    assert child.wait() != 0
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
