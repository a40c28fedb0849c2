"""retention: declarative retention rules, executed in batches, proven by signed certificates.

The engine (rules → plan → execute → certificate) imports without Airflow; only
:mod:`retention.interfaces.airflow` does.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("retention")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
