"""The ``retention__erasure`` DAG: pending erasure requests, one mapped task each.

Kept thin on purpose: the DAG lives in ``retention.interfaces.airflow_erasure`` and is built
from retention_rules/_subjects.yaml (or $RETENTION_RULES_DIR) alone.
"""

from retention.interfaces.airflow import default_rules_dir
from retention.interfaces.airflow_erasure import ERASURE_DAG_ID, build_erasure_dag

globals()[ERASURE_DAG_ID] = build_erasure_dag(default_rules_dir(__file__))
