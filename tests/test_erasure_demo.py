"""The demo's erasure step on the demo's own seed and the repository's rules: two requests, one
partly under a legal hold, and both receipts verify."""

from __future__ import annotations

import json
import os
import secrets
from datetime import datetime, timezone

from retention.evidence.signing import generate_keypair
from retention.interfaces.cli import main
from retention.interfaces.demo import environment, seed
from retention.interfaces.erasure_demo import demo_customers, erasure_steps


def test_the_demo_files_two_requests_one_partly_held_and_both_receipts_verify(tmp_path, monkeypatch, capsys):
    demo = tmp_path / "demo"
    generate_keypair(demo / "keys")
    (demo / "keys" / "hash.key").write_text(secrets.token_hex(32) + "\n")
    databases = seed(demo / "data", datetime.now(timezone.utc))
    env = environment(demo, databases, "http://127.0.0.1:1")  # erasure never reaches S3: receipts are exempt
    for name, value in env.items():
        if name not in os.environ or os.environ[name] != value:
            monkeypatch.setenv(name, value)
    (first, _), (second, _) = demo_customers(env)
    codes = [main(command) for command in erasure_steps(demo, env)]
    assert codes == [0] * len(codes)
    out = capsys.readouterr().out
    assert "retained under legal hold CASE-123" in out and out.count("✓ receipt of") == 2
    receipts = sorted((demo / "receipts").glob("*.json"))
    payloads = [json.loads(json.loads(r.read_text())["certificate"]["payload"]) for r in receipts]
    assert [p["status"] for p in payloads] == ["done", "partial"]
    held = {t["target"]: t for t in payloads[1]["targets"]}["orders"]
    assert held["holds"][0]["case"] == "CASE-123" and held["held"] >= 1 and held["deleted"] == 0
    exempt = {t["target"]: t for t in payloads[0]["targets"]}["receipts"]
    assert exempt["outcome"] == "retained" and "commercial code" in exempt["reason"]
    import sqlite3

    with sqlite3.connect(databases["crm_db"]) as crm:
        assert crm.execute("SELECT count(*) FROM customers WHERE id IN (?, ?)", (first, second)).fetchone() == (0,)
