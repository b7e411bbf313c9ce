"""`wemoe-update-code`: replace a WEMoE artifact's model code with this release's; its weights stay as they are.

Rewrites the code files and the `auto_map` of `config.json`, in a local directory or in a Hub repo (one commit);
`wemoe.update_code` holds the library.
"""

import argparse
import logging
import sys

from ..update_code import release_version, update_code

EPILOG = """examples:
  wemoe-update-code ./clip-b32-ewemoe-8task                     # a local artifact, in place
  wemoe-update-code my-org/flan-t5-base-wemoe-glue               # a Hub repo: one commit with the new code files
  wemoe-update-code ./adapted --push-to-hub my-org/adapted       # in place, then upload the code to that repo
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="wemoe-update-code",
        description="Replace a WEMoE artifact's model code with this release's; its weights stay as they are.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("artifact", help="A WEMoE artifact: a local directory (updated in place) or a Hub repo id.")
    parser.add_argument(
        "--push-to-hub", metavar="ORG/NAME", help="Upload the updated code to this Hub repo (default for a Hub id: it)."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Log the files written and removed.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        where = update_code(args.artifact, args.push_to_hub)
    except (ValueError, OSError) as error:
        print(f"wemoe-update-code: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"Updated the WEMoE code of {where} to wemoe {release_version()}")


if __name__ == "__main__":
    main()
