"""What every console script shares: how it words an expected failure."""

from ..outputs import OutputExistsError


def error_message(error: Exception) -> str:
    """An expected failure as a command line says it: options by their flags (`--overwrite`, not `overwrite=True`)."""
    if isinstance(error, OutputExistsError):
        return error.message("--overwrite")
    return str(error)
