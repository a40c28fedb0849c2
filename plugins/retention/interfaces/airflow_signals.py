"""What a purge tells the platform: metrics, one asset event per target, a one-line pager message.

Metrics go through the Task SDK's ``airflow.sdk.observability.stats``, so whatever backend
the deployment configured under ``[metrics]`` (StatsD, Datadog, OpenTelemetry) carries
them. Category and target are in the metric *name* as well as in its tags: plain StatsD
drops tags, and a platform team must still tell one category from another.

The purge task's outlet is an asset alias per category, not the target assets
themselves: a mapped purge task covers several targets, and Airflow gives every concrete
outlet an event whenever any one of its mapped instances succeeds. Through the alias each
instance adds the event of the one target it purged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from airflow.sdk import Asset, AssetAlias

from retention.connections import redact

if TYPE_CHECKING:
    from retention.evidence.chain import Certificate
    from retention.rules.models import RuleFile, Target
    from retention.run.journal import RunRecord, TargetRecord
    from retention.run.runner import Runner

log = logging.getLogger(__name__)

METRIC_PREFIX = "retention"
MEASURES = ("purged", "held", "failed", "lag_seconds")
"""Gauges each purge task sets, ``retention.<measure>.<category>.<target>``."""
ASSET_SCHEME = "retention"
PAGER_REASON_CHARS = 120
"""How much of one target's reason the pager line keeps."""
PAGER_LINE_CHARS = 600


@dataclass(frozen=True)
class TargetSignal:
    """Where one target of a run stands after its purge task, as the certificate will count it."""

    category: str
    target: str
    purged: int
    """Records purged (deleted, or anonymized) by the run so far, over all attempts."""
    held: int
    failed: int
    """Expired records the purge left (0 when it completed)."""
    lag_seconds: float | None
    """How long the oldest unheld expired record left has overstayed the run's cutoff; 0 when
    none is left; None when the target could not be read for it."""
    complete: bool


def metric_name(measure: str, category: str, target: str) -> str:
    """``retention.<measure>.<category>.<target>`` (category and target are plain identifiers)."""
    return f"{METRIC_PREFIX}.{measure}.{category}.{target}"


def asset_uri(target: Target) -> str:
    """``retention://<conn_id>/<table>`` for SQL, ``retention://<conn_id>/<bucket>/<prefix>`` for S3."""
    if target.kind == "sql":
        path = target.table
    else:
        path = f"{target.bucket}/{target.prefix}".rstrip("/")
    return f"{ASSET_SCHEME}://{target.connection}/{quote(path, safe='/')}"


def category_alias(category: str) -> AssetAlias:
    """The purge tasks' outlet: the alias through which each adds its target's asset event."""
    return AssetAlias(name=f"{METRIC_PREFIX}__{category}")


def target_signal(rule_file: RuleFile, record: TargetRecord, lag_seconds: float | None) -> TargetSignal:
    """The counts of ``record`` as the certificate's entry for it will state them."""
    from retention.run.certify import target_outcome

    entry = target_outcome(record).entry(rule_file.rule.action)
    return TargetSignal(
        category=rule_file.rule.category, target=record.target,
        purged=int(entry["deleted"]) + int(entry.get("anonymized", 0)), held=int(entry["held"]),
        failed=int(entry["failed"]), lag_seconds=lag_seconds, complete=entry["status"] == "complete",
    )


def retention_lag(runner: Runner, run: RunRecord, record: TargetRecord) -> float | None:
    """Seconds the oldest unheld expired record of the target has overstayed ``run.cutoff`` (0: none).

    The same reading ``retention status`` takes, at the run's cutoff instead of now. None
    (and a warning) when the target cannot be read: a metric must not fail a purge.
    """
    from retention.holds import HoldRegistry, HoldView
    from retention.retry import describe_error

    planned = record.planned
    try:
        holds = HoldView(HoldRegistry(runner.journal.engine), run.category, record.target, run.as_of)
        handle = runner.targets.open(planned.target, planned.context, holds=holds)
        _expired, _held, oldest = handle.oldest_expired(run.cutoff)
    except Exception as exc:
        log.warning("%s.%s: retention lag not measured: %s", run.category, record.target,
                    redact(describe_error(exc)))
        log.debug("retention lag", exc_info=True)
        return None
    return max((run.cutoff - oldest).total_seconds(), 0.0) if oldest is not None else 0.0


def emit_metrics(signal: TargetSignal) -> None:
    """Set the target's gauges through Airflow's metrics; never raises."""
    from airflow.sdk.observability import stats

    tags = {"category": signal.category, "target": signal.target}
    values: dict[str, float | None] = {"purged": signal.purged, "held": signal.held, "failed": signal.failed,
                                       "lag_seconds": signal.lag_seconds}
    for measure in MEASURES:
        value = values[measure]
        if value is None:
            continue
        try:
            stats.gauge(metric_name(measure, signal.category, signal.target), value, tags=tags)
        except Exception:  # a metrics backend that is down must not fail the purge
            log.warning("could not send metric %s", measure, exc_info=True)


def add_asset_event(outlet_events: Any, target: Target, signal: TargetSignal, run_id: str) -> None:
    """Record the target's asset event on the category's alias (Airflow sends it when the task succeeds)."""
    extra: dict[str, Any] = {"category": signal.category, "target": signal.target, "run_id": run_id,
                             "purged": signal.purged, "held": signal.held}
    # No certificate seq: the certificate is appended by certify, after every purge.
    outlet_events[category_alias(signal.category)].add(Asset(asset_uri(target)), extra=extra)


def pager_line(certificate: Certificate) -> str:
    """One line a pager can show: category, status, seq, and each target that did not complete, with why.

    The reasons are the certificate's own (class and code or the engine's message, never
    row data), passed through the same secret scrubbing the CLI uses.
    """
    head = f"retention {certificate.category}: run {certificate.status}: certificate seq {certificate.seq}"
    targets = certificate.data.get("targets", [])
    failed = [t for t in targets if isinstance(t, dict) and t.get("status") != "complete"]
    parts = []
    for entry in failed:
        reason = " ".join(redact(str(entry.get("error") or "not run")).split())
        if len(reason) > PAGER_REASON_CHARS:
            reason = reason[:PAGER_REASON_CHARS - 1] + "…"
        parts.append(f"{entry.get('name')} failed: {reason}")
    line = f"{head}; {'; '.join(parts)}" if parts else head
    return line if len(line) <= PAGER_LINE_CHARS else line[:PAGER_LINE_CHARS - 1] + "…"
