"""The Airflow plugin: the compliance page at ``/retention`` on the API server, and its nav entry.

Registered through the ``airflow.plugins`` entry point (pyproject.toml), so installing the
package is enough. Airflow mounts plugin FastAPI apps without its own authentication, so
every route of :mod:`retention.interfaces.web.app` asks Airflow's security itself:
``get_user`` (the JWT in the ``Authorization`` header or the UI's ``_token`` cookie; none is
401) and the auth manager's ``is_authorized_view(WEBSITE)`` (a user who may not use the
Airflow UI at all is 403) for reading, and the auth manager's ``is_authorized_dag`` with method PUT on the
category's DAG (``retention__<category>``) for placing or releasing a hold, as
``requires_access_dag("PUT")`` decides for editing a DAG.

The page reads what the CLI and the DAGs read: the audit database on the
``retention_audit`` connection (``$RETENTION_AUDIT_CONN``), resolved through Airflow like
every connection; the rules in ``$RETENTION_RULES_DIR``; the trusted keys in
``$RETENTION_KEYRING`` or, without a keyring, the PEM files ``$RETENTION_PUBLIC_KEYS`` lists;
the signed checkpoints at ``$RETENTION_CHECKPOINTS``.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.plugins_manager import AirflowPlugin

from retention.interfaces.web.app import Access, Deployment, build_app

if TYPE_CHECKING:
    from fastapi import FastAPI
    from sqlalchemy.engine import Engine

    from retention.evidence.signing import PublicKeys
    from retention.evidence.stores import CheckpointStore

PUBLIC_KEYS_ENV = "RETENTION_PUBLIC_KEYS"
"""PEM public keys verification trusts (``os.pathsep``-separated) when there is no keyring."""
URL_PREFIX = "/retention"


def create_app() -> FastAPI:
    """The compliance page wired to Airflow: its connections, its users, its permissions."""
    from retention.interfaces.cli.options import DEFAULT_RULES_DIR

    rules_dir = os.environ.get("RETENTION_RULES_DIR", DEFAULT_RULES_DIR)
    deployment = Deployment(
        audit=_AuditEngine(os.environ.get("RETENTION_AUDIT_CONN") or "retention_audit"),
        rules=lambda: _load_rules(rules_dir), rules_dir=rules_dir, keys=trusted_keys,
        checkpoints=checkpoint_stores, log_id=_log_id, targets=_targets, s3_client=_s3_client,
        archive_connection=os.environ.get("RETENTION_ARCHIVE_CONN", "aws_default"),
    )
    return build_app(deployment, Access(authenticate=_get_user(), may_edit=may_edit_category,
                                        name_of=_name_of, login_url=_login_url, public_hosts=_public_hosts))


def may_edit_category(user: Any, category: str) -> bool:
    """May ``user`` edit the category's DAG (and so place and release its holds)?"""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagDetails
    from airflow.models.dag import DagModel

    from retention.interfaces.airflow import DAG_PREFIX

    dag_id = f"{DAG_PREFIX}{category}"
    # As requires_access_dag does: the DAG's team (multi-team deployments) is part of the decision.
    details = DagDetails(id=dag_id, team_name=DagModel.get_team_name(dag_id))
    return get_auth_manager().is_authorized_dag(method="PUT", details=details, user=user)


def trusted_keys() -> PublicKeys | None:
    """The keys verification trusts: ``$RETENTION_KEYRING``, else ``$RETENTION_PUBLIC_KEYS``; None without either."""
    from retention.evidence.signing import PublicKeys

    keyring = os.environ.get("RETENTION_KEYRING")
    if keyring:
        return PublicKeys.from_keyring(keyring)
    pems: list[str | Path] = [p for p in os.environ.get(PUBLIC_KEYS_ENV, "").split(os.pathsep) if p]
    return PublicKeys.from_pem_files(pems) if pems else None


def checkpoint_stores() -> list[CheckpointStore]:
    """The checkpoint store ``$RETENTION_CHECKPOINTS`` names (the one runs write to), or none."""
    from retention.evidence.checkpoints import CHECKPOINTS_ENV
    from retention.evidence.stores import CHECKPOINTS_CONN_ENV, open_store

    location = os.environ.get(CHECKPOINTS_ENV)
    if not location:
        return []
    return [open_store(location, _s3_client, os.environ.get(CHECKPOINTS_CONN_ENV) or "aws_default")]


class _AuditEngine:
    """The audit database's engine, opened (schema checked, never created) on first use and kept; a failure
    (the database down, or without audit tables) is retried."""

    def __init__(self, conn_id: str):
        self.conn_id = conn_id
        self._engine: Engine | None = None
        self._lock = threading.Lock()

    def __call__(self) -> Engine:
        from retention.evidence.audit import open_audit
        from retention.interfaces.airflow import airflow_connection

        with self._lock:
            if self._engine is None:
                # The page reads the evidence: pointed at a database without audit tables it says
                # so (ConfigError: a 503 naming the connection) instead of creating them there.
                self._engine = open_audit(airflow_connection, self.conn_id, create=False)
            return self._engine


def _load_rules(rules_dir: str):
    from retention.rules.loader import load_rules

    return load_rules(rules_dir)


def _log_id() -> str:
    from retention.evidence.checkpoints import log_identity

    return log_identity()


def _targets():
    from retention.interfaces.airflow import airflow_connection
    from retention.targets import Targets

    return Targets(airflow_connection)


def _s3_client(conn_id: str) -> Any:
    from retention.aws import create_s3_client
    from retention.interfaces.airflow import airflow_connection

    return create_s3_client(airflow_connection(conn_id))


def _get_user():
    from airflow.api_fastapi.core_api.security import get_user
    from fastapi import Depends, HTTPException

    async def reader(user: Any = Depends(get_user)) -> Any:
        """The signed-in user, if the auth manager lets them use the Airflow UI at all (else 403).

        A token only says who someone is: another auth manager's user without roles (FAB's
        Public, a Keycloak user granted nothing) is signed in but sees nothing in Airflow, so
        must see no certificates or hold scopes here either."""
        from airflow.api_fastapi.app import get_auth_manager
        from airflow.api_fastapi.auth.managers.models.resource_details import AccessView

        if not get_auth_manager().is_authorized_view(access_view=AccessView.WEBSITE, user=user):
            raise HTTPException(403, f"{_name_of(user)} may not use the Airflow UI, so not this page either")
        return user

    return reader


def _name_of(user: Any) -> str:
    return str(user.get_name())


def _public_hosts() -> set[str]:
    """The host of ``[api] base_url``: behind a proxy that rewrites Host, the origin people's forms come from."""
    from urllib.parse import urlsplit

    from airflow.configuration import conf

    host = urlsplit(conf.get("api", "base_url", fallback="") or "").netloc
    return {host} if host else set()


def _login_url(next_url: str) -> str:
    from airflow.api_fastapi.app import get_auth_manager

    return get_auth_manager().get_url_login(next_url=next_url)


class RetentionPlugin(AirflowPlugin):
    """Retention's compliance page in the Airflow UI (Airflow 3.1+)."""

    name = "retention"
    fastapi_apps = [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "Retention compliance"}]
    # Relative href: the UI resolves it against its base URL, so a deployment under a sub-path works too.
    external_views = [{"name": "Retention", "href": "retention/", "destination": "nav", "category": "browse",
                       "url_route": "retention"}]
