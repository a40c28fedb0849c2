"""retention: declarative retention rules, executed in batches, proven by signed certificates.

The engine (rules → plan → execute → certificate) imports without Airflow; only
:mod:`retention.interfaces.airflow` does.
"""

from __future__ import annotations

# The one place the version is written (pyproject.toml reads it from here), so that no
# command pays for a search of the installed distributions to learn it.
__version__ = "0.1.0"
