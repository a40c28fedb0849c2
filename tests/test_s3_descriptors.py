"""What the journal keeps per S3 batch reads and writes the bytes open runs were journaled with."""

from __future__ import annotations

from datetime import datetime, timezone

from retention.targets.s3.descriptors import JournaledObject, JournaledVersion, ObjectsDescriptor
from retention.targets.s3.listing import S3Object, Version

WHEN = datetime(2020, 1, 1, tzinfo=timezone.utc)

# Written by the code before ObjectsDescriptor existed (objects.py's _describe and _settle_archive).
PENDING = '{"objects": [["r/a", [["v1", 7], ["v2", 0]]], ["r/b", [[null, 3]]]], "archived": []}'
DONE = (
    '{"objects": [["r/a", [["v1", 7], ["v2", 0]]], ["r/b", [[null, 3]]]], "archived": [{"bucket": "src", '
    '"source": "r/a", "version_id": "v1", "key": "arch/r/a", "bytes": 7, "etag": "\\"e\\"", "sha256": null, '
    '"storage_class": "STANDARD", "verified": "size+md5", "sse": "AES256"}, {"source": "r/b", "key": null, '
    '"note": "only delete markers: nothing to keep"}]}'
)
SETTLED = (
    '{"objects": [["r/a", [["v1", 7]]]], "archived": [{"bucket": "src", "source": "r/a", "key": "arch/r/a", '
    '"bytes": 7, "etag": "\\"e\\"", "sha256": "c2hh", "storage_class": "GLACIER", "verified": "settled"}]}'
)
# Journaled before archiving existed: a bare list of objects.
LEGACY = '[["r/a", [["v1", 7], ["v2", 0]]], ["r/b", [[null, 3]]]]'

OBJECTS = (
    JournaledObject("r/a", (JournaledVersion("v1", 7), JournaledVersion("v2", 0))),
    JournaledObject("r/b", (JournaledVersion(None, 3),)),
)


def test_a_batch_about_to_be_deleted_is_journaled_as_before():
    listed = [S3Object("r/a", (Version("v1", 7, WHEN), Version("v2", 0, WHEN, delete_marker=True))),
              S3Object("r/b", (Version(None, 3, WHEN),))]

    descriptor = ObjectsDescriptor.of(listed)

    assert descriptor == ObjectsDescriptor(OBJECTS)
    assert descriptor.encode() == PENDING
    assert [obj.size for obj in descriptor.objects] == [7, 3]


def test_journaled_descriptors_read_back_to_the_same_bytes():
    for text in (PENDING, DONE, SETTLED):
        assert ObjectsDescriptor.decode(text).encode() == text


def test_archived_entries_are_the_manifest_entries_as_written():
    done = ObjectsDescriptor.decode(DONE)

    assert done.objects == OBJECTS
    assert [entry["key"] for entry in done.archived_entries()] == ["arch/r/a", None]
    assert done.archived_entries()[0]["sse"] == "AES256"
    assert ObjectsDescriptor.decode(PENDING).archived_entries() == []
    assert ObjectsDescriptor.decode(SETTLED).archived_entries()[0]["verified"] == "settled"


def test_the_legacy_list_form_reads_as_objects_without_archive_copies():
    legacy = ObjectsDescriptor.decode(LEGACY)

    assert legacy == ObjectsDescriptor(OBJECTS)
    assert legacy.archived_entries() == []
    assert legacy.encode() == PENDING
