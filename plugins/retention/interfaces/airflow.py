"""Airflow DAGs built from the rule files: the only module of the engine that imports Airflow.

One DAG per rule, ``retention__<category>``: ``plan`` (open the run, fix ``as_of``,
count) → ``purge`` (mapped, one task per target; one mapped task per connection, each in
that connection's pool ``retention__<conn_id>``) → ``certify`` (always runs; fails the
DAG run unless every target completed). Parsing reads only the YAML: connections,
keys and databases are touched by tasks, never at parse time.

A rule file that does not validate becomes a DAG whose only task fails with the
validation errors, so a typo in one rule is loud every night without stopping the
purges of the others.
"""

from __future__ import annotations

import logging
import os
import re
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pendulum
from airflow.sdk import DAG, Param, TriggerRule, get_current_context, task
from airflow.sdk.definitions.retry_policy import ExceptionRetryPolicy, RetryAction, RetryRule
from airflow.sdk.exceptions import AirflowFailException

from retention.connections import ConnectionSpec
from retention.errors import ConfigError, RuleProblem
from retention.interfaces.airflow_signals import (
    add_asset_event,
    category_alias,
    emit_metrics,
    pager_line,
    retention_lag,
    target_signal,
)
from retention.interfaces.pools import POOLS_VARIABLE, pool_name, unsynced_advice, unsynced_pools
from retention.rules.loader import salvage_fields, scan_rules
from retention.rules.models import RuleFile

if TYPE_CHECKING:
    from retention.run.journal import RunRecord
    from retention.run.runner import Runner

log = logging.getLogger(__name__)

DAG_PREFIX = "retention__"
START_DATE = pendulum.datetime(2024, 1, 1, tz="UTC")

# Retry only what can succeed: a bad rule or a forged key will be just as bad next time.
RETRY_POLICY = ExceptionRetryPolicy(
    rules=[
        RetryRule(exception="retention.errors.TerminalError", action=RetryAction.FAIL,
                  reason="needs a person: retrying cannot help"),
        RetryRule(exception="retention.errors.TransientError", action=RetryAction.RETRY,
                  reason="transient: another attempt may succeed"),
    ]
)


def default_rules_dir(dags_file: str | os.PathLike[str]) -> Path:
    """``$RETENTION_RULES_DIR``, else ``retention_rules/`` beside the DAGs folder."""
    configured = os.environ.get("RETENTION_RULES_DIR")
    if configured:
        return Path(configured)
    return Path(dags_file).resolve().parent.parent / "retention_rules"


def build_dags(rules_dir: str | os.PathLike[str]) -> dict[str, DAG]:
    """A DAG per rule file in ``rules_dir``, keyed by dag_id."""
    rules, problems = scan_rules(Path(rules_dir))
    dags = {}
    for rule_file in rules:
        try:
            dag = _rule_dag(rule_file)
        except Exception as exc:
            # A rule Airflow refuses (a schedule croniter takes but Airflow does not) must
            # not make the whole DAG file fail to import: it becomes this file's problem.
            problems.append(rule_file.problem((), f"Airflow cannot build its DAG: {exc}"))
            continue
        dags[dag.dag_id] = dag
    by_file: dict[str, list[RuleProblem]] = {}
    for problem in problems:
        by_file.setdefault(problem.path, []).append(problem)
    # A file whose category agrees with its name claims that DAG id before a stray copy does.
    ordered = sorted(by_file.items(), key=lambda item: salvage_fields(item[0]).category != Path(item[0]).stem)
    for path, file_problems in ordered:
        if not Path(path).is_file():
            # No rules directory, or no rule in it: nothing could run, say so at parse time.
            raise ConfigError("; ".join(str(p) for p in file_problems))
        log.error("invalid retention rule %s:\n%s", path, "\n".join(str(p) for p in file_problems))
        dag = _invalid_rule_dag(Path(path), file_problems, taken=dags)
        dags[dag.dag_id] = dag
    return dags


def report_invalid_rules(rules_dir: str | os.PathLike[str]) -> list[RuleProblem]:
    """Log every problem of the rule files in ``rules_dir`` as an error; return them.

    Each DAG's plan task calls this, so a broken rule shows in every category's log,
    not only in the DAG that fails for it. Never raises: reporting must not stop a purge.
    """
    try:
        _rules, problems = scan_rules(Path(rules_dir))
    except Exception as exc:
        log.error("could not check the other rule files in %s: %s", rules_dir, type(exc).__name__)
        return []
    for problem in problems:
        log.error("another rule file is invalid and its category is not being purged: %s", problem)
    return problems


def _rule_dag(rule_file: RuleFile) -> DAG:
    rule = rule_file.rule
    category = rule.category
    path = str(rule_file.path)
    with DAG(
        dag_id=f"{DAG_PREFIX}{category}",
        description=rule.description,
        schedule=rule.schedule,
        start_date=START_DATE,
        catchup=False,
        max_active_runs=1,
        tags=["retention", f"owner:{rule.owner}", f"action:{rule.action}"],
        default_args={
            "owner": rule.owner,
            "retries": 2,
            "retry_delay": timedelta(minutes=5),
            "retry_policy": RETRY_POLICY,
        },
        doc_md=_doc(rule_file),
        params={
            "approve_over_limit": Param(
                None, type=["null", "string"],
                description="A reason to let this run purge more than a target's max_fraction/max_records; "
                            "it is written into the certificate.",
            ),
        },
    ) as dag:
        # The task functions stay here and hand their work to the named steps below: their
        # qualified names are in the serialized DAG, whose hash would change if they moved.

        @task(task_id="plan")
        def plan() -> list[str]:
            """Open the run with its as_of, settle earlier uncertified runs, count."""
            return _plan(path, category)

        @task(task_id="purge", map_index_template="{{ target_name }}")
        def purge(target: str) -> dict[str, Any]:
            """Purge one target in journaled batches; resume what an earlier try left."""
            return _purge(path, category, target)

        @task(task_id="certify", trigger_rule=TriggerRule.ALL_DONE)
        def certify() -> dict[str, Any]:
            """Append the run's certificate; fail the DAG run unless it is complete."""
            return _certify(category)

        # A mapped task has one pool, and the pool is per connection: one mapped purge
        # task per connection the targets use, built at parse time from the rule
        # ("purge" when there is one, "purge__<conn_id>" when there are several).
        by_connection: dict[str, list[str]] = {}
        for target in rule.targets:
            by_connection.setdefault(target.connection, []).append(target.name)
        planned, certified = plan(), certify()
        for conn_id, names in by_connection.items():
            task_id = "purge" if len(by_connection) == 1 else f"purge__{conn_id}"
            purges = purge.override(task_id=task_id, pool=pool_name(conn_id),
                                    outlets=[category_alias(category)]).expand(target=names)
            planned >> purges >> certified
    return dag


def _plan(path: str, category: str) -> list[str]:
    """The plan task: open the run with its as_of, settle earlier uncertified runs, log the counts.

    Returns the names of the targets the purge tasks are mapped over.
    """
    context = get_current_context()
    report_invalid_rules(Path(path).parent)
    rule_file = _reload(path, category)
    _check_pools(rule_file)
    with _runner() as runner:
        as_of = context.get("logical_date") or context["dag_run"].run_after
        approval = (context["params"] or {}).get("approve_over_limit")
        run, purge_plan = runner.start(rule_file, run_id=context["run_id"], as_of=as_of, approval=approval)
        from retention.interfaces.render import count

        log.info("run %s: as of %s, cutoff %s", run.run_id, run.as_of, run.cutoff)
        for target in purge_plan.targets:
            unit = target.unit
            log.info("  %s (%s): %s to purge of %s, %s held", target.name, target.location,
                     count(target.matched, unit), count(target.total, unit), count(target.held, unit))
            for note in target.notes:
                log.warning("  %s: %s", target.name, note)
    return [t.name for t in rule_file.rule.targets]


def _purge(path: str, category: str, target: str) -> dict[str, Any]:
    """A purge task: purge ``target`` in journaled batches, resuming what an earlier try left."""
    context = get_current_context()
    context["target_name"] = target  # type: ignore[typeddict-unknown-key]
    with _runner() as runner:
        rule_file = _reload(path, category)
        run = runner.journal.get_run(category, context["run_id"])
        if run is None:
            raise AirflowFailException("the plan task did not open this run")
        try:
            record = runner.purge(rule_file, run, target, progress=_log_progress)
        finally:
            signal = _report_target(runner, rule_file, run, target)
        if signal is not None:
            add_asset_event(context["outlet_events"], rule_file.rule.target(target), signal, run.run_id)
    return {"target": target, "deleted": record.deleted, "matched": record.matched}


def _check_pools(rule_file: RuleFile) -> None:
    """AirflowFailException unless ``sync-pools`` recorded every pool this DAG's purge tasks use.

    A task cannot read Airflow's pools, and a purge task whose pool does not exist is
    never scheduled: without this the category would wait, silently, for ever.
    """
    from airflow.sdk import Variable

    needed = [pool_name(t.connection) for t in rule_file.rule.targets]
    try:
        receipt = Variable.get(POOLS_VARIABLE, default=None, deserialize_json=True)
    except ValueError:  # not JSON: as good as unset
        receipt = None
    missing = unsynced_pools(needed, receipt)
    if missing:
        raise AirflowFailException(unsynced_advice(rule_file.rule.category, missing, receipt))


def _report_target(runner: Runner, rule_file: RuleFile, run: RunRecord, target: str) -> Any:
    """Send the target's metrics after its purge, failed or not; its signal, or None when unknown."""
    try:
        record = {t.target: t for t in runner.journal.targets(run)}.get(target)
        if record is None:
            return None
        signal = target_signal(rule_file, record, retention_lag(runner, run, record))
        emit_metrics(signal)
        return signal
    except Exception:  # the purge's own outcome (or error) is what the task must report
        log.warning("%s.%s: could not report its metrics", run.category, target, exc_info=True)
        return None


def _certify(category: str) -> dict[str, Any]:
    """The certify task: append the run's certificate; AirflowFailException unless it is complete."""
    context = get_current_context()
    with _runner() as runner:
        run = runner.journal.get_run(category, context["run_id"])
        if run is None:
            raise AirflowFailException("the run was never opened (see the plan task); nothing to certify")
        certificate = runner.certify(run)
    log.info("certificate seq %d: %s, %d purged, hash %s", certificate.seq, certificate.status,
             certificate.deleted, certificate.entry_hash)
    if certificate.status != "complete":
        raise AirflowFailException(pager_line(certificate))
    return {"seq": certificate.seq, "status": certificate.status, "entry_hash": certificate.entry_hash}


def _invalid_rule_dag(path: Path, problems: list[RuleProblem], *, taken: dict[str, DAG]) -> DAG:
    # The DAG that was running keeps its id, so it stays unpaused and its runs turn red;
    # a new id would be created paused and fail silently. The category names it when it
    # can be read, else the file name (validation makes the two agree). A valid rule of
    # the same category keeps its id; then this file fails under its own name.
    fields = salvage_fields(path)
    stem = re.sub(r"[^a-z0-9_]", "_", path.stem.lower())[:200] or "unnamed"
    candidates = [f"{DAG_PREFIX}{name}" for name in (fields.category, stem) if name]
    dag_id = next((c for c in candidates if c not in taken), f"{DAG_PREFIX}invalid__{stem}")
    message = "\n".join(str(p) for p in problems)
    tags = ["retention", "invalid-rule"]
    if fields.owner:
        tags.append(f"owner:{fields.owner}")
    if fields.action:
        tags.append(f"action:{fields.action}")
    with DAG(
        dag_id=dag_id,
        description=f"INVALID rule file {path.name}: fix it to restore its purges",
        schedule=None if fields.schedule_is_manual else (fields.schedule or "@daily"),
        start_date=START_DATE,
        catchup=False,
        max_active_runs=1,
        # New DAGs are paused by default; a broken rule must run (and fail) without anyone
        # noticing it first. An existing DAG keeps whatever pause state it had.
        is_paused_upon_creation=False,
        tags=tags,
        default_args={"owner": fields.owner or "airflow", "retries": 0},
        doc_md=f"### Invalid rule file `{path.name}`\n\n```\n{message}\n```",
    ) as dag:

        @task(task_id="rule_is_invalid", retries=0)
        def rule_is_invalid() -> None:
            raise AirflowFailException(f"invalid retention rule; nothing was purged:\n{message}")

        rule_is_invalid()
    return dag


def _runner() -> Runner:
    """The Runner of a task: Airflow's connections, and S3 clients from the Amazon provider's
    hook when it is installed (assume-role, web identity and the rest of its credential chain)."""
    from retention.run.runner import Runner

    return Runner.from_environment(audit=os.environ.get("RETENTION_AUDIT_CONN"), connections=airflow_connection,
                                   s3_client=_s3_hook_client if _has_amazon_provider() else None)


def _has_amazon_provider() -> bool:
    import importlib.util

    return importlib.util.find_spec("airflow.providers.amazon") is not None


def _s3_hook_client(conn_id: str) -> Any:
    """``S3Hook(aws_conn_id).get_conn()``, with the pool and retries the engine's own client has."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook
    from botocore.config import Config

    config = Config(max_pool_connections=66, retries={"mode": "standard", "max_attempts": 5},
                    connect_timeout=10, read_timeout=60)
    return S3Hook(aws_conn_id=conn_id, config=config).get_conn()


def airflow_connection(conn_id: str) -> ConnectionSpec:
    """Resolve a connection id through Airflow (secrets backends, env vars, metadata DB)."""
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        conn = BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        raise ConfigError(f"Airflow connection {conn_id!r} is not defined") from None
    return ConnectionSpec(
        conn_id=conn_id, conn_type=conn.conn_type or "", host=conn.host, schema=conn.schema,
        login=conn.login, password=conn.password, port=conn.port, extra=conn.extra_dejson,
    )


def _reload(path: str, category: str) -> RuleFile:
    # Tasks run from the rule file as it is now; the runner refuses it if it changed
    # since the run was opened.
    from retention.rules.loader import load_rule_file

    rule_file = load_rule_file(path)
    if rule_file.rule.category != category:
        raise AirflowFailException(f"{path} now defines category {rule_file.rule.category!r}, not {category!r}")
    return rule_file


def _log_progress(target: str, deleted: int, matched: int | None, rows: int, seconds: float) -> None:
    log.info("%s: %s of %s purged (batch of %d rows in %.0f ms)", target, f"{deleted:,}",
             f"{matched:,}" if matched is not None else "?", rows, seconds * 1000)


def _doc(rule_file: RuleFile) -> str:
    rule = rule_file.rule
    lines = [
        f"### Retention: `{rule.category}`",
        "",
        rule.description,
        "",
        f"- **Legal basis:** {rule.legal_basis}",
        f"- **Keep for:** `{rule.retain_for}` after the age column, then **{rule.action}**",
        f"- **Owner:** {rule.owner}",
        f"- **Rule file:** `{rule_file.display_path}` (sha256 `{rule_file.sha256[:12]}…`)",
        "",
        "| target | kind | location | age from |",
        "|---|---|---|---|",
    ]
    for target in rule.targets:
        lines.append(f"| {target.name} | {target.kind} | `{target.location}` | `{target.age_source}` |")
    return "\n".join(lines)
