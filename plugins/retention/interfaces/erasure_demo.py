"""The demo's erasure requests: which customers, and the commands that file, run and check them.

Two active customers with orders are picked from the freshly seeded databases; the second
one's orders are placed under a legal hold first, so their request ends ``partial`` with the
orders "retained under legal hold CASE-123". Request ids carry the time, as the demo's audit
database (and its chain) lives on across runs.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timezone
from pathlib import Path


def _database(env: dict[str, str], conn_id: str) -> str:
    return json.loads(env[f"AIRFLOW_CONN_{conn_id.upper()}"])["host"]


def demo_customers(env: dict[str, str]) -> list[tuple[int, str]]:
    """Two active customers who have orders: (id, email)."""
    with sqlite3.connect(_database(env, "shop_db")) as shop:
        ordered = {row[0] for row in shop.execute("SELECT DISTINCT customer_id FROM orders")}
    with sqlite3.connect(_database(env, "crm_db")) as crm:
        active = crm.execute("SELECT id, email FROM customers WHERE status = 'active' ORDER BY id").fetchall()
    chosen = [(cid, email) for cid, email in active if cid in ordered][:2]
    if len(chosen) < 2:
        raise RuntimeError("the demo seed has fewer than two active customers with orders")
    return chosen


def erasure_steps(demo: Path, env: dict[str, str]) -> list[list[str]]:
    """The ``retention`` commands of the demo's erasure step, in order."""
    (first, first_email), (second, second_email) = demo_customers(env)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S")
    one, two = f"DSR-{stamp}-1", f"DSR-{stamp}-2"
    receipts = demo / "receipts"
    receipts.mkdir(parents=True, exist_ok=True)
    public_key = str(demo / "keys" / "retention-signing.pub.pem")
    hash_key = str(demo / "keys" / "hash.key")
    steps = [
        ["hold", "add", "--category", "orders", "--target", "orders", "--match", json.dumps({"customer_id": second}),
         "--case", "CASE-123", "--reason", "chargeback dispute over this customer's orders"],
        ["erase", "request", "--subject", f"email={first_email}", "--request", one, "--reason", "consent-withdrawn"],
        ["erase", "request", "--subject", f"email={second_email}", "--request", two, "--reason", "account-deleted"],
        ["erase", "plan", two],
        ["erase", "run"],
        ["erase", "list"],
    ]
    for request, email in ((one, first_email), (two, second_email)):
        receipt = str(receipts / f"{request}.json")
        steps += [["erase", "receipt", request, "--out", receipt],
                  ["verify-receipt", receipt, "--public-key", public_key, "--identity", f"email={email}",
                   "--hash-key-file", hash_key]]
    return steps
