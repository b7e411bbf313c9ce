"""`wemoe-eval`: per-task scores of a model on labeled task data, and optionally its model card's model-index.

Scores a WEMoE artifact (adapted or not: a fresh conversion is task arithmetic) or a plain model of a supported
family: a CLIPModel zero-shot (class names from each dataset's ClassLabel), a T5 directory or a T5's PEFT adapter
(exact match, or Spearman for float labels), ...; `conversion.evaluation` holds the library.
"""

import argparse
import json
import os
import sys
from pathlib import Path

from ..data import load_data_config
from ..evaluation import evaluate, update_model_card
from . import add_verbosity_flags, configure_logging

EPILOG = """example DATA.yaml:
  tasks:
    eurosat: {path: tanganke/eurosat, split: test, image_column: image, label_column: label}

  for a T5 model:
  tasks:
    sst2: {path: glue, config_name: sst2, split: validation, text_column: sentence, prefix: "sst2 sentence: "}
    stsb: {path: parquet, data_files: ./stsb.parquet, text_column: pair, prefix: "stsb ", label_column: score}

examples:
  wemoe-eval ./clip-b32-ewemoe-8task-tta data.yaml --output results.json --update-model-card
  wemoe-eval openai/clip-vit-base-patch32 data.yaml      # zero-shot baseline of a plain CLIPModel
  wemoe-eval ./flan-t5-base-wemoe-glue glue.yaml --max-new-tokens 8
  wemoe-eval ./flan-t5-base-sst2-lora glue.yaml          # one LoRA fine-tune, loaded over its base
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="wemoe-eval",
        description="Score a model on labeled task data, task by task, and optionally write the scores into its "
        "model card's model-index.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "model_dir", help="A WEMoE artifact, a plain CLIPModel (zero-shot) or T5 directory, or a T5's PEFT adapter."
    )
    parser.add_argument("data", type=Path, help="DATA.yaml with a label column per task.")
    parser.add_argument("--split", default=None, help="Override every task's split (e.g. test).")
    parser.add_argument("--batch-size", type=int, default=64, help="Evaluation batch size (default: 64).")
    parser.add_argument(
        "--max-new-tokens", type=int, default=16, help="Text-to-text models: answer length limit (default: 16)."
    )
    parser.add_argument("--output", type=Path, default=None, help="Write the results as JSON here.")
    parser.add_argument("--update-model-card", action="store_true", help="Record the results in MODEL_DIR/README.md.")
    add_verbosity_flags(parser)
    return parser.parse_args(argv)


def check_writable_outputs(args: argparse.Namespace) -> None:
    """Where the results go must be writable before anything is evaluated."""
    if args.output is not None:
        parent = args.output.parent
        if not parent.is_dir():
            raise ValueError(f"--output {str(args.output)!r}: directory {str(parent)!r} does not exist.")
        if args.output.is_dir() or not os.access(parent, os.W_OK):
            raise ValueError(f"--output {str(args.output)!r} cannot be written.")
    if args.update_model_card:
        model_dir = Path(args.model_dir)
        if not model_dir.is_dir():
            raise ValueError(
                f"--update-model-card writes the card of a local artifact; {str(model_dir)!r} is not a directory."
            )
        if not os.access(model_dir, os.W_OK):
            raise ValueError(f"--update-model-card: {str(model_dir)!r} is not writable.")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging(args.verbosity)
    try:
        check_writable_outputs(args)
        results = evaluate(
            args.model_dir,
            args.data,
            split=args.split,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
        )
        if args.update_model_card:
            update_model_card(Path(args.model_dir), results, load_data_config(args.data), args.split)
    except (ValueError, OSError) as error:  # expected failures (bad input, files); anything else is a bug
        print(f"wemoe-eval: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    for task, accuracy in results.items():
        print(f"{task:<24} {100 * accuracy:6.2f}")
    if args.output:
        args.output.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
