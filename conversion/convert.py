"""`wemoe-convert`: a base model and fine-tuned checkpoints (full or LoRA) to a WEMoE artifact ready for the Hub.

The recipe is validated before anything is loaded; the artifact is written to a temporary directory and renamed
into place only when complete, so a failed conversion leaves nothing behind.
"""

import argparse
import logging
import os
import sys
import textwrap
from pathlib import Path

import torch
from huggingface_hub import HfApi
from transformers import AutoConfig, CLIPProcessor

from .artifact import check_max_shard_size, load_image_processor, write_artifact
from .checkpoints import load_tokenizer
from .clip import merge_clip, merge_static_clip
from .data import data_inputs, open_dataset
from .model_card import render_model_card
from .outputs import staged_output
from .recipe import (
    EXAMPLE_RECIPE,
    EXAMPLE_T5_RECIPE,
    DatasetSource,
    MergeRecipe,
    check_recipe_sources,
    load_recipe,
    recipe_inputs,
)
from .t5 import merge_static_t5, merge_t5

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

EPILOG = (
    "example recipe (clip-8task.yaml):\n"
    + textwrap.indent(EXAMPLE_RECIPE, "  ")
    + "\nexample T5 recipe (flan-t5-glue.yaml):\n"
    + textwrap.indent(EXAMPLE_T5_RECIPE, "  ")
    + """
examples:
  wemoe-convert clip-8task.yaml ./clip-b32-ewemoe-8task
  wemoe-convert flan-t5-glue.yaml ./flan-t5-base-wemoe-glue
  wemoe-convert baseline.yaml ./clip-adamerging   # variant: static, static_merge: {method: adamerging, data: ...}
  wemoe-convert clip-8task.yaml ./out --dtype bfloat16 --push-to-hub my-org/clip-b32-ewemoe-8task --private
"""
)


def dataset_classnames(spec: DatasetSource, task: str) -> list[str]:
    """Class names from a `datasets` ClassLabel column."""
    from datasets import ClassLabel

    dataset = open_dataset(task, spec)
    if spec.label_column not in dataset.features:
        raise ValueError(
            f"Task {task!r}: dataset {spec.path!r} has no column {spec.label_column!r}; "
            f"columns: {list(dataset.features)}."
        )
    feature = dataset.features[spec.label_column]
    if not isinstance(feature, ClassLabel):
        raise ValueError(
            f"Task {task!r}: column {spec.label_column!r} of {spec.path!r} is {feature!r}, not a ClassLabel; "
            "give `classnames` instead."
        )
    return list(feature.names)


def push_artifact(folder: Path, repo_id: str, private: bool) -> str:
    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(
        folder_path=folder, repo_id=repo_id, repo_type="model", commit_message="Upload WEMoE model"
    )
    logger.info("Pushed %s to %s", folder, repo_id)
    return commit.commit_url


def convert(
    recipe: MergeRecipe | dict | str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    max_shard_size: str | int = "5GB",
    push_to_hub: str | None = None,
    private: bool = False,
    overwrite: bool = False,
) -> Path:
    """Build a WEMoE artifact from a recipe (a `MergeRecipe`, a dict, or a YAML path) into `output_dir`.

    Args:
        recipe: what to merge; see `conversion.recipe.MergeRecipe`.
        output_dir: the artifact directory; must not exist unless `overwrite`.
        dtype: storage dtype of the weights, `"float32"` or `"bfloat16"` (merging itself runs in float32).
        max_shard_size: safetensors shard size, as for `save_pretrained`.
        push_to_hub: `org/name` of a Hub model repo to upload the artifact to.
        private: create that repo private.
        overwrite: replace an existing `output_dir`.

    Returns:
        The artifact directory.
    """
    recipe_path = recipe if isinstance(recipe, (str, os.PathLike)) else None
    recipe = load_recipe(recipe)
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}.")
    check_max_shard_size(max_shard_size)
    check_recipe_sources(recipe)
    inputs = [recipe_path, *recipe_inputs(recipe)]
    if recipe.static_merge.method == "adamerging":
        inputs += data_inputs(recipe.static_merge.data)
    with staged_output(output_dir, overwrite=overwrite, inputs=inputs) as staging:
        build_artifact(recipe, staging, dtype, max_shard_size, push_to_hub)
    if push_to_hub:
        push_artifact(Path(output_dir), push_to_hub, private)
    return Path(output_dir)


def build_artifact(recipe: MergeRecipe, directory: Path, dtype: str, max_shard_size: str | int, repo_id: str | None):
    """Merge what the recipe names and write the artifact into `directory` (a staging directory)."""
    classnames = {
        task.name: task.classnames if task.classnames is not None else dataset_classnames(task.dataset, task.name)
        for task in recipe.tasks
        if task.classnames is not None or task.dataset is not None
    }
    experts = {task.name: task.model for task in recipe.tasks}
    if recipe.variant == "static":
        convert_static(recipe, classnames, experts, directory, dtype, max_shard_size)
        return
    options = {
        "variant": recipe.variant,
        "keep": recipe.keep,
        "expert_format": recipe.expert_format,
        "rank": recipe.rank,
        "init_lambda": recipe.router.init_lambda,
        "router_hidden_layers": recipe.router.hidden_layers,
        "router_top_k": recipe.router.top_k,
        "granularity": recipe.router.granularity,
        "static_merge": recipe.static_merge.model_dump(),
    }
    if recipe.architecture == "t5":
        model = merge_t5(recipe.base_model, experts, label_words=classnames or None, **options)
        processor = load_tokenizer(recipe.base_model)
    else:
        templates = {task.name: task.templates for task in recipe.tasks if task.templates}
        model = merge_clip(recipe.base_model, experts, classnames, templates=templates, **options)
        processor = load_image_processor(recipe.base_model, model.config.vision_config)
    model = model.to(DTYPES[dtype])
    card = render_model_card(model, recipe, repo_id=repo_id)
    write_artifact(
        model,
        directory,
        processor,
        extra_files={"README.md": str(card), "merge_config.yaml": recipe.to_yaml()},
        max_shard_size=max_shard_size,
    )


def convert_static(
    recipe: MergeRecipe,
    classnames: dict[str, list[str]],
    experts: dict[str, str],
    directory: Path,
    dtype: str,
    max_shard_size: str | int,
) -> None:
    """`variant: static`: a plain model of the base's class (CLIPModel or T5ForConditionalGeneration), merged by the
    recipe's static method, with the base's processor."""
    static_merge = recipe.static_merge.model_dump()
    data = static_merge.pop("data", None)
    tokenizer = load_tokenizer(recipe.base_model)
    if recipe.architecture == "t5":
        model = merge_static_t5(
            recipe.base_model, experts, static_merge, label_words=classnames or None, data=data, tokenizer=tokenizer
        )
        processor = tokenizer
    else:
        image_processor = load_image_processor(
            recipe.base_model, AutoConfig.from_pretrained(recipe.base_model).vision_config
        )
        model = merge_static_clip(
            recipe.base_model,
            experts,
            static_merge,
            classnames=classnames,
            data=data,
            image_processor=image_processor,
            tokenizer=tokenizer,
            templates={task.name: task.templates for task in recipe.tasks if task.templates},
        )
        processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    write_artifact(
        model.to(DTYPES[dtype]),
        directory,
        processor,
        extra_files={"merge_config.yaml": recipe.to_yaml()},
        max_shard_size=max_shard_size,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="wemoe-convert",
        description=__doc__.splitlines()[0].removeprefix("`wemoe-convert`: "),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", type=Path, help="YAML recipe: base model, variant, router, tasks with their models.")
    parser.add_argument("output_dir", type=Path, help="Directory to write the artifact to (must not exist).")
    parser.add_argument("--push-to-hub", metavar="ORG/NAME", help="Upload the finished artifact to this Hub repo.")
    parser.add_argument("--private", action="store_true", help="Create the Hub repo as private.")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="Storage dtype (default: float32).")
    parser.add_argument("--max-shard-size", default="5GB", help="Safetensors shard size (default: 5GB).")
    parser.add_argument("--overwrite", action="store_true", help="Replace OUTPUT_DIR if it exists.")
    parser.add_argument("-v", "--verbose", action="store_true", help="Log what is loaded and merged.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("conversion").setLevel(logging.INFO)  # what was merged, and low-rank errors per layer
    try:
        output = convert(
            args.config,
            args.output_dir,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            push_to_hub=args.push_to_hub,
            private=args.private,
            overwrite=args.overwrite,
        )
    except (ValueError, OSError) as error:  # expected failures (bad input, files); anything else is a bug
        print(f"wemoe-convert: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"Wrote {output}")


if __name__ == "__main__":
    main()
