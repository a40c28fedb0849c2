"""Interfaces: the CLI, the Airflow DAGs and plugin (the compliance page), reports, the demo.
Only interfaces/airflow*.py import Airflow."""
