"""The compliance page: a FastAPI app of server-rendered pages on the audit database.

``app`` builds the app from injected dependencies (where the audit database, rules, keys and
checkpoints are; who the user is; whether they may change a category's holds), so it runs and
is tested without Airflow. ``views`` reads what the pages show through the engine's own
readers. ``retention.interfaces.airflow_plugin`` wires both into Airflow's API server.
"""
