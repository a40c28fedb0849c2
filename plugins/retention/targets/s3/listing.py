"""Listing an S3 target: its objects page by page, and which of them have expired.

Listing goes through paginators (a page of up to 1000 keys at a time, never a whole
bucket in memory). On a versioned bucket each key comes with every version and delete
marker the listing returned. An object expires by its newest version's LastModified or
by the date in its key; an optional tag filter costs one GetObjectTagging call per
candidate.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    from retention.rules.models import S3Target

MAX_KEYS_PER_REQUEST = 1000  # S3's most keys a request: a listing page, a DeleteObjects


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


class ObjectListing:
    """The objects under a target's prefix, and which of them have expired."""

    def __init__(self, target: S3Target, client: Any):
        self.target = target
        self.client = client
        self.undated = 0
        """Objects seen without a date in the key (``age_from: key_date``): they are kept."""
        self._versioned: bool | None = None

    @property
    def versioned(self) -> bool:
        """True when the bucket keeps (or kept) versions: listing and deletes go by version."""
        if self._versioned is None:
            status = self.client.get_bucket_versioning(Bucket=self.target.bucket).get("Status")
            self._versioned = status in ("Enabled", "Suspended")
        return self._versioned

    def objects(self) -> Iterator[S3Object]:
        """Every object under the prefix, page by page, in key order."""
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

    def aged_from(self, obj: S3Object) -> datetime | None:
        """When the object's age runs from: its newest version, or the end of the period its
        key's date names (None: the key has no date)."""
        if self.target.age_from == "last_modified":
            return obj.newest
        pattern = self.target.key_date_format
        assert pattern is not None  # age_from: key_date requires one (checked when the rule loads)
        period = pattern.period(obj.key)
        return None if period is None else period[1]

    def is_expired(self, obj: S3Object, cutoff: datetime) -> bool:
        """By age only (tags are checked separately, since they cost a request)."""
        aged = self.aged_from(obj)
        if aged is None:
            self.undated += 1
            return False
        if self.target.age_from == "last_modified":
            return aged < cutoff
        return aged <= cutoff  # the whole period the key names is before the cutoff

    def has_tags(self, obj: S3Object) -> bool:
        """Whether the object's newest version carries every tag the target asks for."""
        wanted = self.target.tags
        newest = max(obj.versions, key=lambda v: v.last_modified)
        if newest.delete_marker:
            return False  # a deleted key has no tags to match; leave it to lifecycle rules
        kwargs = {"Bucket": self.target.bucket, "Key": obj.key}
        if newest.version_id:
            kwargs["VersionId"] = newest.version_id
        tags = {t["Key"]: t["Value"] for t in self.client.get_object_tagging(**kwargs).get("TagSet", [])}
        return all(tags.get(k) == v for k, v in wanted.items())

    def expired(self, cutoff: datetime, pool: ThreadPoolExecutor, seen: list[int] | None = None) -> Iterator[S3Object]:
        """Expired objects in key order; tag checks run on ``pool``, a page at a time.
        ``seen[0]`` counts every object listed."""
        candidates = _counting(self.objects(), seen)
        aged = (obj for obj in candidates if self.is_expired(obj, cutoff))
        if not self.target.tags:
            yield from aged
            return
        for chunk in _chunks(aged, MAX_KEYS_PER_REQUEST):
            for obj, keep in zip(chunk, pool.map(self.has_tags, chunk)):
                if keep:
                    yield obj


def _counting(objects: Iterable[S3Object], seen: list[int] | None) -> Iterator[S3Object]:
    for obj in objects:
        if seen is not None:
            seen[0] += 1
        yield obj


def _chunks(items: Iterable[S3Object], size: int) -> Iterator[list[S3Object]]:
    chunk: list[S3Object] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
