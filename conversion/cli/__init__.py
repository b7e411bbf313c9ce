"""What every console script shares: its verbosity flags and logging, and how it words an expected failure."""

import argparse
import logging

from ..outputs import OutputExistsError


def add_verbosity_flags(parser: argparse.ArgumentParser) -> None:
    """`-v` / `-q` as `args.verbosity` (1 / -1, 0 without either); `configure_logging` applies it."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "-v",
        "--verbose",
        dest="verbosity",
        action="store_const",
        const=1,
        default=0,
        help="Also log detail (each checkpoint opened, ...) and other libraries' info messages. By default a line "
        "per step is logged: what is merged, written, adapted or scored.",
    )
    group.add_argument(
        "-q", "--quiet", dest="verbosity", action="store_const", const=-1, help="Log only warnings and errors."
    )


def configure_logging(verbosity: int) -> None:
    """Log the project's summary lines (INFO) by default, its DEBUG detail with -v (1), only warnings with -q (-1);
    other libraries log warnings, and their INFO lines too with -v."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("wemoe").setLevel({-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}[verbosity])
    logging.getLogger().setLevel(logging.INFO if verbosity > 0 else logging.WARNING)


def error_message(error: Exception) -> str:
    """An expected failure as a command line says it: options by their flags (`--overwrite`, not `overwrite=True`)."""
    if isinstance(error, OutputExistsError):
        return error.message("--overwrite")
    return str(error)
