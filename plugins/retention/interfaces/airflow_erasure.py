"""The ``retention__erasure`` DAG: erasure requests filed and executed by Airflow.

``file`` files the request a run's conf carries (``airflow dags trigger retention__erasure
--conf '{"subject": "email=ana@example.com", "request": "DSR-2026-0042"}'``, or the REST
API from an account-deletion endpoint) and lists the pending requests; ``erase`` is
mapped, one task per request, each erasing its subject across every rule target (children
first, journaled, so a retried task resumes) and appending its certificate. The schedule
is ``_subjects.yaml``'s (default hourly). Parsing reads only that YAML.

Airflow keeps a run's conf in its metadata database: the identity in a triggered run's
conf is in clear there, as in any request that reaches Airflow. Prefer filing with
``retention erase request`` where that matters; the retention audit database holds HMACs only.
"""

from __future__ import annotations

import logging
import os
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import DAG, Param, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from retention.interfaces.airflow import RETRY_POLICY, START_DATE, airflow_connection
from retention.rules.subjects import load_subjects

log = logging.getLogger(__name__)

ERASURE_DAG_ID = "retention__erasure"


def build_erasure_dag(rules_dir: str | os.PathLike[str]) -> DAG:
    """The erasure DAG of a rules directory (its schedule from ``_subjects.yaml``, else hourly)."""
    subjects = load_subjects(rules_dir)
    schedule = subjects.config.schedule if subjects is not None else "@hourly"
    path = str(Path(rules_dir))
    with DAG(
        dag_id=ERASURE_DAG_ID,
        description="Erasure requests of data subjects (GDPR Art. 17), certified in the purge chain",
        schedule=schedule,
        start_date=START_DATE,
        catchup=False,
        max_active_runs=1,
        tags=["retention", "erasure"],
        default_args={"owner": "privacy", "retries": 2, "retry_delay": timedelta(minutes=5),
                      "retry_policy": RETRY_POLICY},
        params={
            "subject": Param(None, type=["null", "string"], description="TYPE=VALUE, e.g. email=ana@example.com"),
            "request": Param(None, type=["null", "string"], description="the request id, e.g. DSR-2026-0042"),
            "reason": Param("erasure-requested", type="string"),
            "due": Param(None, type=["null", "string"], description="YYYY-MM-DD (default: due_within)"),
        },
        doc_md=__doc__,
    ) as dag:

        @task(task_id="file")
        def file() -> list[str]:
            return _file(path)

        @task(task_id="erase", map_index_template="{{ request_id }}")
        def erase(request_id: str) -> dict[str, Any]:
            return _erase(path, request_id)

        erase.expand(request_id=file())
    return dag


def _audit():
    from retention.erasure_requests import ErasureRegistry
    from retention.evidence.audit import DEFAULT_AUDIT_CONNECTION, open_audit

    return ErasureRegistry(open_audit(airflow_connection, os.environ.get("RETENTION_AUDIT_CONN")
                                      or DEFAULT_AUDIT_CONNECTION))


def _file(path: str) -> list[str]:
    """The file task: the conf's request filed (once: a retry finds it), then the ids to erase."""
    from retention.erasure_requests import SubjectKey
    from retention.holds import HoldRegistry
    from retention.run.erase import file_erasure_request, pending_requests
    from retention.targets import Targets

    params = get_current_context()["params"]
    registry = _audit()
    if params.get("subject") or params.get("request"):
        if not (params.get("subject") and params.get("request")):
            raise AirflowFailException("a request in the conf needs both subject and request")
        subjects = load_subjects(path)
        if subjects is None:
            raise AirflowFailException(f"there is no _subjects.yaml in {path}")
        if registry.find_one(params["request"]) is None:
            with Targets(airflow_connection) as targets:
                file_erasure_request(registry, subjects, subject=params["subject"], request_id=params["request"],
                                     reason=params.get("reason") or "erasure-requested",
                                     due=date.fromisoformat(params["due"]) if params.get("due") else None,
                                     targets=targets, key=SubjectKey.from_environment())
            log.info("filed erasure request %s", params["request"])
    pending = pending_requests(registry, HoldRegistry(registry.engine))
    log.info("%d erasure request(s) to run: %s", len(pending), ", ".join(pending))
    return pending


def _erase(path: str, request_id: str) -> dict[str, Any]:
    """An erase task: one request's subject erased and certified; resumes what a killed try left."""
    from retention.erasure_requests import SubjectKey
    from retention.evidence.signing import Signer
    from retention.holds import HoldRegistry
    from retention.rules.loader import load_rules
    from retention.run.erase import erase_request, failed_reasons, held_reasons
    from retention.targets import Targets

    context = get_current_context()
    context["request_id"] = request_id  # type: ignore[typeddict-unknown-key]
    registry = _audit()
    with Targets(airflow_connection) as targets:
        result = erase_request(request_id, rules=load_rules(path), registry=registry,
                               holds=HoldRegistry(registry.engine), targets=targets,
                               key=SubjectKey.from_environment(), signer=Signer.from_environment())
    seq = result.certificate.seq if result.certificate else None
    log.info("erasure request %s: %s (certificate %s)", request_id, result.request.state, seq)
    if result.certificate is not None and result.certificate.status != "done":
        failures = failed_reasons(result.certificate)
        if failures:
            # A target refused or failed: the subject's records are not all gone and someone must
            # look; the task fails, with no retry (the certificate and the request's state are
            # written; the next run tries a failed target again).
            raise AirflowFailException(f"erasure request {request_id} is {result.certificate.status} "
                                       f"(certificate {seq}): " + "; ".join(failures + held_reasons(result.certificate)))
        # Only legal holds kept records: the hold beats the erasure (the task succeeds, as a purge
        # whose held rows stay does); the run after the hold is released takes them.
        log.warning("erasure request %s is partial (certificate %s): %s; the next run takes them once the hold "
                    "is released", request_id, seq, "; ".join(held_reasons(result.certificate)))
    return {"request": request_id, "state": result.request.state, "certificate": seq}
