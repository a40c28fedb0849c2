"""Opening a file an operator names (a key, a receipt, a rule file, a manifest) without hanging.

``open()`` on a FIFO blocks until a writer comes, forever if none does; a device such as
/dev/zero reads without end. :func:`open_regular` opens without blocking and refuses anything
that is not a regular file, before a byte is read.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

NOT_REGULAR = "not a regular file (a FIFO, device or socket)"
"""The ``strerror`` of :class:`NotARegularFile`: what callers that show ``exc.strerror`` print."""


class NotARegularFile(OSError):
    """The path names a FIFO, a device or a socket: there is no file content to read."""


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """``path`` opened for binary reading; IsADirectoryError for a directory, NotARegularFile for a
    FIFO, device or socket (it never blocks on one), any other OSError as ``open`` raises it."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(mode):
            raise NotARegularFile(errno.EINVAL, NOT_REGULAR, str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike[str], limit: int) -> bytes:
    """At most ``limit + 1`` bytes of the regular file ``path`` (more than ``limit``: the caller
    refuses it as too large); the errors of :func:`open_regular`."""
    with open_regular(Path(path)) as stream:
        return stream.read(limit + 1)
