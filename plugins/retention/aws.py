"""S3 clients from Airflow AWS connections, and the one vocabulary of S3 error codes."""

from __future__ import annotations

from retention.connections import ConnectionSpec, from_environment
from retention.errors import ConfigError

# -- the one vocabulary of S3 error codes ------------------------------------------------
# S3, MinIO and moto spell the same condition differently (a HEAD has no body, so its
# "code" is the HTTP status); every module decides by these sets, through s3_error_code.

TRANSIENT_CODES = frozenset({"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "503", "500"})
"""Another attempt may succeed (throttling, a server error)."""
NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NoSuchVersion", "NotFound"})
"""The object (or that version of it) is not there."""
NO_BUCKET_CODES = frozenset({"404", "NoSuchBucket"})
"""The bucket does not exist."""
DENIED_CODES = frozenset({"403", "AccessDenied"})
"""The connection may not do this."""
TAKEN_CODES = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict"})
"""A create-only write (If-None-Match: *) found the key taken, or raced another writer for it."""
NO_LOCK_CONFIG_CODES = frozenset({"ObjectLockConfigurationNotFoundError", "NoSuchObjectLockConfiguration", "404"})
"""The bucket has no Object Lock configuration."""
DELETE_MARKER_CODES = frozenset({"405", "MethodNotAllowed"})
"""A HEAD of a version that is a delete marker: it exists, but has no object to return."""


def is_not_found(exc: BaseException) -> bool:
    """True for a botocore ClientError saying the object or version does not exist."""
    return hasattr(exc, "response") and s3_error_code(exc) in NOT_FOUND_CODES


def create_s3_client(spec: ConnectionSpec, *, max_pool_connections: int = 10):
    """A boto3 S3 client from an Airflow ``aws`` connection.

    Credentials come from login/password (or ``aws_access_key_id`` / ``aws_secret_access_key``
    in the extra), else from the worker's default chain (instance role, env, profile).
    ``endpoint_url`` and ``region_name`` are read from the extra, as Airflow's AWS hook does.
    Whole requests that fail with 500/503 (SlowDown) are retried by botocore's standard mode.
    """
    import boto3
    import botocore.session
    from botocore.config import Config

    if spec.conn_type not in ("aws", "s3"):
        raise ConfigError(f"connection {spec.conn_id}: type {spec.conn_type!r} is not an AWS connection")
    extra = dict(spec.extra)
    if extra.get("role_arn"):
        raise ConfigError(
            f"connection {spec.conn_id}: role_arn is not supported; give the worker the role instead"
        )
    service = (extra.get("service_config") or {}).get("s3") or {}
    core = botocore.session.Session()
    # Listing parses 1000 LastModified values a page; botocore's default (dateutil) is
    # about four times slower than fromisoformat and sits on the listing's serial path.
    core.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=_parse_timestamp)
    session = boto3.session.Session(
        botocore_session=core,
        aws_access_key_id=spec.login or extra.get("aws_access_key_id"),
        aws_secret_access_key=spec.password or extra.get("aws_secret_access_key"),
        aws_session_token=extra.get("aws_session_token"),
        region_name=extra.get("region_name") or "us-east-1",
        profile_name=extra.get("profile_name"),
    )
    return session.client(
        "s3",
        endpoint_url=service.get("endpoint_url") or extra.get("endpoint_url") or None,
        config=Config(
            max_pool_connections=max_pool_connections,
            retries={"mode": "standard", "max_attempts": 5},
            connect_timeout=10,
            read_timeout=60,
        ),
    )


def s3_error_code(exc) -> str:
    """The S3 error code of a botocore ``ClientError`` (``NoSuchKey``, ``404``, ``SlowDown``…)."""
    return str(exc.response.get("Error", {}).get("Code", ""))


def s3_client_from_environment(conn_id: str):
    """A boto3 S3 client for the AWS connection ``conn_id``, resolved from the environment."""
    return create_s3_client(from_environment(conn_id))


def _parse_timestamp(value):
    """S3 timestamps (ISO 8601, ``Z``) at fromisoformat speed; anything else as botocore would."""
    from datetime import datetime

    from botocore.utils import parse_timestamp

    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            parsed = None
        if parsed is not None and parsed.tzinfo is not None:
            return parsed
    return parse_timestamp(value)
