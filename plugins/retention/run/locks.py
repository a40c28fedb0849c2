"""One run per category at a time: a lease in the audit database.

A run takes its category's lease when it starts and gives it back when it is
certified. Every task of the same run (plan, the mapped purges, certify, their
retries) shares it; another run of the category (a manual run, the CLI) waits or
stops with a message saying who holds it. A worker that dies keeps the lease only
until its heartbeat is older than the lease's time to live (at once, when it ran on
the same host and its process is gone); the next run then takes over and settles the
dead run before it purges anything.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from datetime import datetime, timedelta, timezone

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from retention.clock import parse_utc, utc_iso
from retention.errors import TransientError
from retention.evidence.audit import run_locks

log = logging.getLogger(__name__)

DEFAULT_TTL = timedelta(minutes=10)


class CategoryBusy(TransientError):
    """Another run of the category holds its lease; try again later."""


class RunLock:
    """The lease of one category, held on behalf of one run."""

    def __init__(self, engine, category: str, run_id: str, *, ttl: timedelta = DEFAULT_TTL, clock=None):
        self.engine = engine
        self.category = category
        self.run_id = run_id
        self.ttl = ttl
        self._clock = clock or (lambda: datetime.now(timezone.utc))
        self.holder = f"{socket.gethostname()}:{os.getpid()}"

    def acquire(self, *, wait: float = 0.0, poll: float = 2.0) -> None:
        """Take the lease (or keep it, for the same run); CategoryBusy after ``wait`` seconds."""
        deadline = time.monotonic() + wait
        while True:
            holder = self._try()
            if holder is None:
                return
            if time.monotonic() >= deadline:
                run_id, who, since, beat = holder
                raise CategoryBusy(
                    f"category {self.category} is being purged by run {run_id} ({who}, since {since}, "
                    f"last heartbeat {beat}); this run did not start. Try again when it has finished"
                )
            time.sleep(poll)

    def _try(self) -> tuple[str, str, str, str] | None:
        now = self._clock()
        with self.engine.begin() as conn:
            row = conn.execute(select(run_locks).where(run_locks.c.category == self.category)).mappings().first()
            if row is None:
                try:
                    conn.execute(insert(run_locks).values(
                        category=self.category, run_id=self.run_id, holder=self.holder,
                        acquired_at=utc_iso(now), heartbeat_at=utc_iso(now)))
                except IntegrityError:
                    return ("?", "another worker", "just now", "just now")
                return None
            stale = now - parse_utc(row["heartbeat_at"]) > self.ttl or _dead_here(row["holder"])
            if row["run_id"] == self.run_id or stale:
                if stale and row["run_id"] != self.run_id:
                    log.warning("taking over the lease of %s from run %s (no heartbeat since %s)",
                                self.category, row["run_id"], row["heartbeat_at"])
                taken = conn.execute(
                    update(run_locks)
                    .where(run_locks.c.category == self.category, run_locks.c.heartbeat_at == row["heartbeat_at"])
                    .values(run_id=self.run_id, holder=self.holder, heartbeat_at=utc_iso(now),
                            **({} if row["run_id"] == self.run_id else {"acquired_at": utc_iso(now)}))
                ).rowcount
                return None if taken else (row["run_id"], row["holder"], row["acquired_at"], row["heartbeat_at"])
            return (row["run_id"], row["holder"], row["acquired_at"], row["heartbeat_at"])

    def beat(self) -> None:
        """Refresh the heartbeat; CategoryBusy if another run took the lease meanwhile."""
        with self.engine.begin() as conn:
            kept = conn.execute(
                update(run_locks)
                .where(run_locks.c.category == self.category, run_locks.c.run_id == self.run_id)
                .values(heartbeat_at=utc_iso(self._clock()), holder=self.holder)
            ).rowcount
        if not kept:
            raise CategoryBusy(f"run {self.run_id} lost the lease of {self.category} to another run; stopping")

    def release(self) -> None:
        """Give the lease back (only if this run holds it)."""
        with self.engine.begin() as conn:
            conn.execute(delete(run_locks).where(run_locks.c.category == self.category,
                                                 run_locks.c.run_id == self.run_id))

    def heartbeat(self, every: float = 30.0) -> _Heartbeat:
        """A context manager beating in a background thread while work runs."""
        return _Heartbeat(self, every)


def _dead_here(holder: str) -> bool:
    """True when ``holder`` is a process of this host that no longer exists."""
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by another user
        return False
    return False


class _Heartbeat:
    def __init__(self, lock: RunLock, every: float):
        self.lock = lock
        self.every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{lock.category}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.lock.beat()
            except Exception:
                log.exception("could not refresh the lease of %s", self.lock.category)

    def __enter__(self) -> _Heartbeat:
        self.lock.beat()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
