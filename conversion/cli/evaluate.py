"""`wemoe-eval`: per-task scores of a model on labeled task data, and optionally its model card's model-index.

Scores a WEMoE artifact (adapted or not: a fresh conversion is task arithmetic) or a plain model of a supported
family: a CLIPModel zero-shot (class names from each dataset's ClassLabel), a T5 directory or a T5's PEFT adapter
(exact match, or Spearman for float labels), ...; `wemoe.evaluation` holds the library.
"""

import argparse
import json
import os
import sys
from pathlib import Path

from ..data import DataConfig, load_data_config, with_corruption
from ..evaluation import EvaluationResults, evaluate, update_model_card
from . import add_corruption_flags, add_verbosity_flags, configure_logging, corruptions_from_args

EPILOG = """example DATA.yaml:
  tasks:
    eurosat: {path: tanganke/eurosat, split: test, image_column: image, label_column: label}

  for a T5 model:
  tasks:
    sst2: {path: glue, config_name: sst2, split: validation, text_column: sentence, prefix: "sst2 sentence: "}
    stsb: {path: parquet, data_files: ./stsb.parquet, text_column: pair, prefix: "stsb ", label_column: score}

examples:
  wemoe-eval ./clip-b32-ewemoe-8task-tta data.yaml --output results.json --update-model-card
  wemoe-eval ./clip-b32-ewemoe-8task-tta data.yaml --update-model-card --push-to-hub my-org/clip-b32-ewemoe-8task-tta
  wemoe-eval openai/clip-vit-base-patch32 data.yaml      # zero-shot baseline of a plain CLIPModel
  wemoe-eval tanganke/clip-vit-base-patch32_eurosat data.yaml --base openai/clip-vit-base-patch32  # one fine-tune
  wemoe-eval ./flan-t5-base-wemoe-glue glue.yaml --max-new-tokens 8
  wemoe-eval ./flan-t5-base-sst2-lora glue.yaml          # one LoRA fine-tune, loaded over its base
  wemoe-eval ./clip-wemoe data.yaml --clean --corruption motion_blur --corruption jpeg_compression --severity 3 \
    --output robustness.json                              # three runs: clean, motion_blur-3, jpeg_compression-3
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
        "model_dir",
        help="A WEMoE artifact, a plain CLIPModel (zero-shot; a CLIPVisionModel with --base), BERT or T5 directory, or "
        "a T5's PEFT adapter.",
    )
    parser.add_argument("data", type=Path, help="DATA.yaml with a label column per task.")
    parser.add_argument("--split", default=None, help="Override every task's split (e.g. test).")
    parser.add_argument("--batch-size", type=int, default=64, help="Evaluation batch size (default: 64).")
    parser.add_argument(
        "--max-new-tokens", type=int, default=16, help="Text-to-text models: answer length limit (default: 16)."
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="Write the results as JSON here: per task and for the average, {metric, score, num_samples}, scores as "
        "fractions (accuracy, exact match) or correlations (Spearman); a corrupted task's entry adds its corruption "
        "{name, severity, seed}. With --corruption, one such block per run, keyed by the run (clean, motion_blur-3).",
    )
    parser.add_argument(
        "--update-model-card",
        action="store_true",
        help="Record the results in MODEL_DIR/README.md; corrupted data as datasets of their own (config "
        "motion_blur-3), beside the clean results.",
    )
    parser.add_argument(
        "--push-to-hub",
        metavar="ORG/NAME",
        help="With --update-model-card: record the results under this Hub repo's name, and upload MODEL_DIR to it.",
    )
    parser.add_argument("--private", action="store_true", help="Create the Hub repo as private.")
    parser.add_argument(
        "--base",
        default=None,
        help="For a fine-tune saved as a bare CLIPVisionModel (no text tower): the CLIP model it was fine-tuned from, "
        "whose text tower and tokenizer build the zero-shot heads (default: the one its config.json names, if any).",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="Where the model runs: cpu, cuda, cuda:1, mps, ... (default: cuda if available, else mps, else cpu).",
    )
    add_corruption_flags(parser, repeatable=True)
    add_verbosity_flags(parser)
    args = parser.parse_args(argv)
    if args.push_to_hub and not args.update_model_card:
        parser.error("--push-to-hub publishes the updated model card; give --update-model-card too.")
    args.corruptions = corruptions_from_args(parser, args)
    return args


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


# How a metric reads in the table: its name, and whether its score is a fraction shown in %.
METRIC_DISPLAY = {
    "accuracy": ("accuracy", True),
    "exact_match": ("exact match", True),
    "spearmanr": ("spearman", False),
}


def results_table(results: EvaluationResults) -> str:
    """One row per task and the average: metric, score in the metric's own unit (accuracy and exact match in %,
    Spearman as a correlation in [-1, 1]; an average over unlike metrics as the plain mean), and samples counted."""
    lines = [f"{'task':<24} {'metric':<12} {'score':>8} {'samples':>8}"]
    metrics = {**results.metrics, "average": results.average_metric()}
    samples = {**results.num_samples, "average": sum(results.num_samples.values())}
    for task, score in results.items():
        name, percent = METRIC_DISPLAY.get(metrics[task], (metrics[task], False))
        cell = f"{100 * score:.2f}%" if percent else f"{score:+.4f}"
        lines.append(f"{task:<24} {name:<12} {cell:>8} {samples[task]:>8}")
    if "spearmanr" in metrics.values():
        lines.append("spearman: Spearman's rank correlation of the answers with the targets, in [-1, 1].")
    return "\n".join(lines)


def corruption_line(data_config: DataConfig) -> str:
    """What a run's images went through, for the line above its table."""
    corruptions = {task: spec.corruption for task, spec in data_config.tasks.items()}
    if len(set(corruptions.values())) == 1:
        only = next(iter(corruptions.values()))
        return f"corruption: {only.describe() if only else 'none (clean images)'}"
    return "corruption: " + "; ".join(
        f"{task}: {corruption.describe() if corruption else 'none'}" for task, corruption in corruptions.items()
    )


def results_json(results: EvaluationResults, data_config: DataConfig) -> dict[str, dict]:
    """`results.to_json()`, each corrupted task's entry saying its corruption (name, severity, seed)."""
    entries = results.to_json()
    for task, spec in data_config.tasks.items():
        if spec.corruption is not None:
            entries[task]["corruption"] = spec.corruption.model_dump()
    return entries


def evaluation_runs(args: argparse.Namespace) -> dict[str, tuple[DataConfig, EvaluationResults]]:
    """Each run's data and results, by its label: one run of the data as DATA.yaml gives it (label ""), or one per
    corruption and severity (`motion_blur-3`), after the clean data (`clean`) with --clean."""
    data_config = load_data_config(args.data)
    runs = {"": data_config}
    if args.corruptions:
        runs = {
            corruption.label if corruption else "clean": with_corruption(data_config, corruption)
            for corruption in args.corruptions
        }
    options = {key: getattr(args, key) for key in ("split", "batch_size", "max_new_tokens", "device", "base")}
    return {label: (data, evaluate(args.model_dir, data, **options)) for label, data in runs.items()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging(args.verbosity)
    try:
        check_writable_outputs(args)
        runs = evaluation_runs(args)
        if args.update_model_card:
            for index, (data_config, results) in enumerate(runs.values()):
                update_model_card(
                    Path(args.model_dir),
                    results,
                    data_config,
                    args.split,
                    push_to_hub=args.push_to_hub,
                    private=args.private,
                    upload=index == len(runs) - 1,
                )
    except (ValueError, OSError) as error:  # expected failures (bad input, files); anything else is a bug
        print(f"wemoe-eval: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    corrupted = any(spec.corruption for data_config, _ in runs.values() for spec in data_config.tasks.values())
    for index, (data_config, results) in enumerate(runs.values()):
        if corrupted:
            print(("\n" if index else "") + corruption_line(data_config))
        print(results_table(results))
    if args.output:
        blocks = {label: results_json(results, data) for label, (data, results) in runs.items()}
        args.output.write_text(json.dumps(blocks if args.corruptions else blocks[""], indent=2))


if __name__ == "__main__":
    main()
