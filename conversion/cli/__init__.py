"""What every console script shares: its verbosity flags and logging, the corruption flags of `wemoe-eval` and
`wemoe-tta`, and how it words an expected failure."""

import argparse
import logging

from ..corruptions import CORRUPTIONS, SEVERITIES, Corruption
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


def add_corruption_flags(parser: argparse.ArgumentParser, *, repeatable: bool) -> None:
    """`--corruption NAME --severity N [--corruption-seed S]`: every task's images corrupted (`wemoe.corruptions`).
    `repeatable`: each corruption at each severity is a run of its own, and `--clean` adds the clean data as one."""
    again = " Repeatable: each corruption is evaluated at each severity, as a run of its own." if repeatable else ""
    parser.add_argument(
        "--corruption",
        action="append",
        choices=CORRUPTIONS,
        metavar="NAME",
        help="Corrupt every task's images with this ImageNet-C corruption (needs wemoe[robustness]): "
        f"{', '.join(CORRUPTIONS)}.{again}",
    )
    parser.add_argument(
        "--severity",
        action="append",
        type=int,
        choices=SEVERITIES,
        metavar="N",
        help=f"The corruption's severity, 1 (mildest) to 5; needed with --corruption.{again}",
    )
    parser.add_argument(
        "--corruption-seed",
        type=int,
        default=None,
        metavar="SEED",
        help="Seed of the corruptions' random draws (default: 0). Each image's own is derived from it, the task and "
        "the image's row, so wemoe-eval and wemoe-tta given the same seed corrupt an image alike.",
    )
    if repeatable:
        parser.add_argument(
            "--clean", action="store_true", help="With --corruption: also evaluate the clean data, as the first run."
        )


def corruptions_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[Corruption | None]:
    """The runs the corruption flags ask for: each corruption at each severity, after the clean data (None) with
    `--clean`; empty without `--corruption`. Flags that mean nothing without `--corruption` are usage errors."""
    names, severities = dict.fromkeys(args.corruption or []), dict.fromkeys(args.severity or [])
    clean = getattr(args, "clean", False)
    if names and not severities:
        parser.error("--corruption needs --severity (1 to 5).")
    given = {"--severity": bool(severities), "--corruption-seed": args.corruption_seed is not None, "--clean": clean}
    for flag in (flag for flag, present in given.items() if present and not names):
        parser.error(f"{flag} applies to --corruption; give one.")
    seed = args.corruption_seed or 0
    runs = [Corruption(name=name, severity=severity, seed=seed) for name in names for severity in severities]
    return [None, *runs] if clean else runs
