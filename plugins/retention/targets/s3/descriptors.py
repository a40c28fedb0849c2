"""What the journal keeps per S3 batch: the versions it is about to delete (so a crash can
be settled by asking S3 which still exist) and, for an archiving run, the verified archive
copies the run's manifest lists. Encoded as the same JSON today's open runs were journaled
with, and read back from the older bare-list form too."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from retention.targets.s3.listing import S3Object


class JournaledVersion(NamedTuple):
    """One version of a key as journaled (``version_id`` None on an unversioned bucket)."""

    version_id: str | None
    size: int


@dataclass(frozen=True)
class JournaledObject:
    """A key and every version of it the batch deletes."""

    key: str
    versions: tuple[JournaledVersion, ...]

    @property
    def size(self) -> int:
        """Bytes over all its versions."""
        return sum(version.size for version in self.versions)

    def to_json(self) -> list[Any]:
        """``[key, [[version_id, size], ...]]``, as journaled."""
        return [self.key, [[version.version_id, version.size] for version in self.versions]]

    @classmethod
    def from_json(cls, entry: Sequence[Any]) -> JournaledObject:
        """Inverse of :meth:`to_json`."""
        key, versions = entry
        return cls(key, tuple(JournaledVersion(version_id, size) for version_id, size in versions))


@dataclass(frozen=True)
class ObjectsDescriptor:
    """One S3 batch as the journal keeps it.

    ``archived`` holds the manifest's ``s3_objects`` entries as written (a verified copy,
    or ``key`` None with a note saying why nothing was kept); only the manifest reads them.
    """

    objects: tuple[JournaledObject, ...]
    archived: tuple[dict[str, Any], ...] = ()

    @classmethod
    def of(cls, objects: Iterable[S3Object], archived: Iterable[dict[str, Any]] = ()) -> ObjectsDescriptor:
        """The descriptor of listed objects (every version of each), with their archive copies."""
        journaled = tuple(
            JournaledObject(obj.key, tuple(JournaledVersion(v.version_id, v.size) for v in obj.versions))
            for obj in objects
        )
        return cls(journaled, tuple(archived))

    def encode(self) -> str:
        """The JSON the journal stores (key order and spacing as ever: journaled runs compare by it)."""
        return json.dumps({"objects": [obj.to_json() for obj in self.objects], "archived": list(self.archived)})

    @classmethod
    def decode(cls, text: str) -> ObjectsDescriptor:
        """Inverse of :meth:`encode`; also reads the bare list of objects journaled before archiving."""
        data = json.loads(text)
        if isinstance(data, list):
            return cls(tuple(JournaledObject.from_json(entry) for entry in data))
        return cls(tuple(JournaledObject.from_json(entry) for entry in data["objects"]),
                   tuple(data.get("archived", [])))

    def archived_entries(self) -> list[dict[str, Any]]:
        """The archive copies this batch made (or found when it was settled), for the manifest."""
        return [dict(entry) for entry in self.archived]
