"""Replica lag: how far the target database's replicas are behind (:func:`read_lag`), and the
throttle that pauses a purge's batches while they are too far behind (:class:`LagThrottle`),
as pt-archiver's ``--check-slave-lag`` does.

Where the lag is read:

- PostgreSQL: ``pg_stat_replication`` on the target's own connection (the primary): the
  largest ``replay_lag`` of its replicas, in seconds. PostgreSQL sets ``replay_lag`` to NULL
  once a replica has replayed everything and gone idle, so NULL reads as 0. The connection's
  user must see the view's columns (a superuser, or a member of ``pg_monitor``); when it
  cannot, the purge stops with that advice rather than purge blind.
- MariaDB/MySQL: ``SHOW REPLICA STATUS`` (``SHOW SLAVE STATUS`` on older servers) on each
  replica named by Airflow connection id in the target connection's extra,
  ``{"replica_conn_ids": ["shop_replica_1"]}``: ``Seconds_Behind_Master``. NULL (replication
  stopped or broken) and a replica that cannot be reached count as over the limit: a purge
  never runs on while it cannot tell how far behind a replica is.
- SQLite has no replicas: nothing is read.

The limit is the rule target's ``max_replica_lag``, else the connection extra's
``max_replica_lag``, else 10 s (the rule, reviewed with the data it purges, beats the
connection). A purge pauses at most ``lag_wait_budget`` seconds in all (default 600), then
ends partial saying so. Each pause is journaled (:meth:`BatchLedger.note`), so the
certificate shows the pauses even after a crash and a rerun.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from retention.connections import ConnectionSpec, create_sql_engine
from retention.errors import ConfigError, TargetError

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from retention.connections import ConnectionResolver
    from retention.rules.models import SqlTarget
    from retention.targets.base import BatchLedger

log = logging.getLogger(__name__)

DEFAULT_MAX_LAG = 10.0
DEFAULT_WAIT_BUDGET = 600.0
PAUSE_NOTE = "lag_pause"
"""The journal's name for a pause (a note row of the target's batches)."""


@dataclass(frozen=True)
class Lag:
    """The worst lag among the replicas read: seconds (None: unknown, which counts as over)
    and which replica it is (a name, never credentials)."""

    seconds: float | None
    replica: str


class Replicas:
    """Where one target's replica lag is read: its primary (PostgreSQL) or its replicas' own
    connections (MariaDB/MySQL)."""

    def __init__(self, primary: Engine, replicas: Sequence[ConnectionSpec] = ()):
        self.primary = primary
        self.specs = tuple(replicas)
        self._engines: dict[str, Engine] = {}

    @property
    def any(self) -> bool:
        """Whether there is anything to read (SQLite, and MariaDB without replicas: nothing)."""
        dialect = self.primary.dialect.name
        return dialect == "postgresql" or (dialect == "mysql" and bool(self.specs))

    def read(self) -> Lag:
        """The worst lag now (0 on no replica, named "", when there is none)."""
        if self.primary.dialect.name == "postgresql":
            return _pg_lag(self.primary)
        worst = Lag(0.0, "")
        for spec in self.specs:
            lag = self._mysql_lag(spec)
            if lag.seconds is None:
                return lag
            if not worst.replica or (worst.seconds is not None and lag.seconds > worst.seconds):
                worst = lag
        return worst

    def _mysql_lag(self, spec: ConnectionSpec) -> Lag:
        if spec.conn_id not in self._engines:
            self._engines[spec.conn_id] = create_sql_engine(spec)
        try:
            with self._engines[spec.conn_id].connect() as conn:
                try:
                    row = conn.exec_driver_sql("SHOW REPLICA STATUS").mappings().first()
                except DBAPIError:  # MySQL before 8.0.22, MariaDB before 10.5
                    conn.rollback()
                    row = conn.exec_driver_sql("SHOW SLAVE STATUS").mappings().first()
        except DBAPIError as exc:
            code = (getattr(exc.orig, "args", None) or (None,))[0]
            if code in _MYSQL_REFUSED:
                raise TargetError(
                    f"connection {spec.conn_id} (in replica_conn_ids) refuses its login or SHOW REPLICA STATUS "
                    f"(code {code}): check the connection's login, and GRANT REPLICATION CLIENT (MySQL) or "
                    "SLAVE MONITOR (MariaDB) to it", "connection") from None
            log.warning("replica %s: cannot read its lag (%s); counting it as over the limit",
                        spec.conn_id, str(exc.orig).strip().splitlines()[0][:200])
            return Lag(None, spec.conn_id)
        if row is None:
            raise TargetError(f"connection {spec.conn_id} (in replica_conn_ids) is not a replica: "
                              "SHOW REPLICA STATUS is empty there", "connection")
        seconds = row.get("Seconds_Behind_Master", row.get("Seconds_Behind_Source"))
        return Lag(None if seconds is None else float(seconds), spec.conn_id)

    def close(self) -> None:
        for engine in self._engines.values():
            engine.dispose()
        self._engines.clear()


_MYSQL_REFUSED = {1044, 1045, 1142, 1227}
"""Access denied (to a database, at login, to a command, for want of a privilege): no wait helps."""


def _pg_lag(engine: Engine) -> Lag:
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT application_name, state, EXTRACT(EPOCH FROM replay_lag) FROM pg_stat_replication")).all()
    worst = Lag(0.0, "")
    for name, state, seconds in rows:
        if state is None:  # the columns are hidden from this user
            raise TargetError(
                f"{engine.url.username or 'the connection user'} cannot read the replicas' lag in "
                "pg_stat_replication: GRANT pg_monitor TO it (batches pause on replica lag)", "connection")
        lag = float(seconds or 0.0)
        if not worst.replica or (worst.seconds is not None and lag > worst.seconds):
            worst = Lag(lag, str(name))
    return worst


class LagThrottle:
    """Pauses a purge's batches while replica lag is over the limit, within a wait budget.

    Every walker of a purge calls :meth:`wait` before its batch; one of them reads (at most
    once per ``interval`` while lag is under the limit) and pauses, the others wait behind it,
    so one spell of lag is one pause.
    """

    def __init__(self, replicas: Replicas, limit: float, budget: float, *, name: str, interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.replicas = replicas
        self.limit = limit
        self.budget = budget
        self.name = name
        self.interval = interval
        self.gave_up = False
        self.paused = 0.0
        self._clock = clock
        self._sleep = sleep
        self._read_at: float | None = None
        self._lock = threading.Lock()

    def wait(self, ledger: BatchLedger) -> bool:
        """Return once the next batch may go (True), or False when lag stayed over the limit
        past the wait budget (the purge then stops, partial)."""
        if not self.replicas.any:
            return True
        with self._lock:
            if self.gave_up:
                return False
            now = self._clock()
            if self._read_at is not None and now - self._read_at < self.interval:
                return True
            lag = self.replicas.read()
            self._read_at = self._clock()
            if not self._over(lag):
                return True
            return self._pause(lag, ledger)

    def _over(self, lag: Lag) -> bool:
        return lag.seconds is None or lag.seconds > self.limit

    def _pause(self, lag: Lag, ledger: BatchLedger) -> bool:
        started = self._clock()
        worst = lag
        log.warning("%s: replica %s is %s behind (limit %gs); pausing batches", self.name, lag.replica or "?",
                    _shown(lag), self.limit)
        step = 0.25
        while self._over(lag):
            left = self.budget - self.paused - (self._clock() - started)
            if left <= 0:
                self.gave_up = True
                break
            self._sleep(min(step, left))
            step = min(step * 2, 4.0)
            lag = self.replicas.read()
            if lag.seconds is None or (worst.seconds is not None and lag.seconds > worst.seconds):
                worst = lag
        seconds = self._clock() - started
        self.paused += seconds
        self._read_at = self._clock()
        ledger.note(PAUSE_NOTE, {"seconds": round(seconds, 3), "lag": worst.seconds, "replica": worst.replica,
                                 "limit": self.limit, "gave_up": self.gave_up})
        if self.gave_up:
            log.warning("%s: replica lag still over %gs after the lag-wait budget of %gs; stopping",
                        self.name, self.limit, self.budget)
            return False
        log.info("%s: replica lag back under %gs after %.1fs; resuming", self.name, self.limit, seconds)
        return True

    def describe_now(self) -> str | None:
        """What a plan tells its reviewer: the replicas' lag now against the limit, or why it
        cannot be read (None: there is nothing to read)."""
        if not self.replicas.any:
            return None
        budget = f"(for at most {self.budget:g}s in all, then the run ends partial)"
        try:
            lag = self.replicas.read()
        except TargetError as exc:
            return f"replica lag cannot be read: {exc}; the run would stop before its first batch"
        if not lag.replica:
            return None  # a PostgreSQL primary with no replica connected now
        where = f" on {lag.replica}"
        if lag.seconds is None:
            return (f"replica lag now unknown{where} (replication stopped, or the replica cannot be reached): "
                    f"batches would pause until it is back under {self.limit:g}s {budget}")
        return (f"replica lag now {lag.seconds:.1f}s{where}: batches pause while it is over {self.limit:g}s "
                f"{budget}")

    @property
    def reason(self) -> str:
        """Why the purge stopped, once it gave up."""
        return (f"replica lag over the limit of {self.limit:g}s beyond the lag-wait budget of {self.budget:g}s; "
                "the next run takes them")


def _shown(lag: Lag) -> str:
    return "an unknown time (replication stopped, or the replica cannot be reached)" if lag.seconds is None \
        else f"{lag.seconds:.1f}s"


def lag_pauses(notes: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The certificate's ``lag_pauses`` from a target's journaled pauses (None: there were none)."""
    if not notes:
        return None
    return {"count": len(notes), "seconds": round(sum(float(n.get("seconds") or 0) for n in notes), 1)}


def throttle_for(target: SqlTarget, spec: ConnectionSpec, engine: Engine,
                 resolve: ConnectionResolver) -> LagThrottle:
    """The throttle of ``target`` on the connection ``spec`` (checked here: ConfigError names the
    connection and the extra's field, never a password)."""
    extra = spec.extra or {}
    conn_limit = extra.get("max_replica_lag")
    if conn_limit is not None and (isinstance(conn_limit, bool) or not isinstance(conn_limit, (int, float))
                                   or not 0 < conn_limit <= 86_400):
        raise ConfigError(f"connection {spec.conn_id}: extra max_replica_lag must be a number of seconds "
                          "above 0 (at most 86400)")
    ids = extra.get("replica_conn_ids")
    replicas: list[ConnectionSpec] = []
    if ids is not None:
        if not isinstance(ids, list) or not all(isinstance(i, str) and i.strip() for i in ids):
            raise ConfigError(f"connection {spec.conn_id}: extra replica_conn_ids must be a list of Airflow "
                              'connection ids, e.g. ["shop_replica_1"]')
        if spec.conn_type not in ("mysql", "mariadb"):
            raise ConfigError(f"connection {spec.conn_id}: extra replica_conn_ids is read for MariaDB/MySQL only "
                              "(PostgreSQL replicas are read from pg_stat_replication on the primary); remove it")
        for conn_id in ids:
            replica = resolve(conn_id)
            if replica.conn_type not in ("mysql", "mariadb"):
                raise ConfigError(f"connection {spec.conn_id}: extra replica_conn_ids names {conn_id}, a "
                                  f"{replica.conn_type or 'typeless'} connection; replicas must be mysql or mariadb")
            replicas.append(replica)
    limit = target.max_replica_lag or (float(conn_limit) if conn_limit is not None else DEFAULT_MAX_LAG)
    return LagThrottle(Replicas(engine, replicas), limit, target.lag_wait_budget or DEFAULT_WAIT_BUDGET,
                       name=target.name)
