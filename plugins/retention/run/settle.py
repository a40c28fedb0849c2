"""Settlement: what certifying a run needs done first, whether the run is certified by its
own worker or, after that worker died, by the next run of its category.

Batches left pending are reconciled against their targets, the targets of an interrupted
run that never finished are recorded as failed, and an archive run's manifest is written.
Everything is read from the journal, as the run planned it: never from the rule file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from retention.archive.manifest import build_manifest
from retention.clock import utc_iso
from retention.errors import TransientError
from retention.holds import HoldRegistry, HoldView
from retention.retry import describe_error, is_retryable
from retention.run.certify import certify
from retention.targets.s3.descriptors import ObjectsDescriptor
from retention.targets.sql.descriptors import BatchDescriptor

if TYPE_CHECKING:
    from retention.evidence.chain import Certificate
    from retention.evidence.signing import Signer
    from retention.run.journal import RunJournal, RunRecord
    from retention.targets import Targets

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settlement:
    """Settles runs of one audit journal, with a runner's target connections and signer."""

    journal: RunJournal
    targets: Targets
    signer: Signer

    def settle_interrupted(self, run: RunRecord) -> Certificate:
        """Certify a run whose worker died: unfinished targets are recorded as failed (publishing
        the checkpoint of its certificate is the caller's)."""
        log.warning("run %s of %s was never certified; settling and certifying it now", run.run_id, run.category)
        self.settle_pending(run)
        for record in self.journal.targets(run):
            if record.state in ("planned", "running"):
                self.journal.update_target(
                    run, record.target, state="failed",
                    error="interrupted" if record.state == "running" else "not run",
                )
        return certify(self.journal, run, self.signer, extra=self.manifest(run, settling=True))

    def settle_pending(self, run: RunRecord) -> None:
        """Reconcile every batch journaled pending against its target: what did go is done, the rest void."""
        for record in self.journal.targets(run):
            if not record.unconfirmed:
                continue
            holds = HoldView(HoldRegistry(self.journal.engine), run.category, record.target, run.as_of)
            try:
                self.targets.open(record.planned.target, record.planned.context, holds=holds).reconcile(
                    run.cutoff, self.journal.ledger(run, record.target))
            except Exception:
                # The certificate will show these rows as unconfirmed rather than claim them.
                log.warning("could not settle pending batches of %s.%s", run.category, record.target, exc_info=True)

    def manifest(self, run: RunRecord, *, settling: bool = False) -> dict[str, Any] | None:
        """For an archive run: write the manifest of every verified object; its location and
        SHA-256 go into the certificate.

        A manifest that cannot be written is recorded as such (``archive_error``, and the run
        is never complete), so an unreachable bucket cannot keep a run from its certificate:
        at once when settling an earlier run, and for this run's certify when retrying cannot help.
        """
        records = self.journal.targets(run)
        contexts = [r.planned.context for r in records]
        archive = next((c.archive for c in contexts if c is not None and c.archive is not None), None)
        if archive is None:
            return None
        sql_objects: list[dict[str, Any]] = []
        s3_objects: list[dict[str, Any]] = []
        for record in records:
            for descriptor in self.journal.ledger(run, record.target).descriptors():
                if record.kind == "s3":
                    s3_objects += [{"target": record.target, **obj}
                                   for obj in ObjectsDescriptor.decode(descriptor).archived_entries()]
                else:
                    sql_objects += [{"target": record.target, **obj}
                                    for obj in BatchDescriptor.decode(descriptor).archived_objects()]
        body = build_manifest(
            {"category": run.category, "run_id": run.run_id, "rule": {"path": run.rule_path, "sha256": run.rule_sha256},
             "as_of": utc_iso(run.as_of), "cutoff": utc_iso(run.cutoff), "connection": archive.connection,
             "bucket": archive.bucket, "format": archive.format,
             **({"sse": archive.sse_manifest} if archive.sse else {})},
            sql_objects, s3_objects,
        )
        where = f"s3://{archive.bucket}/"
        try:
            store = self.targets.archive_store(archive)
            key = store.manifest_key(run.category, run.run_id)
            where += key
            stored = store.put_verified(key, body, table="manifest", rows=0, content_type="application/json")
        except Exception as exc:
            if not settling and is_retryable(exc):
                raise TransientError(f"{run.category}: the archive manifest {where} could not be written "
                                     f"({describe_error(exc)}); certify again") from exc
            log.error("%s: run %s: the archive manifest %s could not be written (%s); certifying without it",
                      run.category, run.run_id, where, describe_error(exc))
            return {"archive_error": f"{where} could not be written: {describe_error(exc)}"[:500]}
        return {"archive": {"manifest": f"s3://{archive.bucket}/{key}", "sha256": stored.sha256,
                            "objects": len(sql_objects) + sum(1 for o in s3_objects if o.get("key"))}}
