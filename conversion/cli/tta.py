"""`wemoe-tta`: test-time adaptation of a WEMoE artifact's routers on unlabeled task data, on accelerate.

Launchable unchanged with `accelerate launch` (GPUs) or `torchrun` (CPU: `ACCELERATE_USE_CPU=true`) on several
processes; `wemoe.adaptation` holds the library it runs.
"""

import argparse
import sys
from pathlib import Path

from accelerate import PartialState

from ..adaptation import ADAPTATION_ROUTINGS, LR_SCHEDULES, adapt_artifact
from ..streams import DEFAULT_OBJECTIVE, OBJECTIVES
from . import add_corruption_flags, add_verbosity_flags, configure_logging, corruptions_from_args, error_message

EPILOG = """example DATA.yaml (labels are never read):
  tasks:
    eurosat: {path: tanganke/eurosat, split: test, image_column: image}
    shapes: {path: imagefolder, data_dir: ./data/shapes, split: train}
  for a T5 artifact:
  tasks:
    sst2: {path: glue, config_name: sst2, split: validation, text_column: sentence, prefix: "sst2 sentence: "}

examples:
  wemoe-tta ./clip-b32-ewemoe-8task data.yaml --output ./clip-b32-ewemoe-8task-tta
  wemoe-tta ./model data.yaml --output ./adapted --steps 2000 --checkpointing-steps 200 --resume
  wemoe-tta ./model data.yaml --output ./adapted --push-to-hub my-org/clip-b32-wemoe-8task-tta --private
  wemoe-tta ./model data.yaml --output ./adapted --checkpointing-steps 200 --keep-checkpoints 1
  wemoe-tta ./model data.yaml --output ./adapted --steps 250                          # task routing, lr 3e-3
  wemoe-tta ./model data.yaml --output ./adapted --objective label-words --lr 1e-4    # the paper's entropy
  wemoe-tta ./t5-model data.yaml --output ./adapted --objective label-words-and-rest   # T5: count off-label mass
  wemoe-tta ./model data.yaml --output ./adapted --objective label-words --adaptation-routing batch --lr-schedule cosine
                                                                         # the reference implementation's protocol
  wemoe-tta ./model data.yaml --output ./adapted-blur --corruption motion_blur --severity 3   # on corrupted images
  accelerate launch --num_processes 4 -m wemoe.cli.tta ./model data.yaml --output ./adapted --mixed-precision bf16
  ACCELERATE_USE_CPU=true torchrun --standalone --nproc_per_node 2 -m wemoe.cli.tta ./model data.yaml --output ./a
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="wemoe-tta",
        description="Adapt a WEMoE artifact's routers at test time on unlabeled task data (task routing, or the "
        "paper's entropy minimisation), on one process or many with accelerate.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model_dir", help="WEMoE artifact to adapt (local directory or Hub id).")
    parser.add_argument("data", type=Path, help="DATA.yaml: a datasets.load_dataset spec per task.")
    parser.add_argument("--output", required=True, type=Path, help="Directory for the adapted artifact.")
    parser.add_argument("--steps", type=int, default=1000, help="Optimizer steps (default: 1000).")
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="Adam learning rate (default: the objective's: 3e-3 for task-routing, the paper's 1e-4 for the others).",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="Global batch size per task (default: 16).")
    parser.add_argument("--seed", type=int, default=0, help="Seed for data order and router init (default: 0).")
    parser.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default=DEFAULT_OBJECTIVE,
        help="What adaptation minimises. task-routing (default): every layer's routing weights pulled toward the "
        "expert of the task whose data the input came from (raw routing: that expert at 1, the others at 0, and an "
        "expert-less task's inputs at 0, the base; softmax routing: cross-entropy to that expert); at inference the "
        "routers still route each input on their own. label-words (the paper's): the entropy of each task's "
        "classes, or of a T5's label words at the first decoding step; label-words-and-rest (T5 only) adds one bin "
        "holding the probability of every other token, so that mass outside the label words is penalised too.",
    )
    parser.add_argument(
        "--entropy-weight",
        type=float,
        default=0.0,
        metavar="W",
        help="With --objective task-routing: add W times the paper's entropy to the loss (default: 0).",
    )
    parser.add_argument(
        "--adaptation-routing",
        choices=ADAPTATION_ROUTINGS,
        default=ADAPTATION_ROUTINGS[0],
        help="sample (default): route every input on its own, as the model serves. batch: merge one weight per task "
        "batch from its mean routing weights, the reference implementation's adaptation mode (faster per step; one "
        "process). Serving routes each sample either way.",
    )
    parser.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        default=LR_SCHEDULES[0],
        help="constant (default), or cosine: decay the learning rate to 0 over --steps (the authors' script).",
    )
    parser.add_argument(
        "--checkpointing-steps", type=int, default=100, help="Save a checkpoint every N steps (default: 100)."
    )
    parser.add_argument("--checkpoint-dir", default=None, help="Where checkpoints go (default: OUTPUT.checkpoints).")
    parser.add_argument(
        "--keep-checkpoints",
        type=int,
        default=None,
        metavar="N",
        help="Keep only the N newest checkpoints, deleting older ones as new ones are written, as transformers' "
        "save_total_limit (default: keep all). The newest is what --resume continues from.",
    )
    parser.add_argument("--resume", action="store_true", help="Continue from the latest checkpoint.")
    parser.add_argument(
        "--mixed-precision", choices=["no", "bf16", "fp16"], default="no", help="Autocast (default: no)."
    )
    parser.add_argument(
        "--report-to", default=None, help="An accelerate tracker (tensorboard, wandb, ...) for the loss."
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace OUTPUT if it exists.")
    parser.add_argument("--push-to-hub", metavar="ORG/NAME", help="Upload the adapted artifact to this Hub repo.")
    parser.add_argument("--private", action="store_true", help="Create the Hub repo as private.")
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="Run on the CPU even where a GPU is present (as `accelerate launch --cpu`; default: the device "
        "accelerate gives each process, a GPU when there is one).",
    )
    add_corruption_flags(parser, repeatable=False)
    add_verbosity_flags(parser)
    args = parser.parse_args(argv)
    corruptions = corruptions_from_args(parser, args)
    if len(corruptions) > 1:
        parser.error("wemoe-tta adapts on one corruption at one severity; give --corruption and --severity once.")
    # One option for adapt_artifact in place of the three flags.
    args.corruption = corruptions[0] if corruptions else None
    del args.severity, args.corruption_seed
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging(vars(args).pop("verbosity"))  # popped: the other arguments are adapt_artifact's options
    try:
        options = {key: value for key, value in vars(args).items() if key not in ("model_dir", "data", "output")}
        output = adapt_artifact(args.model_dir, args.data, args.output, **options)
    except (ValueError, OSError) as error:  # expected failures (bad input, files); anything else is a bug
        print(f"wemoe-tta: error: {error_message(error)}", file=sys.stderr)
        raise SystemExit(1) from None
    if PartialState().is_main_process:
        print(f"Wrote {output}")


if __name__ == "__main__":
    main()
