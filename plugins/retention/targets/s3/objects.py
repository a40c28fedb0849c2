"""S3 targets: find a rule's expired objects and purge them, counting what is held.

Expired objects (:mod:`~retention.targets.s3.listing`) are purged in batches of whole
objects, up to ``max_batch_keys`` versions each, from a bounded pool of threads, by the
rule's action (:mod:`~retention.targets.s3.actions`). Objects a legal hold of ours covers,
or that Object Lock protects (legal hold, or a retention date still ahead), are skipped
and counted as held. A batch a crash left pending is settled by asking S3 which of its
versions still exist (:mod:`~retention.targets.s3.settle`).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from retention.aws import DENIED_CODES, NO_BUCKET_CODES, NO_LOCK_CONFIG_CODES, NOT_FOUND_CODES, s3_error_code
from retention.errors import TargetError
from retention.targets.base import BatchLedger, BatchResult, Progress, PurgeOutcome, RecordBudget, RecordLimit, Survey
from retention.targets.s3.actions import DeleteObjects, ObjectBatch, S3Action, Tally
from retention.targets.s3.archive import ArchiveObjects
from retention.targets.s3.descriptors import ObjectsDescriptor
from retention.targets.s3.listing import ObjectListing, S3Object
from retention.targets.s3.settle import settle_pending

if TYPE_CHECKING:
    from retention.archive.store import ArchiveStore
    from retention.holds import Hold, HoldView
    from retention.rules.models import S3Target

log = logging.getLogger(__name__)


class S3Objects:
    """A rule's S3 target bound to a client."""

    def __init__(
        self, target: S3Target, client: Any, *, clock: Callable[[], datetime] | None = None,
        archive: ArchiveStore | None = None, category: str = "", run_id: str = "", holds: HoldView | None = None,
    ):
        self.target = target
        self.client = client
        self.holds = holds
        self.listing = ObjectListing(target, client)
        # With action: archive, objects are copied to the archive (and checked) first.
        self.action: S3Action = (ArchiveObjects(archive, category=category, run_id=run_id) if archive is not None
                                 else DeleteObjects())
        # Object Lock dates are S3's rule, judged by S3's clock: only used to predict it.
        self._clock = clock or (lambda: datetime.now(timezone.utc))
        self._locked: bool | None = None

    # -- shape ---------------------------------------------------------------------

    def check(self) -> None:
        """Raise TargetError unless the bucket exists and can be reached."""
        try:
            self.client.head_bucket(Bucket=self.target.bucket)
        except ClientError as exc:
            code = s3_error_code(exc)
            if code in NO_BUCKET_CODES:
                raise TargetError(f"bucket {self.target.bucket!r} does not exist", "bucket") from None
            if code in DENIED_CODES:
                raise TargetError(
                    f"bucket {self.target.bucket!r} refuses access to connection {self.target.connection!r}",
                    "bucket",
                ) from None
            raise

    @property
    def versioned(self) -> bool:
        """True when the bucket keeps (or kept) versions: listing and deletes go by version."""
        return self.listing.versioned

    @property
    def locked(self) -> bool:
        """True when the bucket has Object Lock enabled."""
        if self._locked is None:
            try:
                config = self.client.get_object_lock_configuration(Bucket=self.target.bucket)
                self._locked = config.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled"
            except ClientError as exc:
                if s3_error_code(exc) not in NO_LOCK_CONFIG_CODES:
                    raise
                self._locked = False
        return self._locked

    # -- what would go ---------------------------------------------------------------

    def survey(self, cutoff: datetime) -> Survey:
        """Objects and bytes that would go, of how many objects under the prefix.

        Objects a legal hold covers, or (on a bucket with Object Lock) under retention or
        an S3 legal hold, are counted as held, as the run will count them.
        """
        survey = Survey(bytes=0)
        seen = [0]
        self.listing.undated = 0
        holds = self.holds.current() if self.holds is not None else []
        survey.notes += [f"{'paused by' if h.whole else 'protected by'} {h.describe()}: {h.reason}" for h in holds]
        with ThreadPoolExecutor(self.target.concurrency) as pool:
            for obj, held in self._lock_checked(self.listing.expired(cutoff, pool, seen), holds):
                if held:
                    survey.held += 1
                    continue
                survey.matched += 1
                survey.bytes = (survey.bytes or 0) + obj.size  # started at 0 above
        survey.total = seen[0]
        undated = self.listing.undated
        if undated:
            survey.notes.append(
                f"{undated:,} object{'' if undated == 1 else 's'} without a date matching "
                f"{self.target.key_date_format} "
                "in the key: kept"
            )
        if self.versioned:
            survey.notes.append("versioned bucket: every version and delete marker of an expired key is deleted")
        if self.locked:
            survey.notes.append("Object Lock is enabled: objects under retention or an S3 legal hold are counted "
                                "as held, not deleted")
        return survey

    def oldest_expired(self, cutoff: datetime) -> tuple[int, int, datetime | None]:
        """Expired objects still here (not held), held ones, and when the oldest one expired-aged."""
        holds = self.holds.current() if self.holds is not None else []
        expired = held = 0
        oldest: datetime | None = None
        with ThreadPoolExecutor(self.target.concurrency) as pool:
            for obj, is_held in self._lock_checked(self.listing.expired(cutoff, pool), holds):
                if is_held:
                    held += 1
                    continue
                expired += 1
                age = self.listing.aged_from(obj)
                if age is not None and (oldest is None or age < oldest):
                    oldest = age
        return expired, held, oldest

    # -- holds ---------------------------------------------------------------------

    def _lock_checked(self, objects: Iterator[S3Object], holds: list[Hold]) -> Iterator[tuple[S3Object, bool]]:
        """Each object with whether it is held: by a legal hold of ours, or by Object Lock.

        Object Lock needs a HEAD per version; those run ``concurrency`` at a time, with a
        bounded number in flight, in listing order.
        """
        if not self.locked:
            for obj in objects:
                yield obj, self._held_by(holds, obj.key)
            return
        window = 4 * self.target.concurrency
        with ThreadPoolExecutor(self.target.concurrency, thread_name_prefix="s3-lock") as heads:
            in_flight: deque[tuple[S3Object, Future[bool] | None]] = deque()
            for obj in objects:
                check = None if self._held_by(holds, obj.key) else heads.submit(self.object_locked, obj)
                in_flight.append((obj, check))
                if len(in_flight) >= window:
                    done, check = in_flight.popleft()
                    yield done, check is None or check.result()
            for done, check in in_flight:
                yield done, check is None or check.result()

    def _held_by(self, holds: list[Hold], key: str) -> bool:
        for hold in holds:
            if hold.prefix is None:
                if not hold.whole:
                    log.warning("%s on an S3 target has no --prefix; it protects the whole target", hold.describe())
                return True
            if key.startswith(hold.prefix):
                return True
        return False

    def object_locked(self, obj: S3Object) -> bool:
        """Whether Object Lock protects a version of ``obj``: an S3 legal hold, or a retention
        date still ahead (one HEAD per version)."""
        now = self._clock()
        for version in obj.versions:
            if version.delete_marker:
                continue
            kwargs = {"Bucket": self.target.bucket, "Key": obj.key}
            if version.version_id:
                kwargs["VersionId"] = version.version_id
            try:
                head = self.client.head_object(**kwargs)
            except ClientError as exc:
                if s3_error_code(exc) in NOT_FOUND_CODES:
                    continue
                raise
            if head.get("ObjectLockLegalHoldStatus") == "ON":
                return True
            until = head.get("ObjectLockRetainUntilDate")
            if until is not None and until > now:
                return True
        return False

    # -- purge ---------------------------------------------------------------------

    def purge(self, cutoff: datetime, ledger: BatchLedger, *, progress: Progress | None = None,
              limit: RecordLimit | None = None) -> PurgeOutcome:
        """Purge every expired object; count held (locked) and failed ones. No batch takes
        the run's total (earlier attempts included) past ``limit``."""
        self.reconcile(cutoff, ledger)
        budget = RecordBudget(limit, ledger.deleted() if limit is not None else 0)
        left = 0  # expired objects not touched because the limit was reached
        total = Tally()
        workers = self.target.concurrency
        _ = self.locked, self.versioned  # look these up once, before the threads do
        with ThreadPoolExecutor(workers, thread_name_prefix="s3-inspect") as inspect_pool, \
                ThreadPoolExecutor(workers, thread_name_prefix="s3-delete") as delete_pool:
            in_flight: deque[Future[BatchResult[ObjectsDescriptor]]] = deque()

            def collect(future: Future[BatchResult[ObjectsDescriptor]]) -> None:
                result = future.result()
                total.add(result)
                if progress is not None and (result.rows or result.failed):
                    progress(total.deleted, result.rows, result.seconds)

            try:
                for batch in _batches(self.listing.expired(cutoff, inspect_pool), self.target.max_batch_keys):
                    while batch and not left:
                        # Reserved before the batch goes: in-flight batches together never
                        # pass the limit (a reservation waits for theirs to settle).
                        granted = budget.reserve(len(batch))
                        if granted == 0:
                            break
                        in_flight.append(delete_pool.submit(self._budgeted_batch, batch[:granted], ledger,
                                                            budget, granted))
                        batch = batch[granted:]
                    left += len(batch)
                    # Report what has finished as soon as it has; block only when the
                    # listing runs too far ahead of the deletes (bounded memory).
                    while in_flight and (in_flight[0].done() or len(in_flight) >= 2 * workers):
                        collect(in_flight.popleft())
                while in_flight:
                    collect(in_flight.popleft())
            except BaseException:
                for future in in_flight:
                    future.cancel()
                raise
        return self._outcome(total, left, budget)

    def _outcome(self, total: Tally, left: int, budget: RecordBudget) -> PurgeOutcome:
        failures = tuple(f"{code} x{n}" for code, n in total.errors.most_common())
        honoured = tuple(sorted(self.holds.honoured)) if self.holds else ()
        stopped = None
        if left:
            log.warning("%s: blast-radius limit reached (%s); %d expired objects left", self.target.name,
                        budget.limit.describe if budget.limit is not None else "no limit", left)
            stopped = budget.stopped(left + total.failed)
        return PurgeOutcome(total.deleted, total.failed + left, total.held, total.bytes, failures, honoured,
                            stopped=stopped)

    def _budgeted_batch(self, objects: list[S3Object], ledger: BatchLedger, budget: RecordBudget,
                        granted: int) -> BatchResult[ObjectsDescriptor]:
        purged = 0
        try:
            result = self._purge_batch(objects, ledger)
            purged = result.rows
            return result
        finally:
            budget.settle(granted, purged)

    def _purge_batch(self, objects: list[S3Object], ledger: BatchLedger) -> BatchResult[ObjectsDescriptor]:
        """Leave out what is held now, then let the action purge the rest as one batch."""
        started = time.perf_counter()
        held = 0
        if self.holds is not None:
            # Read for every batch: a hold placed after the plan still protects its objects.
            holds = self.holds.current()
            kept = [obj for obj in objects if not self._held_by(holds, obj.key)]
            held += len(objects) - len(kept)
            objects = kept
        if self.locked:
            free = [obj for obj in objects if not self.object_locked(obj)]
            held += len(objects) - len(free)
            objects = free
        if not objects:
            return BatchResult(ObjectsDescriptor(()), 0, {}, time.perf_counter() - started, bytes=0, held=held)
        result = self.action.apply(self, ObjectBatch(ledger.next_batch_no(), objects, ledger, held))
        # The batch's own work, hold checks included; not its time in the queue.
        return replace(result, seconds=time.perf_counter() - started)

    # -- crash settlement ----------------------------------------------------------

    def reconcile(self, cutoff: datetime, ledger: BatchLedger) -> int:
        """Settle pending batches by asking S3 which of their versions still exist."""
        return settle_pending(self, ledger)


def _batches(objects: Iterable[S3Object], size: int) -> Iterator[list[S3Object]]:
    """Whole objects, at most ``size`` versions a batch (a key with more gets a batch of its own)."""
    batch: list[S3Object] = []
    versions = 0
    for obj in objects:
        if batch and versions + len(obj.versions) > size:
            yield batch
            batch, versions = [], 0
        batch.append(obj)
        versions += len(obj.versions)
    if batch:
        yield batch
