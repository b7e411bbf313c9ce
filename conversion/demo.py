"""`wemoe-demo`: the whole product path on an embedded default, with no Hub access.

Builds a tiny CLIP base and three task experts and saves them as ordinary checkpoints, converts them with a YAML
recipe exactly as `wemoe-convert` does, reloads the artifact through `trust_remote_code` in a `pipeline()` and
classifies a drawn image.
"""

import argparse
import logging
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw
from transformers import pipeline

from .artifact import default_image_processor
from .clip import VARIANTS
from .convert import convert
from .recipe import MergeRecipe
from .toy import build_toy_base, build_toy_expert, toy_tokenizer

DEMO_TASKS = {
    "shapes": ["circle", "square", "triangle"],
    "colors": ["red", "green", "blue", "yellow"],
    "scenes": ["beach", "forest", "city"],
}

EPILOG = """examples:
  wemoe-demo
  wemoe-demo --variant e-wemoe --keep 0.1 --output ./demo-artifact
"""


def draw_demo_image(size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill="red")
    return image


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="wemoe-demo",
        description=__doc__.splitlines()[0] + " Weights are random: the labels show the plumbing, not skill.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--variant", choices=sorted(VARIANTS), default="wemoe", help="WEMoE or E-WEMoE (default: wemoe)."
    )
    parser.add_argument(
        "--keep", type=float, default=0.1, help="E-WEMoE: kept fraction of each task vector (default: 0.1)."
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="Where to write the artifact (default: a temporary directory)."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed for the toy base and experts (default: 0).")
    return parser.parse_args(argv)


def save_toy_checkpoints(workspace: Path, seed: int) -> dict[str, str]:
    """A tiny CLIP base (with tokenizer and image processor) and one expert per demo task, as checkpoint dirs."""
    base = build_toy_base(seed=seed)
    base.save_pretrained(workspace / "base")
    toy_tokenizer().save_pretrained(workspace / "base")
    default_image_processor(base.config.vision_config).save_pretrained(workspace / "base")
    paths = {"base": str(workspace / "base")}
    for i, task in enumerate(DEMO_TASKS):
        build_toy_expert(base, seed=seed + i + 1).save_pretrained(workspace / task)
        paths[task] = str(workspace / task)
    return paths


def run_demo(args: argparse.Namespace) -> list[dict]:
    workspace = Path(tempfile.mkdtemp(prefix="wemoe-demo-"))
    checkpoints = save_toy_checkpoints(workspace, args.seed)
    print(f"Saved a tiny CLIP base and {len(DEMO_TASKS)} toy experts ({', '.join(DEMO_TASKS)}) under {workspace}")

    recipe = MergeRecipe.model_validate(
        {
            "base_model": checkpoints["base"],
            "variant": args.variant,
            "keep": args.keep,
            "tasks": [
                {"name": task, "model": checkpoints[task], "classnames": names} for task, names in DEMO_TASKS.items()
            ],
        }
    )
    (workspace / "recipe.yaml").write_text(recipe.to_yaml())
    output = args.output or workspace / "artifact"
    convert(workspace / "recipe.yaml", output, overwrite=args.output is not None)
    print(f"Converted them with {workspace / 'recipe.yaml'} (as `wemoe-convert` does) into {output}:")
    print(f"  {', '.join(sorted(p.name for p in output.iterdir()))}")

    classifier = pipeline("image-classification", model=str(output), trust_remote_code=True)
    report = classifier.model.parameter_report()
    print(
        f"Reloaded it with trust_remote_code ({type(classifier.model).__name__}, {args.variant}): "
        f"{report['trainable_parameters']:,} trainable (routers) of {report['total_parameters']:,} parameters, "
        f"{report['task_vector_entries']:,} stored task-vector entries"
    )
    predictions = classifier(draw_demo_image(), top_k=3)
    print("Classified a drawn red circle:")
    for prediction in predictions:
        print(f"  {prediction['label']:<20} {prediction['score']:.3f}")
    return predictions


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run_demo(parse_args(argv))


if __name__ == "__main__":
    main()
