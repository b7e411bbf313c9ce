"""`wemoe-demo`: the whole product path on an embedded default, with no Hub access.

Builds a tiny CLIP base and three task experts in-process, merges them into a WEMoE model, saves the artifact,
reloads it through `trust_remote_code` in a `pipeline()` and classifies a drawn image.
"""

import argparse
import logging
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw
from transformers import pipeline

from .artifact import default_image_processor, save_artifact
from .clip import VARIANTS, merge_clip
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


def run_demo(args: argparse.Namespace) -> list[dict]:
    base = build_toy_base(seed=args.seed)
    experts = {task: build_toy_expert(base, seed=args.seed + i + 1) for i, task in enumerate(DEMO_TASKS)}
    print(f"Built a tiny CLIP base and {len(experts)} toy experts: {', '.join(experts)}")

    model = merge_clip(base, experts, DEMO_TASKS, variant=args.variant, keep=args.keep, tokenizer=toy_tokenizer())
    report = model.parameter_report()
    print(
        f"Merged into {args.variant}: {report['trainable_parameters']:,} trainable (routers) of "
        f"{report['total_parameters']:,} parameters, {report['task_vector_entries']:,} stored task-vector entries"
    )

    output = args.output or Path(tempfile.mkdtemp(prefix="wemoe-demo-")) / "artifact"
    save_artifact(model, output, default_image_processor(base.config.vision_config), overwrite=args.output is not None)
    print(f"Saved the artifact to {output}: {', '.join(sorted(p.name for p in output.iterdir()))}")

    classifier = pipeline("image-classification", model=str(output), trust_remote_code=True)
    predictions = classifier(draw_demo_image(), top_k=3)
    print(f"Reloaded it with trust_remote_code ({type(classifier.model).__name__}) and classified a drawn red circle:")
    for prediction in predictions:
        print(f"  {prediction['label']:<20} {prediction['score']:.3f}")
    return predictions


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run_demo(parse_args(argv))


if __name__ == "__main__":
    main()
