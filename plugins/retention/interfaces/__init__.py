"""Interfaces: the CLI, the Airflow DAGs, the demo. Only interfaces/airflow.py imports Airflow."""
