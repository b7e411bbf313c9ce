"""`wemoe-demo`: the whole product path on an embedded default, with no Hub access.

Builds a tiny CLIP base, fine-tunes one expert per drawn task for a few seconds and saves them as ordinary
checkpoints, converts them with a YAML recipe as `wemoe-convert` does, adapts the routers on the tasks' held-out
images (unlabeled) as `wemoe-tta` does, scores the experts, task arithmetic (the unadapted merge) and the adapted
WEMoE on those images as `wemoe-eval` does, and classifies a drawn image through `pipeline()` with
`trust_remote_code`. Everything stays in the workspace (the recipe, a `data.yaml`, the checkpoints and artifacts),
and the demo prints the command lines that replay each step with the CLIs.
"""

import argparse
import shlex
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image, ImageDraw
from transformers import pipeline

from ..adaptation import adapt_artifact
from ..backbones.clip import default_image_processor, zero_shot_head
from ..build import VARIANTS
from ..convert import convert
from ..evaluation import evaluate
from ..recipe import MergeRecipe
from ..toy import build_toy_base, toy_tokenizer, train_toy_expert
from . import add_verbosity_flags, configure_logging

DEMO_TASKS = {
    "shapes": ["circle", "square", "triangle"],
    "colors": ["red", "green", "blue", "yellow"],
    "stripes": ["horizontal stripes", "vertical stripes", "diagonal stripes", "checks"],
}
TRAIN_IMAGES_PER_TASK = 96  # labelled: what each expert is fine-tuned on
HELD_OUT_IMAGES_PER_TASK = 48  # what adaptation sees (unlabeled) and every model is scored on
TTA_BATCH_SIZE = 8  # per task; the objective and learning rate are wemoe-tta's defaults (task routing, 3e-3)
WORKSPACE_MARKER = ".wemoe-demo"  # a workspace the demo made, and may replace on the next run

EPILOG = """examples:
  wemoe-demo                                    # workspace ./wemoe-demo
  wemoe-demo --variant e-wemoe --keep 0.1 --tta-steps 40 --workspace /tmp/demo
"""


def draw(task: str, label: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One procedurally drawn image of `label` for a demo task."""
    background = tuple(int(v) for v in rng.integers(200, 256, 3))
    image = Image.new("RGB", (size, size), background)
    canvas = ImageDraw.Draw(image)
    low, high = int(rng.integers(4, size // 4)), int(rng.integers(3 * size // 4, size - 4))
    if task == "shapes":
        box = (low, low, high, high)
        if label == "circle":
            canvas.ellipse(box, fill="black")
        elif label == "square":
            canvas.rectangle(box, fill="black")
        else:
            canvas.polygon([(low, high), (high, high), ((low + high) // 2, low)], fill="black")
    elif task == "colors":
        canvas.rectangle((low, low, high, high), fill=label)
    else:
        for offset in range(-size, size, 8):
            lines = {
                "horizontal stripes": [[(0, offset), (size, offset)]],
                "vertical stripes": [[(offset, 0), (offset, size)]],
                "diagonal stripes": [[(offset, 0), (offset + size, size)]],
                "checks": [[(0, offset), (size, offset)], [(offset, 0), (offset, size)]],
            }[label]
            for line in lines:
                canvas.line(line, fill="black", width=3)
    return image


def drawn_images(task: str, count: int, rng: np.random.Generator) -> tuple[list[Image.Image], list[int]]:
    """`count` drawn images of a task, its classes in turn, and their class indices."""
    labels = DEMO_TASKS[task]
    targets = [i % len(labels) for i in range(count)]
    return [draw(task, labels[target], rng) for target in targets], targets


def write_demo_data(workspace: Path, seed: int) -> dict:
    """Each task's held-out images (parquet, labels included for scoring), and the DATA.yaml content naming them."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    rng = np.random.default_rng(seed + 1)  # other images than the experts' training images
    tasks = {}
    for task, labels in DEMO_TASKS.items():
        images, targets = drawn_images(task, HELD_OUT_IMAGES_PER_TASK, rng)
        features = Features({"image": ImageFeature(), "label": ClassLabel(names=labels)})
        Dataset.from_dict({"image": images, "label": targets}, features=features).to_parquet(
            workspace / f"{task}.parquet"
        )
        tasks[task] = {"path": "parquet", "data_files": str(workspace / f"{task}.parquet"), "split": "train"}
    return {"tasks": tasks}


def prepare_workspace(workspace: Path) -> None:
    """An empty workspace; one left by an earlier demo run (it has the marker) is replaced, anything else kept."""
    if workspace.exists():
        if not (workspace / WORKSPACE_MARKER).is_file():
            raise SystemExit(
                f"wemoe-demo: error: {workspace} exists and was not made by wemoe-demo; pass another --workspace."
            )
        shutil.rmtree(workspace)
    workspace.mkdir(parents=True)
    (workspace / WORKSPACE_MARKER).touch()


def replay_commands(workspace: Path, args: argparse.Namespace) -> list[str]:
    """The CLI lines that redo the demo's conversion, adaptation and evaluations from its workspace."""
    merged, adapted, data = workspace / "merged", workspace / "adapted", workspace / "data.yaml"
    tta = {"--steps": args.tta_steps, "--batch-size": TTA_BATCH_SIZE, "--seed": args.seed}
    tta_options = [str(word) for option in tta.items() for word in option]
    lines = [
        ["wemoe-convert", workspace / "recipe.yaml", merged, "--overwrite"],
        ["wemoe-tta", merged, data, "--output", adapted, *tta_options, "--overwrite"],
        ["wemoe-eval", merged, data],
        ["wemoe-eval", adapted, data],
    ]
    return [shlex.join(str(word) for word in line) for line in lines]


def save_toy_checkpoints(workspace: Path, seed: int, expert_steps: int) -> dict[str, str]:
    """A tiny CLIP base (with tokenizer and image processor), and one expert per demo task fine-tuned on its drawn
    training images, as checkpoint dirs."""
    base, tokenizer = build_toy_base(seed=seed), toy_tokenizer()
    image_processor = default_image_processor(base.config.vision_config)
    for part in (base, tokenizer, image_processor):
        part.save_pretrained(workspace / "base")
    paths = {"base": str(workspace / "base")}
    rng = np.random.default_rng(seed)
    for i, (task, classes) in enumerate(DEMO_TASKS.items()):
        images, targets = drawn_images(task, TRAIN_IMAGES_PER_TASK, rng)
        pixel_values = image_processor(images=images, return_tensors="pt")["pixel_values"]
        head = zero_shot_head(base, tokenizer, classes)
        expert = train_toy_expert(base, pixel_values, torch.tensor(targets), head, expert_steps, seed=seed + i)
        expert.save_pretrained(workspace / task)
        paths[task] = str(workspace / task)
    return paths


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="wemoe-demo",
        description="Run the whole product path (fine-tune toy experts, convert, adapt, evaluate, reload with "
        "trust_remote_code) on a tiny embedded default, with no Hub access, in about a minute.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--variant", choices=sorted(VARIANTS), default="wemoe", help="WEMoE or E-WEMoE (default: wemoe)."
    )
    parser.add_argument(
        "--keep", type=float, default=0.1, help="E-WEMoE: kept fraction of each task vector (default: 0.1)."
    )
    parser.add_argument("--tta-steps", type=int, default=60, help="Test-time adaptation steps (default: 60).")
    parser.add_argument(
        "--expert-steps", type=int, default=400, help="Fine-tuning steps of each toy expert (default: 400)."
    )
    parser.add_argument(
        "--workspace",
        type=Path,
        default=Path("wemoe-demo"),
        help="Directory for everything the demo writes; replaced if an earlier demo run made it (default: "
        "./wemoe-demo).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed for the toy models and drawn data (default: 0).")
    add_verbosity_flags(parser)
    return parser.parse_args(argv)


def run_demo(args: argparse.Namespace) -> list[dict]:
    workspace = args.workspace
    prepare_workspace(workspace)
    checkpoints = save_toy_checkpoints(workspace, args.seed, args.expert_steps)
    data = workspace / "data.yaml"
    data.write_text(yaml.safe_dump(write_demo_data(workspace, args.seed), sort_keys=False))
    print(
        f"Saved a tiny CLIP base and {len(DEMO_TASKS)} experts, each fine-tuned for {args.expert_steps} steps on "
        f"{TRAIN_IMAGES_PER_TASK} drawn images of its task, and {HELD_OUT_IMAGES_PER_TASK} held-out images per task "
        f"({workspace / 'data.yaml'}) under {workspace}"
    )

    recipe = MergeRecipe.model_validate(
        {
            "base_model": checkpoints["base"],
            "variant": args.variant,
            "keep": args.keep,
            "tasks": [{"name": t, "model": checkpoints[t], "classnames": names} for t, names in DEMO_TASKS.items()],
        }
    )
    (workspace / "recipe.yaml").write_text(recipe.to_yaml())
    merged = convert(workspace / "recipe.yaml", workspace / "merged")
    print(f"Converted them with {workspace / 'recipe.yaml'} (as `wemoe-convert` does) into {merged}")

    output = workspace / "adapted"
    adapt_artifact(merged, data, output, steps=args.tta_steps, seed=args.seed, batch_size=TTA_BATCH_SIZE)
    print(
        f"Adapted the routers for {args.tta_steps} steps on the held-out images, unlabeled, by task routing "
        f"(as `wemoe-tta` does) into {output}"
    )
    print_scores(data, checkpoints, merged, output)

    classifier = pipeline("image-classification", model=str(output), trust_remote_code=True)
    report = classifier.model.parameter_report()
    print(
        f"Reloaded it with trust_remote_code ({type(classifier.model).__name__}, {args.variant}): "
        f"{report['trainable_parameters']:,} trainable (routers) of {report['total_parameters']:,} parameters, "
        f"{report['task_vector_entries']:,} stored task-vector entries"
    )
    circle = draw("shapes", "circle", np.random.default_rng(args.seed))
    predictions = classifier(circle, task="shapes")
    print("Classified a drawn circle as a `shapes` image (scores over that task's classes):")
    for prediction in predictions:
        print(f"  {prediction['label']:<28} {prediction['score']:.3f}")
    print("and with no task given, each task's best class:")
    for prediction in classifier(circle):
        print(f"  {prediction['task'] + ':':<10} {prediction['label']:<17} {prediction['score']:.3f}")
    print("Replay each step with the command-line tools:")
    for line in replay_commands(workspace, args):
        print(f"  {line}")
    return predictions


def print_scores(data: Path, checkpoints: dict[str, str], merged: Path, adapted: Path) -> None:
    """Each expert on its own task, task arithmetic (the unadapted merge) and the adapted model, on the held-out
    images, as `wemoe-eval` scores them."""
    specs = yaml.safe_load(data.read_text())["tasks"]
    experts = {
        task: evaluate(checkpoints[task], {"tasks": {task: specs[task]}}, base=checkpoints["base"])[task]
        for task in DEMO_TASKS
    }
    before, after = evaluate(merged, data), evaluate(adapted, data)
    experts["average"] = sum(experts.values()) / len(experts)
    chance = {task: 1 / len(classes) for task, classes in DEMO_TASKS.items()}
    chance["average"] = sum(chance.values()) / len(chance)
    print("Accuracy on the held-out images (as `wemoe-eval` computes it):")
    print(f"  {'task':<10} {'chance':>7} {'expert':>7} {'task arithmetic':>16} {'adapted WEMoE':>14}")
    for task in [*DEMO_TASKS, "average"]:
        print(f"  {task:<10} {100 * chance[task]:7.1f} {100 * experts[task]:7.1f} {100 * before[task]:16.1f} "
              f"{100 * after[task]:14.1f}")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging(args.verbosity)
    run_demo(args)


if __name__ == "__main__":
    main()
