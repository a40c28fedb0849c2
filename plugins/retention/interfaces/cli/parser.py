"""The ``retention`` argument parser: the global options, then each command group's subcommands.

A command group is a module with ``register(commands)``, which adds its subcommands to
``commands`` (the ``add_subparsers()`` action) and sets ``handler`` on each. A new group
plugs in with one line in ``COMMAND_GROUPS`` in ``retention.interfaces.cli``.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from types import ModuleType

from retention import __version__


def build_parser(groups: Iterable[ModuleType]) -> argparse.ArgumentParser:
    """The parser of every command the ``groups`` register, in their order."""
    parser = argparse.ArgumentParser(
        prog="retention",
        description="Declarative retention rules, purged in batches, proven by signed certificates.",
    )
    parser.add_argument("--version", action="version", version=f"retention {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in groups:
        group.register(commands)
    return parser
