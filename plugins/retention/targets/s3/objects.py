"""S3 targets: list expired objects page by page and remove them for real.

Listing goes through paginators (a page of up to 1000 keys at a time, never a whole
bucket in memory). An object expires by its newest version's LastModified or by the
date in its key; an optional tag filter costs one GetObjectTagging call per candidate.
Expired objects are deleted with DeleteObjects, up to 1000 versions a request, from a
bounded pool of threads. On a versioned bucket every version and delete marker of an
expired key is deleted by version id, so nothing is left behind a new delete marker.
Objects protected by Object Lock (legal hold, or a retention date still ahead) are
skipped and counted as held.

Each batch is journaled *pending* with the versions it is about to delete, and *done*
with what the response says went; a batch left pending by a crash is settled by asking
S3 which of those versions still exist.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from retention import failpoints
from retention.archive.store import ArchiveExists, ArchiveFailed
from retention.aws import NO_BUCKET_CODES, NO_LOCK_CONFIG_CODES, NOT_FOUND_CODES, TRANSIENT_CODES, s3_error_code
from retention.errors import TargetError
from retention.targets.base import BatchLedger, Progress, PurgeOutcome, RecordBudget, RecordLimit, Survey

if TYPE_CHECKING:
    from retention.archive.store import ArchiveStore
    from retention.holds import Hold, HoldView
    from retention.rules.models import S3Target

log = logging.getLogger(__name__)

MAX_KEYS_PER_REQUEST = 1000  # DeleteObjects' limit
KEY_ATTEMPTS = 5

@dataclass(frozen=True)
class Version:
    """One version of a key (``version_id`` None on an unversioned bucket)."""

    version_id: str | None
    size: int
    last_modified: datetime
    delete_marker: bool = False
    etag: str | None = None


@dataclass(frozen=True)
class S3Object:
    """A key and every version of it that the listing returned."""

    key: str
    versions: tuple[Version, ...]

    @property
    def newest(self) -> datetime:
        """When the key last changed (its newest version or delete marker)."""
        return max(v.last_modified for v in self.versions)

    @property
    def size(self) -> int:
        """Bytes over all versions."""
        return sum(v.size for v in self.versions)


@dataclass
class _BatchResult:
    deleted: int = 0
    bytes: int = 0
    held: int = 0
    failed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0  # the batch's own work, not its time in the queue


class S3Objects:
    """A rule's S3 target bound to a client."""

    def __init__(
        self, target: S3Target, client: Any, *, clock: Callable[[], datetime] | None = None,
        archive: ArchiveStore | None = None, category: str = "", run_id: str = "", holds: HoldView | None = None,
    ):
        self.target = target
        self.client = client
        self.holds = holds
        self.archive = archive  # with action: archive, objects are copied there (and checked) first
        self.category = category
        self.run_id = run_id
        # Object Lock dates are S3's rule, judged by S3's clock: only used to predict it.
        self._clock = clock or (lambda: datetime.now(timezone.utc))
        self._versioned: bool | None = None
        self._locked: bool | None = None
        self.undated = 0

    # -- shape ---------------------------------------------------------------------

    def check(self) -> None:
        """Raise TargetError unless the bucket exists and can be reached."""
        try:
            self.client.head_bucket(Bucket=self.target.bucket)
        except ClientError as exc:
            code = s3_error_code(exc)
            if code in NO_BUCKET_CODES:
                raise TargetError(f"bucket {self.target.bucket!r} does not exist", "bucket") from None
            if code in ("403", "AccessDenied"):
                raise TargetError(
                    f"bucket {self.target.bucket!r} refuses access to connection {self.target.connection!r}",
                    "bucket",
                ) from None
            raise

    @property
    def versioned(self) -> bool:
        """True when the bucket keeps (or kept) versions: listing and deletes go by version."""
        if self._versioned is None:
            status = self.client.get_bucket_versioning(Bucket=self.target.bucket).get("Status")
            self._versioned = status in ("Enabled", "Suspended")
        return self._versioned

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

    # -- listing -------------------------------------------------------------------

    def iter_objects(self) -> Iterator[S3Object]:
        """Every object under the prefix, page by page."""
        bucket, prefix = self.target.bucket, self.target.prefix
        if not self.versioned:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    yield S3Object(item["Key"], (Version(None, item["Size"], item["LastModified"],
                                                        etag=item.get("ETag")),))
            return
        key: str | None = None
        versions: list[Version] = []
        for page in self.client.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
            entries = [(v["Key"], Version(v["VersionId"], v.get("Size", 0), v["LastModified"], etag=v.get("ETag")))
                       for v in page.get("Versions", [])]
            entries += [(m["Key"], Version(m["VersionId"], 0, m["LastModified"], delete_marker=True))
                        for m in page.get("DeleteMarkers", [])]
            entries.sort(key=lambda entry: entry[0])  # stable: each key's versions stay together
            for entry_key, version in entries:
                if entry_key != key:
                    if key is not None:
                        yield S3Object(key, tuple(versions))
                    key, versions = entry_key, []
                versions.append(version)
        if key is not None:
            yield S3Object(key, tuple(versions))

    def is_expired(self, obj: S3Object, cutoff: datetime) -> bool:
        """By age only (tags are checked separately, since they cost a request)."""
        if self.target.age_from == "last_modified":
            return obj.newest < cutoff
        period = self.target.key_date_format.period(obj.key)
        if period is None:
            self.undated += 1
            return False
        return period[1] <= cutoff  # the whole period the key names is before the cutoff

    def _has_tags(self, obj: S3Object) -> bool:
        wanted = self.target.tags
        newest = max(obj.versions, key=lambda v: v.last_modified)
        if newest.delete_marker:
            return False  # a deleted key has no tags to match; leave it to lifecycle rules
        kwargs = {"Bucket": self.target.bucket, "Key": obj.key}
        if newest.version_id:
            kwargs["VersionId"] = newest.version_id
        tags = {t["Key"]: t["Value"] for t in self.client.get_object_tagging(**kwargs).get("TagSet", [])}
        return all(tags.get(k) == v for k, v in wanted.items())

    def iter_expired(self, cutoff: datetime, pool: ThreadPoolExecutor, seen: list[int] | None = None) -> Iterator[S3Object]:
        """Expired objects in key order; tag checks run on ``pool``, a page at a time."""
        candidates = self._counting(self.iter_objects(), seen)
        aged = (obj for obj in candidates if self.is_expired(obj, cutoff))
        if not self.target.tags:
            yield from aged
            return
        for chunk in _chunks(aged, MAX_KEYS_PER_REQUEST):
            for obj, keep in zip(chunk, pool.map(self._has_tags, chunk)):
                if keep:
                    yield obj

    @staticmethod
    def _counting(objects: Iterable[S3Object], seen: list[int] | None) -> Iterator[S3Object]:
        for obj in objects:
            if seen is not None:
                seen[0] += 1
            yield obj

    def survey(self, cutoff: datetime) -> Survey:
        """Objects and bytes that would go, of how many objects under the prefix.

        Objects a legal hold covers, or (on a bucket with Object Lock) under retention or
        an S3 legal hold, are counted as held, as the run will count them.
        """
        survey = Survey(bytes=0)
        seen = [0]
        self.undated = 0
        holds = self.holds.current() if self.holds is not None else []
        survey.notes += [f"{'paused by' if h.whole else 'protected by'} {h.describe()}: {h.reason}" for h in holds]
        with ThreadPoolExecutor(self.target.concurrency) as pool:
            for obj, held in self._lock_checked(self.iter_expired(cutoff, pool, seen), holds):
                if held:
                    survey.held += 1
                    continue
                survey.matched += 1
                survey.bytes = (survey.bytes or 0) + obj.size  # started at 0 above
        survey.total = seen[0]
        if self.undated:
            survey.notes.append(
                f"{self.undated:,} object{'' if self.undated == 1 else 's'} without a date matching "
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
            for obj, is_held in self._lock_checked(self.iter_expired(cutoff, pool), holds):
                if is_held:
                    held += 1
                    continue
                expired += 1
                if self.target.age_from == "key_date":
                    age = self.target.key_date_format.period(obj.key)[1]
                else:
                    age = obj.newest
                oldest = age if oldest is None or age < oldest else oldest
        return expired, held, oldest

    def _lock_checked(self, objects: Iterator[S3Object], holds) -> Iterator[tuple[S3Object, bool]]:
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
                check = None if self._held_by(holds, obj.key) else heads.submit(self._is_held, obj)
                in_flight.append((obj, check))
                if len(in_flight) >= window:
                    done, check = in_flight.popleft()
                    yield done, check is None or check.result()
            for done, check in in_flight:
                yield done, check is None or check.result()

    # -- purge ---------------------------------------------------------------------

    def purge(self, cutoff: datetime, ledger: BatchLedger, *, progress: Progress | None = None,
              limit: RecordLimit | None = None) -> PurgeOutcome:
        """Delete every expired object; count held (locked) and failed ones. No batch takes
        the run's total (earlier attempts included) past ``limit``."""
        self.reconcile(cutoff, ledger)
        budget = RecordBudget(limit, ledger.deleted() if limit is not None else 0)
        left = 0  # expired objects not touched because the limit was reached
        total = _BatchResult()
        workers = self.target.concurrency
        _ = self.locked, self.versioned  # look these up once, before the threads do
        with ThreadPoolExecutor(workers, thread_name_prefix="s3-inspect") as inspect_pool, \
                ThreadPoolExecutor(workers, thread_name_prefix="s3-delete") as delete_pool:
            in_flight: deque[Future[_BatchResult]] = deque()

            def collect(future: Future[_BatchResult]) -> None:
                result = future.result()
                total.deleted += result.deleted
                total.bytes += result.bytes
                total.held += result.held
                total.failed += result.failed
                total.errors.update(result.errors)
                if progress is not None and (result.deleted or result.failed):
                    progress(total.deleted, result.deleted, result.seconds)

            try:
                for batch in _batches(self.iter_expired(cutoff, inspect_pool), self.target.max_batch_keys):
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
        failures = tuple(f"{code} x{n}" for code, n in total.errors.most_common())
        honoured = tuple(sorted(self.holds.honoured)) if self.holds else ()
        stopped = None
        if left:
            log.warning("%s: blast-radius limit reached (%s); %d expired objects left", self.target.name,
                        budget.limit.describe if budget.limit is not None else "no limit", left)
            stopped = budget.stopped(left + total.failed)
        return PurgeOutcome(total.deleted, total.failed + left, total.held, total.bytes, failures, honoured,
                            stopped=stopped)

    def _budgeted_batch(self, batch: list[S3Object], ledger: BatchLedger, budget: RecordBudget,
                        granted: int) -> _BatchResult:
        purged = 0
        try:
            result = self._purge_batch(batch, ledger)
            purged = result.deleted
            return result
        finally:
            budget.settle(granted, purged)

    def _held_by(self, holds: list[Hold], key: str) -> bool:
        for hold in holds:
            if hold.prefix is None:
                if not hold.whole:
                    log.warning("%s on an S3 target has no --prefix; it protects the whole target", hold.describe())
                return True
            if key.startswith(hold.prefix):
                return True
        return False

    def _purge_batch(self, batch: list[S3Object], ledger: BatchLedger) -> _BatchResult:
        started = time.perf_counter()
        result = self._purge_objects(batch, ledger)
        result.seconds = time.perf_counter() - started
        return result

    def _purge_objects(self, batch: list[S3Object], ledger: BatchLedger) -> _BatchResult:
        result = _BatchResult()
        if self.holds is not None:
            # Read for every batch: a hold placed after the plan still protects its objects.
            holds = self.holds.current()
            kept = [obj for obj in batch if not self._held_by(holds, obj.key)]
            result.held += len(batch) - len(kept)
            batch = kept
        if self.locked:
            free = []
            for obj in batch:
                if self._is_held(obj):
                    result.held += 1
                else:
                    free.append(obj)
            batch = free
        if not batch:
            return result
        batch_no = ledger.next_batch_no()
        ledger.pending(batch_no, _describe(batch), len(batch))
        archived: dict[str, dict[str, Any]] = {}
        if self.archive is not None:
            archived, failures = self._archive(batch)
            for obj in batch:
                if obj.key in failures:
                    result.failed += 1
                    result.errors[failures[obj.key]] += 1
            batch = [obj for obj in batch if obj.key not in failures]
        failpoints.hit("s3.before_delete")
        try:
            failed_versions = self._delete(batch)
            failpoints.hit("s3.after_delete")
        except BaseException:
            try:
                self._settle(ledger)
            except Exception:  # the original error matters more; the next attempt settles it
                log.warning("%s: could not settle the interrupted batch now", self.target.name, exc_info=True)
            raise
        for obj in batch:
            problems = {failed_versions[(obj.key, v.version_id)] for v in obj.versions
                        if (obj.key, v.version_id) in failed_versions}
            if not problems:
                result.deleted += 1
                result.bytes += obj.size
            elif "AccessDenied" in problems and self.locked and self._is_held(obj):
                result.held += 1  # locked between our check and the delete
            else:
                result.failed += 1
                result.errors.update(problems)
        descriptor = None
        if archived:
            descriptor = _describe(batch, [archived[o.key] for o in batch if o.key in archived])
        ledger.done(batch_no, rows=result.deleted, bytes_=result.bytes, descriptor=descriptor)
        return result

    def _archive(self, batch: list[S3Object]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        """Copy each object's newest version to the archive, server-side, and check the copy.

        Returns the verified copies by source key, and the keys that could not be archived
        (with an error code): those are not deleted.
        """
        archived: dict[str, dict[str, Any]] = {}
        failures: dict[str, str] = {}
        for obj in batch:
            live = [v for v in obj.versions if not v.delete_marker]
            if not live:
                archived[obj.key] = {"source": obj.key, "key": None, "note": "only delete markers: nothing to keep"}
                continue
            version = max(live, key=lambda v: v.last_modified)
            try:
                archived[obj.key] = self._copy_verified(obj.key, version)
            except (ClientError, ArchiveFailed) as exc:
                code = s3_error_code(exc) if isinstance(exc, ClientError) else \
                    "ArchiveKeyTaken" if isinstance(exc, ArchiveExists) else "ArchiveNotVerified"
                log.warning("%s: could not archive %s (%s); it is kept", self.target.name, obj.key, code)
                failures[obj.key] = code
        return archived, failures

    def _copy_verified(self, key: str, version: Version) -> dict[str, Any]:
        assert self.archive is not None  # only archiving purges copy
        spec = self.archive.spec
        dest = self.archive.key_for_object(self.category, self.run_id, self.target.name, self.target.bucket, key)
        source = {"Bucket": self.target.bucket, "Key": key}
        if version.version_id:
            source["VersionId"] = version.version_id
        head = self.archive.copy_in(self.client, source, dest, size=version.size)  # create-only
        checked = "size"
        problem = self.archive.encryption_problem(dest, head)
        if head.get("ContentLength") != version.size:
            problem = f"archive copy of {key} has {head.get('ContentLength')} bytes, not {version.size}"
        # Under SSE-KMS an ETag is not the MD5 of the data: there the size (and S3's checksum) must do.
        plain_etags = head.get("ServerSideEncryption") != "aws:kms" and version.etag and \
            "-" not in version.etag and "-" not in (head.get("ETag") or "-")
        if problem is None and plain_etags:
            if head["ETag"] != version.etag:
                problem = f"archive copy of {key} differs from the source (ETag)"
            checked = "size+md5"
        if problem:
            self.archive.remove([dest])  # our copy, and not a good one: no debris
            raise ArchiveFailed(problem)
        copy = {"bucket": self.target.bucket, "source": key, "version_id": version.version_id, "key": dest,
                "bytes": version.size, "etag": version.etag,
                "sha256": head.get("ChecksumSHA256"), "storage_class": head.get("StorageClass") or "STANDARD",
                "verified": checked}
        if spec.sse:
            copy["sse"] = head.get("ServerSideEncryption")
        return copy

    def _delete(self, batch: list[S3Object]) -> dict[tuple[str, str | None], str]:
        """Delete every version of every object; return the versions that failed, with codes."""
        entries = [(obj.key, v.version_id) for obj in batch for v in obj.versions]
        failed: dict[tuple[str, str | None], str] = {}
        step = self.target.max_batch_keys
        for start in range(0, len(entries), step):
            pending = entries[start : start + step]
            for attempt in range(1, KEY_ATTEMPTS + 1):
                errors = self._delete_request(pending)
                retry = [entry for entry, code in errors.items() if code in TRANSIENT_CODES]
                for entry, code in errors.items():
                    failed[entry] = code
                if not retry or attempt == KEY_ATTEMPTS:
                    break
                for entry in retry:
                    del failed[entry]
                log.info("%s: %d keys failed transiently; retrying (attempt %d)", self.target.name, len(retry), attempt + 1)
                time.sleep(min(0.1 * 2**attempt, 5.0))
                pending = retry
        return failed

    def _delete_request(self, entries: list[tuple[str, str | None]]) -> dict[tuple[str, str | None], str]:
        objects = [{"Key": key, "VersionId": version} if version else {"Key": key} for key, version in entries]
        response = self.client.delete_objects(
            Bucket=self.target.bucket, Delete={"Objects": objects, "Quiet": True}
        )
        return {(e["Key"], e.get("VersionId")): e.get("Code", "Unknown") for e in response.get("Errors", [])}

    def _is_held(self, obj: S3Object) -> bool:
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

    # -- crash settlement ----------------------------------------------------------

    def reconcile(self, cutoff: datetime, ledger: BatchLedger) -> int:
        """Settle pending batches by asking S3 which of their versions still exist."""
        return self._settle(ledger)

    def _settle(self, ledger: BatchLedger) -> int:
        confirmed = 0
        pending_batches = ledger.unresolved()
        if not pending_batches:
            return confirmed
        with ThreadPoolExecutor(self.target.concurrency, thread_name_prefix="s3-settle") as pool:
            for pending in pending_batches:
                described = json.loads(pending.descriptor)
                objects = described["objects"] if isinstance(described, dict) else described
                present = pool.map(
                    lambda entry: any(self._exists(entry[0], version_id) for version_id, _size in entry[1]),
                    objects,
                )
                flags = list(present)
                gone = [entry for entry, still_there in zip(objects, flags) if not still_there]
                gone_bytes = sum(size for _key, versions in gone for _version, size in versions)
                descriptor = None
                if self.archive is not None:
                    descriptor = self._settle_archive(objects, flags)
                ledger.resolve(pending.batch_no, len(gone), bytes_=gone_bytes, descriptor=descriptor)
                confirmed += len(gone)
        return confirmed

    def _settle_archive(self, objects: list, present: list[bool]) -> str:
        """After a crash: copies of objects still in place are debris (removed); copies of
        objects that went are looked up for the manifest."""
        assert self.archive is not None  # only archiving batches journal objects to settle
        spec = self.archive.spec
        archived, debris = [], []
        for (key, versions), still_there in zip(objects, present):
            dest = self.archive.key_for_object(self.category, self.run_id, self.target.name, self.target.bucket, key)
            if still_there:
                debris.append(dest)
                continue
            try:
                head = self.archive.client.head_object(Bucket=spec.bucket, Key=dest, ChecksumMode="ENABLED")
            except ClientError:
                # A batch journaled before the run= key scheme: its copy sits at the old key. Taken
                # only when its size is one the batch journaled (that key may be another run's).
                dest = self.archive.legacy_key_for_object(self.category, self.run_id, self.target.name,
                                                          self.target.bucket, key)
                try:
                    head = self.archive.client.head_object(Bucket=spec.bucket, Key=dest, ChecksumMode="ENABLED")
                except ClientError:
                    head = None
                if head is None or head["ContentLength"] not in {size for _version, size in versions if size}:
                    archived.append({"source": key, "key": None, "note": "gone; no archive copy (only markers?)"})
                    continue
            archived.append({"bucket": self.target.bucket, "source": key, "key": dest, "bytes": head["ContentLength"],
                             "etag": head.get("ETag"), "sha256": head.get("ChecksumSHA256"),
                             "storage_class": head.get("StorageClass") or "STANDARD", "verified": "settled"})
        if debris:
            self.archive.remove(debris)
        gone = [entry for entry, still_there in zip(objects, present) if not still_there]
        return json.dumps({"objects": gone, "archived": archived})

    def _exists(self, key: str, version_id: str | None) -> bool:
        kwargs = {"Bucket": self.target.bucket, "Key": key}
        if version_id:
            kwargs["VersionId"] = version_id
        try:
            self.client.head_object(**kwargs)
        except ClientError as exc:
            code = s3_error_code(exc)
            if code in NOT_FOUND_CODES:
                return False
            if code in ("405", "MethodNotAllowed"):
                return True  # a delete marker that still exists
            raise
        return True


def _describe(batch: list[S3Object], archived: list[dict[str, Any]] | None = None) -> str:
    objects = [[obj.key, [[v.version_id, v.size] for v in obj.versions]] for obj in batch]
    return json.dumps({"objects": objects, "archived": archived or []})


def _batches(objects: Iterable[S3Object], size: int = MAX_KEYS_PER_REQUEST) -> Iterator[list[S3Object]]:
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


def _chunks(items: Iterable[S3Object], size: int) -> Iterator[list[S3Object]]:
    chunk: list[S3Object] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


