"""``retention``: validate rules, plan and run purges, list and verify certificates.

Exit status: 0 success; 1 a run that did not purge everything, a chain that does not
verify, or an operational error; 2 invalid rules or usage. Tables go to stdout,
progress and errors to stderr; ``--json`` prints what a machine should read.

Each command group lives in its own module and registers its subcommands through
``register(commands)``; ``COMMAND_GROUPS`` lists them, one line each, with the commands
each registers: a command imports only its own group (``retention run`` never loads what
``schema`` or ``diff`` need), ``--help`` all of them.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from types import ModuleType

from retention.errors import ConfigError, RetentionError, RuleError
from retention.interfaces.cli.options import EXIT_FAILED, EXIT_INVALID, _err
from retention.interfaces.cli.parser import build_parser

# The order is the order of `retention --help`.
COMMAND_GROUPS: dict[str, tuple[str, ...]] = {
    "retention.interfaces.cli.rules": ("validate", "plan", "run", "status"),
    "retention.interfaces.cli.holds": ("hold",),
    "retention.interfaces.cli.erase": ("erase", "verify-receipt"),
    "retention.interfaces.cli.evidence": ("certificates", "verify", "checkpoint"),
    "retention.interfaces.cli.archive": ("restore",),
    "retention.interfaces.cli.airflow": ("airflow",),
    "retention.interfaces.cli.keys": ("keygen",),
    "retention.interfaces.schedule": ("schedule",),
    "retention.interfaces.report": ("report",),
    "retention.interfaces.ruleschema": ("schema",),
    "retention.interfaces.diff": ("diff",),
}

log = logging.getLogger("retention")

__all__ = ["COMMAND_GROUPS", "main"]


def _stdout_gone() -> bool:
    """Whether standard output is a pipe whose reader has closed it."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & select.POLLERR for _fd, event in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no fileno (captured), or no poll here
        return False


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``retention`` console script."""
    parser = build_parser(command_groups(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for handler in logging.getLogger().handlers:  # -v logs driver messages too: no password in them
        handler.addFilter(_redacted)
    try:
        return args.handler(args)
    except RuleError as exc:
        _err(f"invalid rules ({len(exc.problems)} problem{'s' if len(exc.problems) != 1 else ''}):")
        for problem in exc.problems:
            _err(f"  {problem}")
        _err("nothing was touched.")
        return EXIT_INVALID
    except ConfigError as exc:
        _err(f"configuration: {exc}")
        return EXIT_INVALID
    except BrokenPipeError as exc:
        if not _stdout_gone():  # a connection closed under a write: say so, in one line
            _err(f"error: a connection was closed while writing to it ({exc.strerror})")
            return EXIT_FAILED
        # Whoever read the output went away (`retention ... | head`): stop quietly, and keep
        # the interpreter's final flush of stdout from failing the same way.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except RetentionError as exc:
        _err(f"error: {exc}")
        return EXIT_FAILED
    except Exception as exc:  # an operational failure: database down, network, …
        from sqlalchemy.exc import SQLAlchemyError

        if isinstance(exc, SQLAlchemyError):
            from retention.connections import failed_connection

            conn_id = failed_connection(exc)  # which database: its id, never its URI
            _err("database error: " + (f"connection {conn_id}: " if conn_id else "")
                 + " ".join(str(getattr(exc, "orig", exc)).split()))  # one line, as every error
            return EXIT_FAILED
        if type(exc).__module__.startswith("botocore."):  # S3 unreachable or refusing: no import of botocore here
            _err(f"S3 error: {' '.join(str(exc).split())}")
            return EXIT_FAILED
        raise


def command_groups(argv: list[str]) -> list[ModuleType]:
    """The group modules the command in ``argv`` needs: its own, or every group (for help,
    a typo, or no command at all)."""
    position = next((i for i, arg in enumerate(argv) if not arg.startswith("-")), len(argv))
    command = None if {"-h", "--help"} & set(argv[:position]) or position == len(argv) else argv[position]
    wanted = [name for name, commands in COMMAND_GROUPS.items() if command in commands] or list(COMMAND_GROUPS)
    return [importlib.import_module(name) for name in wanted]


def _redacted(record: logging.LogRecord) -> bool:
    """A logging filter: the record's message with every known secret scrubbed."""
    from retention.connections import redact

    message = record.getMessage()
    cleaned = redact(message)
    if cleaned != message:
        record.msg, record.args = cleaned, None
    return True
