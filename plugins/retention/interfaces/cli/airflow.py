"""``airflow sync-pools``: prepare Airflow's pools for the rules (through Airflow's own CLI)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from retention.errors import ConfigError, RetentionError
from retention.interfaces.cli.options import DEFAULT_RULES_DIR, EXIT_OK
from retention.interfaces.render import count, table


def register(commands: argparse._SubParsersAction) -> None:
    """The ``airflow`` command and its actions."""
    cmd = commands.add_parser("airflow", help="prepare Airflow for the rules (pools)")
    airflow = cmd.add_subparsers(dest="airflow_command", required=True, metavar="ACTION")
    sync = airflow.add_parser("sync-pools", help="create or resize the pool retention__<conn_id> of every "
                                                 "connection the rules use (slots from <rules>/_pools.yaml)")
    sync.add_argument("--rules", default=os.environ.get("RETENTION_RULES_DIR", DEFAULT_RULES_DIR), metavar="DIR",
                      help="rules directory (default: $RETENTION_RULES_DIR or ./retention_rules)")
    sync.add_argument("--dry-run", action="store_true", help="print the pools; change nothing in Airflow")
    sync.add_argument("--json", action="store_true", help="print the pools as `airflow pools import` JSON")
    sync.set_defaults(handler=cmd_airflow_sync_pools)


def cmd_airflow_sync_pools(args: argparse.Namespace) -> int:
    """Write the pools the rules need through Airflow's own ``airflow pools import``."""
    import importlib.util
    import subprocess
    import tempfile

    from retention.interfaces.pools import (
        POOLS_VARIABLE,
        import_document,
        load_pool_config,
        load_pool_rules,
        pools_receipt,
        required_pools,
        rule_connections,
    )

    rules = load_pool_rules(args.rules)
    used = sorted({c for r in rules for c in rule_connections(r.rule)})
    pools = required_pools(rules, load_pool_config(args.rules, known=used))
    document = import_document(pools)
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print(table(["pool", "slots", "used by"], [[p.name, str(p.slots), p.description] for p in pools]))
    if args.dry_run:
        print("Dry run: no pool was changed.", file=sys.stderr)
        return EXIT_OK
    if importlib.util.find_spec("airflow") is None:
        raise ConfigError("Airflow is not installed in this environment: run sync-pools where Airflow runs "
                          "(e.g. the airflow-init container), or use --json and `airflow pools import`")
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="retention-pools-") as handle:
        json.dump(document, handle)
        handle.flush()
        done = subprocess.run([sys.executable, "-m", "airflow", "pools", "import", handle.name],
                              capture_output=True, text=True, env=os.environ.copy())
    if done.returncode != 0:
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1][:300]
        raise RetentionError(f"`airflow pools import` failed (exit {done.returncode}): {last}; "
                             "no retention pool may exist yet, and purge tasks wait for theirs")
    # Tasks cannot read pools; the plan task checks this receipt instead.
    done = subprocess.run([sys.executable, "-m", "airflow", "variables", "set", POOLS_VARIABLE, pools_receipt(pools)],
                          capture_output=True, text=True, env=os.environ.copy())
    if done.returncode != 0:
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1][:300]
        raise RetentionError(f"the pools are set, but `airflow variables set {POOLS_VARIABLE}` failed "
                             f"(exit {done.returncode}): {last}; the plan tasks will refuse to run until it is set")
    print(f"✓ {count(len(pools), 'pool')} set in Airflow.", file=sys.stderr)
    return EXIT_OK
