"""`wemoe-convert`: a base model and fine-tuned checkpoints (full or LoRA) to a WEMoE artifact ready for the Hub.

The recipe is validated before anything is loaded, and the artifact is staged and renamed into place when complete;
`wemoe.convert` holds the library.
"""

import argparse
import sys
import textwrap
from pathlib import Path
from typing import Literal, get_args, get_origin

from pydantic.fields import FieldInfo

from ..add_task import add_task
from ..convert import DTYPES, convert, plan_conversion
from ..merge_methods import STATIC_MERGE_METHODS
from ..recipe import EXAMPLE_RECIPE, EXAMPLE_T5_RECIPE, STATIC_MERGE_SPECS
from . import add_verbosity_flags, configure_logging, error_message

EPILOG = (
    "example recipe (clip-8task.yaml):\n"
    + textwrap.indent(EXAMPLE_RECIPE, "  ")
    + "\nexample T5 recipe (flan-t5-glue.yaml):\n"
    + textwrap.indent(EXAMPLE_T5_RECIPE, "  ")
    + """
examples (ready recipes in the repository's examples/ folder):
  wemoe-convert --dry-run clip-8task.yaml   # check everything from configs and headers; print the plan
  wemoe-convert clip-8task.yaml ./clip-b32-ewemoe-8task
  wemoe-convert flan-t5-glue.yaml ./flan-t5-base-wemoe-glue
  wemoe-convert baseline.yaml ./clip-adamerging   # variant: static, static_merge: {method: adamerging, data: ...}
  wemoe-convert clip-8task.yaml ./out --dtype bfloat16 --push-to-hub my-org/clip-b32-ewemoe-8task --private
  wemoe-convert --list-methods               # the static_merge methods and their parameters

add a task without an expert (CLIP: only its zero-shot head, from the base's text tower) to an artifact, without
merging again (ARTIFACT and OUTPUT first: --classnames and --templates take every word after them):
  wemoe-convert ./clip-b32-ewemoe-8task ./clip-b32-ewemoe-9task --add-task pets --classnames cat dog
  wemoe-convert ./clip-wemoe ./clip-wemoe-pets --add-task pets --classnames cat dog --templates "a photo of my {}."
"""
)

# Flags for --add-task only, and flags that mean nothing with it (its output keeps the artifact's dtype).
ADD_TASK_ONLY = ("classnames", "templates", "base")
NOT_WITH_ADD_TASK = ("dry_run", "list_methods", "dtype")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="wemoe-convert",
        description="Convert a base model and its fine-tuned checkpoints (full fine-tunes or LoRA adapters) into one "
        "WEMoE artifact, ready to load with transformers or push to the Hub.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "config", type=Path, nargs="?", help="YAML recipe: base model, variant, router, tasks with their models. "
        "With --add-task: the artifact (a local directory) to add the task to."
    )
    parser.add_argument(
        "output_dir", type=Path, nargs="?", help="Directory to write the artifact to (must not exist; not written "
        "with --dry-run, only checked if given)."
    )
    parser.add_argument(
        "--add-task",
        metavar="NAME",
        help="Instead of converting a recipe, write OUTPUT_DIR as the artifact CONFIG plus the task NAME, which has no "
        "expert (CLIP only): its zero-shot head is built from --classnames by the base model's text tower. Nothing is "
        "merged again, and the other tasks' outputs are unchanged.",
    )
    parser.add_argument("--classnames", nargs="+", metavar="CLASS", help="--add-task: the new task's class names.")
    parser.add_argument(
        "--templates",
        nargs="+",
        metavar="TEMPLATE",
        help="--add-task: the new task's prompt templates, each with {} for the class name (default: CLIP's photo "
        "prompts).",
    )
    parser.add_argument(
        "--base",
        metavar="MODEL",
        help="--add-task: the base model the artifact was merged from (local directory or Hub id), whose text tower "
        "builds the head (default: the base_model of the artifact's merge_config.yaml).",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="Check the recipe and every checkpoint from configs and tensor headers only (no weights are loaded or "
        "downloaded), print what would be built with its size and peak memory estimates, and write nothing.",
    )
    parser.add_argument(
        "--list-methods", action="store_true", help="List the static_merge methods with their parameters, and exit."
    )
    parser.add_argument("--push-to-hub", metavar="ORG/NAME", help="Upload the finished artifact to this Hub repo.")
    parser.add_argument("--private", action="store_true", help="Create the Hub repo as private.")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="Storage dtype (default: float32; --add-task keeps the artifact's)."
    )
    parser.add_argument("--max-shard-size", default="5GB", help="Safetensors shard size (default: 5GB).")
    parser.add_argument("--overwrite", action="store_true", help="Replace OUTPUT_DIR if it exists.")
    add_verbosity_flags(parser)
    args = parser.parse_intermixed_args(argv)  # optional positionals may follow flags: `--dry-run RECIPE -q OUT`
    if args.add_task is not None:
        check_add_task_args(parser, args)
        return args
    given = [flag for flag in ADD_TASK_ONLY if getattr(args, flag) is not None]
    if given:
        parser.error(f"--{given[0]} only applies with --add-task")
    if not args.list_methods and args.config is None:
        parser.error("the following arguments are required: config")
    if not (args.list_methods or args.dry_run) and args.output_dir is None:
        parser.error("the following arguments are required: output_dir (optional only with --dry-run)")
    return args


def check_add_task_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--add-task needs the artifact, the output and the class names, and none of the recipe's flags."""
    given = [flag for flag in NOT_WITH_ADD_TASK if getattr(args, flag) not in (None, False)]
    if given:
        parser.error(f"--{given[0].replace('_', '-')} does not apply with --add-task")
    if args.config is None or args.output_dir is None:
        parser.error(
            "--add-task needs ARTIFACT and OUTPUT_DIR; put them before --classnames and --templates, whose lists "
            "take every word after them"
        )
    if not args.classnames:
        parser.error(f"--add-task {args.add_task} needs --classnames: a task without an expert is classified by the "
                     "zero-shot head built from its class names")


def parameter_text(name: str, field: FieldInfo) -> str:
    """One recipe field as `name (type, bounds, default)`, read from the recipe's own schema."""
    if get_origin(field.annotation) is Literal:
        kind = " | ".join(str(choice) for choice in get_args(field.annotation))
    else:
        kind = getattr(field.annotation, "__name__", str(field.annotation))
    symbols = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    bounds = [
        f"{symbol} {getattr(constraint, bound)}"
        for constraint in field.metadata
        for bound, symbol in symbols.items()
        if getattr(constraint, bound, None) is not None
    ]
    default = "required" if field.is_required() else f"default {field.default}"
    return f"{name} ({', '.join([kind, *bounds, default])})"


def list_methods() -> str:
    """Every `static_merge` method of the recipe schema: name, one line on what it does, its parameters."""
    lines = ["static_merge methods (recipe: `static_merge: {method: NAME, PARAMETER: VALUE, ...}`):"]
    for spec in STATIC_MERGE_SPECS:
        name = get_args(spec.model_fields["method"].annotation)[0]
        summary = " ".join(spec.__doc__.split()).split(". ")[0].removesuffix(".") + "."
        reference = f" ({STATIC_MERGE_METHODS[name].reference})" if name in STATIC_MERGE_METHODS else ""
        parameters = [parameter_text(field, info) for field, info in spec.model_fields.items() if field != "method"]
        lines += [f"  {name}: {summary}{reference}", *(f"      {text}" for text in parameters)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.list_methods:
        print(list_methods())
        return
    configure_logging(args.verbosity)
    options = {"dtype": args.dtype or "float32", "max_shard_size": args.max_shard_size, "overwrite": args.overwrite}
    try:
        if args.add_task is not None:
            output = add_task(
                args.config,
                args.add_task,
                args.classnames,
                output=args.output_dir,
                templates=args.templates,
                base=args.base,
                overwrite=args.overwrite,
                max_shard_size=args.max_shard_size,
                push_to_hub=args.push_to_hub,
                private=args.private,
            )
        elif args.dry_run:
            plan = plan_conversion(args.config, args.output_dir, **options)
        else:
            output = convert(
                args.config, args.output_dir, push_to_hub=args.push_to_hub, private=args.private, **options
            )
    except (ValueError, OSError) as error:  # expected failures (bad input, files); anything else is a bug
        print(f"wemoe-convert: error: {error_message(error)}", file=sys.stderr)
        raise SystemExit(1) from None
    if args.dry_run:
        print(f"{plan}\nDry run: only configs and tensor headers were read, and nothing was written.")
    else:
        print(f"Wrote {output}")


if __name__ == "__main__":
    main()
