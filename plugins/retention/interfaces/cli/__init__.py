"""The ``retention`` command."""

from retention.interfaces.cli.commands import main

__all__ = ["main"]
