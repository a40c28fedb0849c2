"""One Airflow DAG per retention rule in retention_rules/ (or $RETENTION_RULES_DIR).

Kept thin on purpose: everything lives in the ``retention`` package, and building the
DAGs reads only the YAML files.
"""

from retention.interfaces.airflow import build_dags, default_rules_dir

globals().update(build_dags(default_rules_dir(__file__)))
