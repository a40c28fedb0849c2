"""One verification, whoever asks (``retention verify``, the compliance page): signatures, seq
order and hash links; the signed checkpoints kept outside the database; optionally every archive
run's manifest and objects. Callers only render what it found."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from retention.errors import TerminalError

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from retention.evidence.checkpoints import Checkpoint
    from retention.evidence.signing import PublicKeys
    from retention.evidence.stores import CheckpointStore
    from retention.evidence.verify import Verification


@dataclass(frozen=True)
class ArchiveFigures:
    """What checking the archive runs found: runs, objects and bytes checked, and the first problem."""

    runs: int = 0
    objects: int = 0
    bytes: int = 0
    problem: str | None = None
    bad_seq: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape ``verify --json`` prints."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class FullVerification:
    """The chain's verification, the checkpoints it was held against, and the archives (if asked)."""

    result: Verification
    checkpoints: dict[int, Checkpoint]
    archives: ArchiveFigures | None

    @property
    def newest(self) -> int | None:
        """The seq of the newest checkpoint, if any."""
        return max(self.checkpoints) if self.checkpoints else None

    @property
    def unanchored(self) -> int | None:
        """Certificates past the newest checkpoint: a tail cut there would go unseen."""
        newest = self.newest
        if newest is None or not self.result.ok:
            return None
        return max((self.result.head_seq or 0) - newest, 0)


def verify_everything(engine: Engine, keys: PublicKeys, stores: Iterable[CheckpointStore], origin: str, *,
                      archive_client: Any | None = None) -> FullVerification:
    """Verify the chain against ``keys`` and the checkpoints in ``stores``; with ``archive_client``
    (an S3 client), also every archive run, once the chain itself verifies."""
    from retention.evidence.chain import count_certificates
    from retention.evidence.checkpoints import CheckpointError, NoCheckpoints, read_all
    from retention.evidence.verify import Verification, verify_chain

    checkpoints: dict[int, Checkpoint] = {}
    try:
        checkpoints = read_all(list(stores), keys, origin)
    except NoCheckpoints as exc:
        # Before the first certificate there is nothing to checkpoint; after it, an empty store is a loss.
        result = Verification(0, None, None, reason=None if count_certificates(engine) == 0 else str(exc))
    except CheckpointError as exc:
        result = Verification(0, None, None, reason=str(exc))
    else:
        result = verify_chain(engine, keys, checkpoints)
    archives = None
    if archive_client is not None and result.ok:
        archives = check_archive_runs(engine, archive_client)
        if archives.problem:
            result = dataclasses.replace(result, bad_seq=archives.bad_seq, reason=archives.problem)
    return FullVerification(result, checkpoints, archives)


def check_archive_runs(engine: Engine, client: Any) -> ArchiveFigures:
    """Each archive run's manifest against its certificate, and its objects against the manifest."""
    from botocore.exceptions import ClientError

    from retention.archive.check import check_archive
    from retention.archive.manifest import read_manifest
    from retention.aws import s3_error_code
    from retention.evidence.chain import read_certificates

    runs = objects = total = 0

    def figures(problem: str | None = None, bad_seq: int | None = None) -> ArchiveFigures:
        return ArchiveFigures(runs, objects, total, problem, bad_seq)

    for certificate in read_certificates(engine):
        recorded = certificate.data.get("archive")
        if not recorded:
            continue
        try:
            manifest = read_manifest(recorded["manifest"], lambda: client, sha256=recorded["sha256"])
        except TerminalError as exc:
            return figures(f"archive: {exc}", certificate.seq)
        except ClientError as exc:
            return figures(f"archive: manifest {recorded['manifest']} cannot be read ({s3_error_code(exc)})",
                           certificate.seq)
        checked = check_archive(manifest, client)
        runs += 1
        objects += checked.objects
        total += checked.bytes
        if checked.problems:
            more = f" (and {len(checked.problems) - 1} more)" if len(checked.problems) > 1 else ""
            return figures(f"archive: {checked.problems[0]}{more}", certificate.seq)
    return figures()
