"""`wemoe-convert`: a base model and fine-tuned checkpoints (full or LoRA) to a WEMoE artifact ready for the Hub.

The recipe is validated before anything is loaded, and the artifact is staged and renamed into place when complete;
`conversion.convert` holds the library.
"""

import argparse
import logging
import sys
import textwrap
from pathlib import Path

from ..convert import DTYPES, convert, plan_conversion
from ..recipe import EXAMPLE_RECIPE, EXAMPLE_T5_RECIPE

EPILOG = (
    "example recipe (clip-8task.yaml):\n"
    + textwrap.indent(EXAMPLE_RECIPE, "  ")
    + "\nexample T5 recipe (flan-t5-glue.yaml):\n"
    + textwrap.indent(EXAMPLE_T5_RECIPE, "  ")
    + """
examples:
  wemoe-convert --dry-run clip-8task.yaml   # check everything from configs and headers; print the plan
  wemoe-convert clip-8task.yaml ./clip-b32-ewemoe-8task
  wemoe-convert flan-t5-glue.yaml ./flan-t5-base-wemoe-glue
  wemoe-convert baseline.yaml ./clip-adamerging   # variant: static, static_merge: {method: adamerging, data: ...}
  wemoe-convert clip-8task.yaml ./out --dtype bfloat16 --push-to-hub my-org/clip-b32-ewemoe-8task --private
"""
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="wemoe-convert",
        description=__doc__.splitlines()[0].removeprefix("`wemoe-convert`: "),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "config", type=Path, nargs="?", help="YAML recipe: base model, variant, router, tasks with their models."
    )
    parser.add_argument(
        "output_dir", type=Path, nargs="?", help="Directory to write the artifact to (must not exist; not written "
        "with --dry-run, only checked if given)."
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="Check the recipe and every checkpoint from configs and tensor headers only (no weights are loaded or "
        "downloaded), print what would be built with its size and peak memory estimates, and write nothing.",
    )
    parser.add_argument("--push-to-hub", metavar="ORG/NAME", help="Upload the finished artifact to this Hub repo.")
    parser.add_argument("--private", action="store_true", help="Create the Hub repo as private.")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="Storage dtype (default: float32).")
    parser.add_argument("--max-shard-size", default="5GB", help="Safetensors shard size (default: 5GB).")
    parser.add_argument("--overwrite", action="store_true", help="Replace OUTPUT_DIR if it exists.")
    parser.add_argument("-v", "--verbose", action="store_true", help="Log what is loaded and merged.")
    args = parser.parse_intermixed_args(argv)  # optional positionals may follow flags: `--dry-run RECIPE -q OUT`
    if args.config is None:
        parser.error("the following arguments are required: config")
    if not args.dry_run and args.output_dir is None:
        parser.error("the following arguments are required: output_dir (optional only with --dry-run)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("conversion").setLevel(logging.INFO)  # what was merged, and low-rank errors per layer
    options = {"dtype": args.dtype, "max_shard_size": args.max_shard_size, "overwrite": args.overwrite}
    try:
        if args.dry_run:
            plan = plan_conversion(args.config, args.output_dir, **options)
        else:
            output = convert(
                args.config, args.output_dir, push_to_hub=args.push_to_hub, private=args.private, **options
            )
    except (ValueError, OSError) as error:  # expected failures (bad input, files); anything else is a bug
        print(f"wemoe-convert: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    if args.dry_run:
        print(f"{plan}\nDry run: only configs and tensor headers were read, and nothing was written.")
    else:
        print(f"Wrote {output}")


if __name__ == "__main__":
    main()
