"""Whether retrying can help: transient database errors (lock and statement timeouts,
deadlocks, lost connections) versus everything else."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from sqlalchemy.exc import DBAPIError
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt

from retention.errors import (
    ConfigError,
    PurgeFailed,
    RetentionError,
    TargetError,
    TransientError,
)

log = logging.getLogger(__name__)

_TRANSIENT_PG = {"40001", "40P01", "55P03", "57014", "57P01", "08000", "08003", "08006", "08001", "08004"}


_TRANSIENT_MYSQL = {1205, 1213, 2006, 2013, 3024, 1969, 1927, 1053}


def is_transient(exc: DBAPIError) -> bool:
    """Whether retrying can help: lock and statement timeouts, deadlocks, lost connections."""
    if exc.connection_invalidated:
        return True
    orig = exc.orig
    code = getattr(orig, "pgcode", None)
    if code is not None:
        return code in _TRANSIENT_PG or code.startswith("08")
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int):
        return args[0] in _TRANSIENT_MYSQL
    message = str(orig).lower()
    return "database is locked" in message or "server closed the connection" in message


def describe_error(exc: BaseException) -> str:
    """An error as the certificate may show it: class and SQLSTATE, never row data."""
    if isinstance(exc, (PurgeFailed, TargetError, ConfigError)):
        return f"{type(exc).__name__}: {exc}"[:500]
    code = getattr(getattr(exc, "orig", None), "pgcode", None)
    if code is None:
        args = getattr(getattr(exc, "orig", None), "args", ())
        code = args[0] if args and isinstance(args[0], int) else None
    if code is None and could_not_connect(exc):
        code = "08001"  # libpq gives no SQLSTATE for a connection never made; this is the one for it
    name = type(getattr(exc, "orig", None) or exc).__name__
    response = getattr(exc, "response", None)
    if code is None and isinstance(response, dict) and response.get("Error", {}).get("Code"):
        name, code = "ClientError", response["Error"]["Code"]  # S3's own error code
    return f"{name} (code {code})" if code is not None else name


_MYSQL_CANNOT_CONNECT = {2002, 2003, 2013}  # no socket, no TCP connection, lost during the handshake


def could_not_connect(exc: BaseException) -> bool:
    """True for a database connection that was never made: refused, timed out, server gone.

    A server that answered and refused (a wrong password, no such database) or a host
    name that does not resolve is not this: a person has to fix those.
    """
    if not isinstance(exc, DBAPIError) or exc.statement is not None:
        return False  # a statement ran, so a connection was made
    orig = exc.orig
    if getattr(orig, "pgcode", None):
        return False
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int):
        return args[0] in _MYSQL_CANNOT_CONNECT
    message = str(orig)
    return (type(orig).__name__ == "OperationalError" and "FATAL:" not in message
            and "could not translate host name" not in message)


def is_retryable(exc: BaseException) -> bool:
    """Whether another attempt can help, for plan, purge and certify alike: lock and statement
    timeouts, deadlocks, lost or refused connections, throttled or unreachable S3."""
    if isinstance(exc, RetentionError):
        return isinstance(exc, TransientError)
    if isinstance(exc, DBAPIError):
        return is_transient(exc) or could_not_connect(exc)
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    from retention.aws import TRANSIENT_CODES, s3_error_code

    if isinstance(exc, ClientError):
        return s3_error_code(exc) in TRANSIENT_CODES
    return isinstance(exc, (ConnectionError, HTTPClientError))


# -- the one retry policy -----------------------------------------------------------------
# Every loop that tries again (a batch after a lock timeout, a certificate append that raced
# another writer, S3 keys that were throttled, a schema created by two workers at once) goes
# through :func:`attempts`, so backoff, logging and the give-up point read the same everywhere.

DEFAULT_DELAYS: tuple[float, ...] = (0.5, 1, 2, 4, 8, 15)
"""Seconds between attempts: about half a minute in all before giving up."""


def attempts(
    retry_if: Callable[[BaseException], bool],
    *,
    delays: Sequence[float] = DEFAULT_DELAYS,
    what: str = "",
    sleep: Callable[[float], None] = time.sleep,
) -> Retrying:
    """Iterate ``for attempt in attempts(...): with attempt: ...``; an error for which
    ``retry_if`` is true is retried after the next delay, anything else (or the last
    failure) is raised as it is."""
    waits = list(delays)

    def wait(state: RetryCallState) -> float:
        return waits[min(state.attempt_number, len(waits)) - 1] if waits else 0.0

    def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.warning("%s%s (transient); retrying in %.1fs (attempt %d)", f"{what}: " if what else "",
                    _first_line(error), wait(state), state.attempt_number + 1)

    return Retrying(
        retry=retry_if_exception(retry_if),
        stop=stop_after_attempt(len(waits) + 1),
        wait=wait,
        sleep=sleep,
        before_sleep=before_sleep,
        reraise=True,
    )


def _first_line(error: BaseException | None) -> str:
    if error is None:
        return "failed"
    text = str(getattr(error, "orig", None) or error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:200]
