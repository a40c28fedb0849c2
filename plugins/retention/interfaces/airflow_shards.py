"""The Airflow tasks of sharded targets: ``shards`` lists what the plan cut a large table
into, and ``purge_shards`` is mapped over it, one task per (target, shard), each in its
connection's pool, so Celery or Kubernetes workers share one table. The shards of a run
share the run's lease; the certify task sums them into the target's one record.

The DAG itself is built by :mod:`retention.interfaces.airflow`, which calls
:func:`shard_purges` for a rule with sharded targets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow.sdk import get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from retention.interfaces.pools import pool_name

if TYPE_CHECKING:
    from retention.rules.models import RuleFile, Target


def sharded(target: Target) -> bool:
    """Whether ``target`` is purged by a task per shard (a SQL target whose rule sets shard_rows)."""
    return target.kind == "sql" and bool(target.shard_rows)


def shard_purges(rule_file: RuleFile, planned: Any, certified: Any) -> None:
    """The tasks of the sharded targets, per connection (and its pool): ``shards`` reads the
    shards the plan journaled, and ``purge_shards`` is mapped over them, one task per
    (target, shard), so the workers of a Celery or Kubernetes fleet share a large table."""
    rule = rule_file.rule
    path, category = str(rule_file.path), rule.category
    by_connection: dict[str, list[str]] = {}
    for target in rule.targets:
        if sharded(target):
            by_connection.setdefault(target.connection, []).append(target.name)
    connections = {t.connection for t in rule.targets}

    @task(task_id="shards")
    def shards(targets: list[str]) -> list[dict[str, Any]]:
        """The (target, shard) pairs the plan cut, as the purge tasks' arguments."""
        return _shards(category, targets)

    @task(task_id="purge_shards", map_index_template="{{ shard_name }}")
    def purge_shard(target: str, shard: int, of: int) -> dict[str, Any]:
        """Purge one shard of a target in journaled batches; resume what an earlier try left."""
        return _purge_shard(path, category, target, shard, of)

    for conn_id, names in by_connection.items():
        suffix = "" if len(connections) == 1 else f"__{conn_id}"
        listed = shards.override(task_id=f"shards{suffix}")(names)
        purges = purge_shard.override(task_id=f"purge_shards{suffix}", pool=pool_name(conn_id)).expand_kwargs(listed)
        planned >> listed
        purges >> certified


def max_shards(rule_file: RuleFile) -> int:
    """Shards per target: at most MAX_SHARDS, and together never over Airflow's ``max_map_length``."""
    from airflow.sdk.configuration import conf

    from retention.targets.sql.shards import MAX_SHARDS

    targets = sum(1 for t in rule_file.rule.targets if sharded(t))
    return max(1, min(MAX_SHARDS, conf.getint("core", "max_map_length") // max(1, targets)))


def _shards(category: str, targets: list[str]) -> list[dict[str, Any]]:
    """The shards task: every shard of ``targets`` the plan journaled, in walk order."""
    from retention.interfaces.airflow import _runner
    from retention.run.shards import shard_records

    context = get_current_context()
    with _runner() as runner:
        run = runner.journal.get_run(category, context["run_id"])
        if run is None:
            raise AirflowFailException("the plan task did not open this run")
        return [{"target": name, "shard": record.shard.index, "of": record.shard.count}
                for name in targets for record in shard_records(runner.journal, run, name)]


def _purge_shard(path: str, category: str, target: str, shard: int, of: int) -> dict[str, Any]:
    """A purge_shards task: purge shard ``shard`` (of ``of``) of ``target``, resuming what an
    earlier try left; returns the target's totals so far (over its shards)."""
    from retention.interfaces.airflow import _log_progress, _reload, _runner  # the DAG module's, one way for every task

    context = get_current_context()
    context["shard_name"] = f"{target} {shard + 1}/{of}"  # type: ignore[typeddict-unknown-key]  # Airflow's Context TypedDict has no extra keys
    with _runner() as runner:
        rule_file = _reload(path, category)
        run = runner.journal.get_run(category, context["run_id"])
        if run is None:
            raise AirflowFailException("the plan task did not open this run")
        record = runner.purge(rule_file, run, target, shard=shard, progress=_log_progress)
    return {"target": target, "shard": shard, "deleted": record.deleted, "matched": record.matched}
