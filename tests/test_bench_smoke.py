"""Every bench script runs, checks its purge and prints its figures against its peer.

A bench is not a test of speed, and nothing here asserts one: each script is run at a tiny
size as a subprocess, exactly as ``make bench`` runs it, and must exit 0 (its own checks of
what was purged passed), print its summary table with the ratio line, and write the JSON
figures (``--save``) with the fields the docs and the lead's tables are built from: the
ratio against the peer, the verdict of the checks and the peak RSS of the engine. Two
benches once broke silently for weeks; this catches that.

The peers a DBA would pick (pt-archiver, pg_partman) are used where installed; a machine
without them must still measure the engine and say "peer not installed", which is tested
here by hiding them (PATH without pt-archiver; ``RETENTION_BENCH_WITHOUT_PEERS``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import pytest

from conftest import MYSQL_ADMIN, PG_ADMIN

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
# Imported by the scripts, not run: the shared harness, the moto child process, and the
# archive bench's experiments (archive_purge --sketch/--profile: not needed for its verdict,
# and a moto server and seconds of CHECKPOINTs more; only imported below).
HELPERS = {"harness.py", "moto_process.py", "archive_experiments.py"}
TINY = ["--rows", "2000", "--expired", "1000", "--repeat", "1"]
PG = ["--pg", PG_ADMIN]
COMMAND_SCENARIOS = ["pg-empty", "pg-delete", "mariadb", "pg-archive"]


def _methods_correct(methods: dict) -> None:
    wrong = {name: m.get("problems") for name, m in methods.items() if not m.get("correct", not m.get("problems"))}
    assert wrong == {}


def _check_sql(report: dict) -> None:
    assert set(report["methods"]) == {"raw", "engine", "ctid"}
    _methods_correct(report["methods"])
    assert report["verdict"]["ratio_engine_over_raw"] > 0
    assert isinstance(report["methods"]["engine"]["rss_growth_kib"], int)


def _check_command(report: dict) -> None:
    scenarios = report["scenarios"]
    assert set(scenarios) == set(COMMAND_SCENARIOS)
    for name, scenario in scenarios.items():
        _methods_correct(scenario["methods"])
        # The whole command's process: an interpreter with the engine loaded is well over 10 MiB.
        assert scenario["methods"]["command"]["peak_rss_kib"] > 10 * 1024, name
    assert set(scenarios["pg-delete"]["ratios"]) == {"command/raw", "engine/raw"}
    assert isinstance(scenarios["pg-delete"]["methods"]["engine"]["rss_growth_kib"], int)
    # The stack's floor is measured where it bounds a ratio, and bounds it below 1.
    assert scenarios["pg-empty"]["floor_seconds"] > 0 and scenarios["pg-delete"]["floor_seconds"] > 0
    assert 0 < scenarios["pg-delete"]["best_command_ratio"] < 1
    if "mariadb" in scenarios:
        peers = {"command/raw"} | ({"command/pt-archiver"} if shutil.which("pt-archiver") else set())
        assert set(scenarios["mariadb"]["ratios"]) == peers
    pipeline = shutil.which("psql") and shutil.which("gzip")
    assert set(scenarios["pg-archive"]["ratios"]) == ({"command/raw-archive"} if pipeline else set())
    assert all(value > 0 for s in scenarios.values() for value in s["ratios"].values())
    # CPU seconds by process: the method's client always; PostgreSQL's backends on PostgreSQL;
    # moto only where the command archives to it.
    for name, scenario in scenarios.items():
        for method, figures in scenario["methods"].items():
            expected = {"client"} | ({"pg"} if name != "mariadb" else set()) | ({"moto"} if name == "pg-archive" else set())
            assert set(figures["cpu_s"]) == expected, (name, method)
            assert all(used >= 0 for used in figures["cpu_s"].values()), (name, method)
        assert scenario["workers"] == 1


def _check_partition(report: dict) -> None:
    methods = report["methods"]
    assert {m for m, f in methods.items() if f["problems"]} == set()
    assert methods["engine"]["partitions_dropped"] == 11  # the months wholly before the cutoff
    assert methods["engine"]["peak_rss_kib"] > 10 * 1024
    assert report["ratios"]["engine_vs_raw"] >= 0
    assert ("partman" in methods) == ("pg_partman" not in report["peers_missing"])
    assert ("engine_vs_partman" in report["ratios"]) == ("partman" in methods)
    floor = report["floor"]  # the command's fixed cost: what ratio is reachable at best
    assert 0 < floor["import_seconds"] and 0 < floor["empty_run_seconds"]
    assert floor["best_engine_vs_raw"] >= 0


def _check_shard(report: dict) -> None:
    _methods_correct(report["methods"])
    assert report["methods"]["sharded"]["shards"] >= 2
    assert report["same_certificate"] is True
    assert report["speed_up"] > 0
    assert isinstance(report["methods"]["single"]["rss_growth_kib"], int)
    assert report["methods"]["sharded"]["worker_peak_rss_kib"] > 10 * 1024


def _check_s3(report: dict) -> None:
    _methods_correct(report["methods"])
    assert report["verdict"]["ratio_engine_over_raw"] > 0
    assert isinstance(report["methods"]["engine"]["rss_growth_kib"], int)


def _check_archive(report: dict) -> None:
    assert report["correct"] is True
    _methods_correct(report["methods"])
    assert set(report["methods"]) == {"raw", "engine"}
    assert report["verdict"]["ratio_engine_over_raw"] > 0
    memory = report["memory"]
    assert set(memory["points"]) == {"1000", "1500"} and "flat" in memory
    assert all(isinstance(p["growth_kib"], int) and p["correct"] for p in memory["points"].values())


def _check_anonymize(report: dict) -> None:
    assert report["correct"] is True
    assert set(report["backends"]) == {"postgresql", "mariadb"}
    for figures in report["backends"].values():
        _methods_correct(figures["methods"])
        assert figures["engine_over_raw"] > 0 and figures["engine_over_python"] > 0
        assert isinstance(figures["methods"]["engine"]["rss_growth_kib"], int)


def _check_replica_lag(report: dict) -> None:
    assert report["correct"] is True
    assert set(report["backends"]) == {"postgresql", "mariadb"}
    for figures in report["backends"].values():
        assert figures["left_ok"] is True and figures["status"] == "complete"
        assert figures["rows_per_s"] > 0 and isinstance(figures["max_lag_sampled"], (int, float))


# script: (its tiny options, the lines its summary must print, the check of its JSON figures)
CASES = {
    "sql_purge.py": (TINY + PG, [r"ratio engine/raw\s+\d", r"peak RSS growth during purge"], _check_sql),
    "command_purge.py": (TINY + PG + ["--mysql", MYSQL_ADMIN, "--scenario", *COMMAND_SCENARIOS],
                         [r"command/raw: \d", r"engine/raw: \d", r"peak RSS", r"floor \(the stack's start-up",
                          r"best command/raw \(raw / \(raw \+ floor\)\): \d"], _check_command),
    "partition_purge.py": (["--rows", "2400", "--repeat", "1"] + PG,
                           [r"engine_vs_raw: \d", r"peak RSS \d", r"floor: an empty run \d"], _check_partition),
    "shard_purge.py": (TINY + PG + ["--shard-rows", "500"], [r"speed-up \(sharded rows/s over single\): \d", r"workers' peak RSS \d"],
                       _check_shard),
    "s3_purge.py": (["--objects", "1500", "--repeat", "1", "--concurrency", "4"], [r"ratio engine/raw\s+\d", r"peak RSS growth during purge \d"],
                    _check_s3),
    "archive_purge.py": (TINY + PG + ["--memory-sizes", "1000,1500"],
                         [r"ratio engine/raw\s+\d", r"peak RSS growth at 0\.001M", r"memory flat in rows"],
                         _check_archive),
    "anonymize_purge.py": (["--rows", "2000", "--repeat", "1", "--mariadb", MYSQL_ADMIN] + PG,
                           [r"engine / python\s+\d", r"engine peak RSS growth"], _check_anonymize),
    # Builds its own streaming replicas (tests/replicas.py), as tests/test_replica_lag.py does.
    "replica_lag.py": (["--rows", "2000", "--expired", "1000", "--limit", "10"],
                       [r'"max_lag_sampled": ', r'"status": "complete"'], _check_replica_lag),
}


# Runs the peer tests need besides CASES: (script, options, extra environment).
PEERLESS = {
    # A PATH with only this interpreter's directory: no pt-archiver there (nor in /usr/bin).
    "no pt-archiver": ("command_purge.py", [*TINY, *PG, "--mysql", MYSQL_ADMIN, "--scenario", "mariadb", "--json"],
                       {"PATH": str(Path(sys.executable).parent)}),
    "no pg_partman": ("partition_purge.py", ["--rows", "2400", *PG], {"RETENTION_BENCH_WITHOUT_PEERS": "pg_partman"}),
    # The archive-by-partition mode of the same script (its own methods and ratios).
    "partition archive": ("partition_purge.py", ["--rows", "2400", "--repeat", "1", "--archive", *PG], None),
}
# Started in this order, so that the longest runs do not start last.
SLOWEST_FIRST = ["replica_lag.py", "archive_purge.py", "command_purge.py", "shard_purge.py", "s3_purge.py", "partition_purge.py",
                 "anonymize_purge.py"]
PARALLEL = 3  # bench processes at a time: a tiny run mostly waits (CREATE/DROP DATABASE, CHECKPOINT, start-up)


def run_bench(script: str, options: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python bench/<script> <options>`` as make bench runs it (this engine on the path)."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT / "plugins"), **(env or {})}
    return subprocess.run([sys.executable, str(BENCH / script), *options], capture_output=True, text=True,
                          env=environment, cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def bench_runs(request, tmp_path_factory):
    """The runs the selected tests need, started at once, ``PARALLEL`` at a time: name -> future."""
    scratch = tmp_path_factory.mktemp("bench")
    # Only the runs of the tests selected (a -k choosing one script starts only that script).
    wanted = {item.callspec.params.get("script") or item.callspec.params["run"] for item in request.session.items
              if item.module is request.module and "bench_runs" in item.fixturenames
              and not item.get_closest_marker("skip")}
    pool = ThreadPoolExecutor(PARALLEL)
    runs = {}
    for name in sorted(wanted, key=lambda n: (SLOWEST_FIRST.index(n) if n in SLOWEST_FIRST else len(SLOWEST_FIRST), n)):
        if name in CASES:
            options = [*CASES[name][0], "--save", str(scratch / f"{name}.json")]
            runs[name] = (pool.submit(run_bench, name, options), scratch / f"{name}.json")
        else:
            runs[name] = (pool.submit(run_bench, *PEERLESS[name]), None)
    yield runs
    pool.shutdown(cancel_futures=True)


def _succeeded(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, f"exit {done.returncode}\n--- stdout\n{done.stdout[-2000:]}\n--- stderr\n{done.stderr[-4000:]}"
    assert "Traceback" not in done.stderr
    return done.stdout


def test_the_archive_experiments_import_against_this_harness():
    """They run only on request (--sketch, --profile); a harness change must not break them unseen."""
    code = "import archive_experiments as e; e.checked_onepass; e.profile_pieces; e.print_profile"
    done = subprocess.run([sys.executable, "-c", code], cwd=BENCH, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": f"{BENCH}{os.pathsep}{ROOT / 'plugins'}"})
    assert done.returncode == 0, done.stderr


def test_every_bench_script_has_a_smoke_case():
    """A new bench script gets a case here (or is named a helper), so it cannot break unseen."""
    assert {p.name for p in BENCH.glob("*.py")} - HELPERS == set(CASES)


def test_make_bench_runs_every_bench_script():
    (line,) = [line for line in (ROOT / "Makefile").read_text().splitlines() if line.startswith("BENCHES")]
    assert {f"{name}.py" for name in line.split(":=", 1)[1].split()} == set(CASES)


@pytest.mark.parametrize("script", sorted(CASES))
def test_bench_script_runs_tiny_and_prints_its_figures(script, bench_runs):
    _options, lines, check = CASES[script]
    future, saved = bench_runs[script]
    out = _succeeded(future.result())
    for pattern in lines:
        assert re.search(pattern, out), f"{script} printed no line matching {pattern!r}:\n{out}"
    check(json.loads(saved.read_text()))


@pytest.mark.parametrize("run", ["no pt-archiver"])
def test_without_pt_archiver_the_mariadb_bench_says_so_and_measures_the_engine(run, bench_runs):
    report = json.loads(_succeeded(bench_runs[run][0].result()))
    scenario = report["scenarios"]["mariadb"]
    assert set(scenario["methods"]) == {"command", "raw"}
    assert scenario["peers_missing"]["pt-archiver"].startswith("peer not installed")
    assert set(scenario["ratios"]) == {"command/raw"}


@pytest.mark.parametrize("run", ["no pg_partman"])
def test_without_pg_partman_the_partition_bench_says_so_and_measures_the_engine(run, bench_runs):
    out = _succeeded(bench_runs[run][0].result())
    assert re.search(r"^pg_partman: peer not installed", out, re.M), out
    assert re.search(r"^engine_vs_raw: \d", out, re.M) and "engine_vs_partman" not in out


def test_the_customers_check_finds_a_wrong_purge(pg_db):
    """The benches' exit code follows ``verify``: it must name rows left, and rows purged that were not due."""
    sys.path.insert(0, str(BENCH))
    from harness import build_pristine, fresh_copy, verify

    cutoff = datetime(2024, 1, 1, tzinfo=timezone.utc)
    build_pristine(pg_db.engine, 300, 100, cutoff)
    fresh_copy(pg_db.engine)
    problems = verify(pg_db.engine, 300, 100, cutoff)  # nothing purged
    assert "300 rows remain, expected 200 (0 gone, expected 100)" in problems
    assert "100 expired rows remain" in problems
    one_too_many = ("DELETE FROM customers WHERE closed_at < :c "
                    "OR id = (SELECT min(id) FROM customers WHERE closed_at >= :c)")
    pg_db.execute(one_too_many, {"c": cutoff})
    assert verify(pg_db.engine, 300, 100, cutoff) == [
        "199 rows remain, expected 200 (101 gone, expected 100)",
        "the remaining ids differ from the unexpired ids of the pristine copy"]
    fresh_copy(pg_db.engine)
    pg_db.execute("DELETE FROM customers WHERE closed_at < :c", {"c": cutoff})
    assert verify(pg_db.engine, 300, 100, cutoff) == []


@pytest.mark.parametrize("script, options", [
    ("command_purge.py", ["--scenario", "mariadb", "--mysql", "no-such-url"]),
    ("anonymize_purge.py", ["--backends", "mariadb", "--mariadb", "no-such-url"]),
])
def test_a_server_url_that_is_no_url_is_refused_naming_its_option(script, options):
    done = run_bench(script, [*TINY[:4], *options] if script != "anonymize_purge.py" else ["--rows", "10", *options])
    assert done.returncode != 0
    assert "Traceback" not in done.stderr and "is not a SQLAlchemy URL" in done.stderr
    assert options[-2] in done.stderr


def test_statement_ages_follow_a_statement_across_samples():
    sys.path.insert(0, str(BENCH))
    from command_purge import StatementAges

    ages = StatementAges()
    assert ages.observe(10.0, []) == 0.0
    assert ages.observe(10.0, [(7, "DELETE ... 1", 0)]) == 0.0
    assert ages.observe(10.3, [(7, "DELETE ... 1", 0)]) == pytest.approx(0.3)
    assert ages.observe(10.4, [(7, "DELETE ... 2", 0)]) == 0.0  # the next batch's statement
    assert ages.observe(10.5, [(7, "DELETE ... 2", 0), (8, "SELECT", 2)]) == pytest.approx(2.0)  # 2 s when first seen
    assert ages.observe(10.6, []) == 0.0


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_the_command_bench_monitor_sees_a_long_statement(backend, new_database):
    """Without information_schema on MariaDB (it crashed 10.11.19 under this sampling), still to the tens of ms."""
    sys.path.insert(0, str(BENCH))
    import sqlalchemy as sa
    from command_purge import TransactionMonitor

    database = new_database(backend)
    sleep = "SELECT pg_sleep(0.4)" if backend == "postgresql" else "SELECT SLEEP(0.4)"
    monitor_engine, other = sa.create_engine(database.url), sa.create_engine(database.url)
    try:
        with TransactionMonitor(monitor_engine, database.url.database) as monitor:
            with other.begin() as conn:
                conn.execute(sa.text(sleep))
        assert 0.3 <= monitor.longest < 5
    finally:
        monitor_engine.dispose()
        other.dispose()


@pytest.mark.parametrize("run", ["partition archive"])
def test_the_partition_bench_in_archive_mode_prints_its_figures(run, bench_runs):
    out = _succeeded(bench_runs[run][0].result())
    assert re.search(r"archive_vs_raw_copy: \d", out) and re.search(r"archive_vs_batches: \d", out), out
    assert re.search(r"archive \(the whole command\): peak RSS \d", out), out
