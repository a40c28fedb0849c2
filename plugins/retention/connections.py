"""Connections by Airflow connection id, and the SQLAlchemy engines built from them.

Rules name a connection id, never credentials. Inside Airflow the orchestration layer
resolves ids through Airflow (secrets backends included); outside it, the same
``AIRFLOW_CONN_<ID>`` environment variables are read here, in either of Airflow's two
formats (URI or JSON), parsed the way Airflow parses them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

from retention.errors import ConfigError

if TYPE_CHECKING:
    from sqlalchemy.engine import URL, Engine


@dataclass(frozen=True)
class ConnectionSpec:
    """The fields of an Airflow connection that the engine uses."""

    conn_id: str
    conn_type: str
    host: str | None = None
    schema: str | None = None
    login: str | None = None
    password: str | None = field(default=None, repr=False)
    port: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_uri(cls, conn_id: str, uri: str) -> ConnectionSpec:
        """Parse an Airflow connection URI (mirrors ``airflow.sdk.Connection.from_uri``)."""
        # Messages below never quote the URI or a part of it: any part may be a piece of the
        # password (an unencoded '#', '/' or '?' in it moves the rest into the port or path).
        if uri.count("://") > 2 or "://" not in uri:
            raise ConfigError(f"connection {conn_id}: not a connection URI")
        if "#" in uri:
            raise ConfigError(f"connection {conn_id}: the URI holds a '#', which would cut it short; "
                              f"percent-encode it (%23), and any '/', '?' or '@' in the password too")
        try:
            host_with_protocol = uri.count("://") == 2
            conn_type = urlsplit(uri).scheme
            rest = uri.replace(f"{conn_type}://", "" if host_with_protocol else "//")
            parts = urlsplit(rest)
            host = _hostname(parts)
            port = parts.port
            login = unquote(parts.username) if parts.username else None
            password = unquote(parts.password) if parts.password else None
        except ValueError:
            raise ConfigError(
                f"connection {conn_id}: the URI does not parse (its port is not a number from 1 to 65535, or a bracket "
                "is unbalanced); percent-encode any '/', '?', '#', '@', '[' or ']' in the password "
                "(e.g. %2F, %3F, %23)"
            ) from None
        if host and host_with_protocol:
            host = f"{parts.scheme}://{host}"
        extra: dict[str, Any] = {}
        if parts.query:
            query = dict(parse_qsl(parts.query, keep_blank_values=True))
            extra = _extra(conn_id, query["__extra__"]) if "__extra__" in query else query
        _remember_secret(password)
        return cls(
            conn_id=conn_id,
            conn_type=_normal_type(conn_type),
            host=host or None,
            schema=unquote(parts.path[1:]) or None,
            login=login,
            password=password,
            port=port,
            extra=extra,
        )

    @classmethod
    def from_json(cls, conn_id: str, text: str) -> ConnectionSpec:
        """Parse Airflow's JSON connection format."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"connection {conn_id}: not valid JSON ({exc.msg})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"connection {conn_id}: the JSON form must be an object with conn_type, host, ...")
        _remember_secret(data.get("password"))
        for name in ("conn_type", "host", "schema", "login", "password"):
            if data.get(name) is not None and not isinstance(data[name], str):
                raise ConfigError(f"connection {conn_id}: {name} must be a string")
        extra = data.get("extra") or {}
        if isinstance(extra, str):
            extra = _extra(conn_id, extra)
        if not isinstance(extra, dict):
            raise ConfigError(f"connection {conn_id}: extra must be a JSON object")
        port = data.get("port")
        if port:
            try:
                port = int(port)
            except (TypeError, ValueError):
                # Not quoted: the field may hold a misplaced secret.
                raise ConfigError(f"connection {conn_id}: port must be a number") from None
        return cls(
            conn_id=conn_id,
            conn_type=_normal_type(data.get("conn_type") or ""),
            host=data.get("host"),
            schema=data.get("schema"),
            login=data.get("login"),
            password=data.get("password"),
            port=port or None,
            extra=extra,
        )


_SECRETS: set[str] = set()  # every password parsed in this process, to scrub from messages
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/?#@\s]*):[^@\s]*@")


def _remember_secret(password: object) -> None:
    if isinstance(password, str) and len(password) >= 3:
        _SECRETS.add(password)


def _extra(conn_id: str, text: str) -> dict[str, Any]:
    try:
        extra = json.loads(text)
    except ValueError:
        raise ConfigError(f"connection {conn_id}: extra is not valid JSON") from None
    if not isinstance(extra, dict):
        raise ConfigError(f"connection {conn_id}: extra must be a JSON object")
    return extra


def redact(message: str) -> str:
    """``message`` without any password this process was given, nor a URL's ``user:password@``.

    Driver errors may echo parts of what they were handed; the CLI passes every message it
    prints through here.
    """
    message = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", message)
    for secret in sorted(_SECRETS, key=len, reverse=True):
        message = message.replace(secret, "***")
    return message


ConnectionResolver = Callable[[str], ConnectionSpec]
"""Turns a connection id into its :class:`ConnectionSpec`; raises ConfigError when unknown."""


def env_var_name(conn_id: str) -> str:
    """``AIRFLOW_CONN_<ID>``, the variable Airflow reads for ``conn_id``."""
    return f"AIRFLOW_CONN_{conn_id.upper()}"


def from_environment(conn_id: str, environ: Mapping[str, str] | None = None) -> ConnectionSpec:
    """Resolve ``conn_id`` from ``AIRFLOW_CONN_<ID>``, as Airflow's env-var backend does."""
    environ = os.environ if environ is None else environ
    name = env_var_name(conn_id)
    value = environ.get(name)
    if not value:
        raise ConfigError(
            f"connection {conn_id!r} is not defined: set {name} to a connection URI "
            f"(e.g. postgres://user:pass@host:5432/db) or Airflow's JSON form"
        )
    value = value.strip()
    if value.startswith("{"):
        return ConnectionSpec.from_json(conn_id, value)
    return ConnectionSpec.from_uri(conn_id, value)


def sqlalchemy_url(spec: ConnectionSpec) -> URL:
    """The SQLAlchemy URL for a postgres, mysql/mariadb or sqlite connection."""
    from sqlalchemy.engine import URL

    kind = spec.conn_type
    if kind == "sqlite":
        path = spec.host or spec.schema
        if not path:
            raise ConfigError(f"connection {spec.conn_id}: a sqlite connection needs the file path as host")
        return URL.create("sqlite", database=path)
    if kind in ("postgres", "mysql", "mariadb"):
        driver = "postgresql+psycopg2" if kind == "postgres" else "mysql+pymysql"
        query = {k: str(v) for k, v in spec.extra.items() if k in _DRIVER_OPTIONS[driver]}
        return URL.create(
            driver, username=spec.login, password=spec.password, host=spec.host,
            port=spec.port, database=spec.schema, query=query,
        )
    raise ConfigError(
        f"connection {spec.conn_id}: type {kind!r} is not a SQL database this engine speaks "
        "(postgres, mysql, mariadb, sqlite)"
    )


def create_sql_engine(spec: ConnectionSpec) -> Engine:
    """An engine whose sessions compare timestamps in UTC and do not wait forever on locks."""
    from sqlalchemy import create_engine, event

    url = sqlalchemy_url(spec)
    backend = url.get_backend_name()
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if backend == "postgresql":
        kwargs["connect_args"] = {"application_name": "retention", "connect_timeout": 10}
        # An anonymize batch is one UPDATE per row; psycopg2's execute_batch sends them
        # a page at a time instead of one round trip each.
        kwargs["executemany_mode"] = "values_plus_batch"
        kwargs["executemany_batch_page_size"] = 500
    elif backend == "mysql":
        kwargs["connect_args"] = {"init_command": "SET time_zone = '+00:00'", "charset": "utf8mb4", "connect_timeout": 10}
        # Purges delete by range; READ COMMITTED avoids gap locks on the rows around it.
        kwargs["isolation_level"] = "READ COMMITTED"
    elif backend == "sqlite":
        kwargs["connect_args"] = {"timeout": 30}
    engine = create_engine(url, **kwargs)
    _name_the_connection(engine, spec.conn_id)
    if backend == "postgresql":
        @event.listens_for(engine, "connect")
        def _utc(dbapi_connection, _record):  # pragma: no branch - trivial
            with dbapi_connection.cursor() as cursor:
                cursor.execute("SET TIME ZONE 'UTC'")
            dbapi_connection.commit()
    elif backend == "sqlite":
        @event.listens_for(engine, "connect")
        def _fk(dbapi_connection, _record):
            # Foreign keys protect children from a purge of their parent.
            dbapi_connection.execute("PRAGMA foreign_keys = ON")
    return engine










_CONN_ID_ATTRIBUTE = "retention_conn_id"


def _name_the_connection(engine: Engine, conn_id: str) -> None:
    """Mark every error of ``engine`` (connecting too) with the connection id it came from, so a
    message can say which database failed; only the id: the URL may hold a password."""
    from sqlalchemy import event

    @event.listens_for(engine, "handle_error")
    def _mark(context: Any) -> None:
        for error in (context.sqlalchemy_exception, context.original_exception):
            if error is not None and not hasattr(error, _CONN_ID_ATTRIBUTE):
                try:
                    setattr(error, _CONN_ID_ATTRIBUTE, conn_id)
                except (AttributeError, TypeError):  # an exception type without a __dict__
                    pass


def failed_connection(exc: BaseException) -> str | None:
    """The id of the connection whose engine raised ``exc`` (see :func:`create_sql_engine`), if known."""
    for error in (exc, getattr(exc, "orig", None), exc.__cause__, exc.__context__):
        conn_id = getattr(error, _CONN_ID_ATTRIBUTE, None)
        if isinstance(conn_id, str):
            return conn_id
    return None


_DRIVER_OPTIONS = {
    "postgresql+psycopg2": {"sslmode", "sslrootcert", "sslcert", "sslkey", "options", "target_session_attrs"},
    "mysql+pymysql": {"ssl_ca", "ssl_cert", "ssl_key"},
}


def _normal_type(conn_type: str) -> str:
    if conn_type == "postgresql":
        return "postgres"
    return conn_type.replace("-", "_")


def _hostname(parts) -> str:
    # urlsplit lower-cases hostnames and cannot hold a path (sqlite://%2Ftmp%2Fx.db).
    hostname = unquote(parts.hostname or "")
    if "/" in hostname:
        hostname = parts.netloc.rsplit("@", 1)[-1].split(":", 1)[0]
        hostname = unquote(hostname)
    return hostname
