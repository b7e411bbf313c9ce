"""Converting a recipe into an artifact: a base model and fine-tuned checkpoints (full or LoRA) to a WEMoE artifact
ready for the Hub, or to a static baseline; the library behind `wemoe-convert` (`conversion.cli.convert`).

The recipe is validated before anything is loaded; the artifact is staged beside its destination and renamed into
place only when complete (`conversion.outputs`), so a failed conversion leaves nothing behind.
"""

import os
from pathlib import Path

import torch

from .artifact import check_max_shard_size, write_artifact
from .backbones import Backbone, get_backbone
from .checkpoints import load_tokenizer
from .data import data_inputs, open_dataset
from .merge import merge, merge_static
from .model_card import render_model_card
from .outputs import push_folder, staged_output
from .recipe import DatasetSource, MergeOptions, MergeRecipe, check_recipe_sources, load_recipe, recipe_inputs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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
        push_folder(Path(output_dir), push_to_hub, "Upload WEMoE model", private=private)
    return Path(output_dir)


def recipe_classnames(recipe: MergeRecipe) -> dict[str, list[str]]:
    """Each task's labels as the recipe gives them: listed, or a dataset's ClassLabel names."""
    return {
        task.name: task.classnames if task.classnames is not None else dataset_classnames(task.dataset, task.name)
        for task in recipe.tasks
        if task.classnames is not None or task.dataset is not None
    }


def build_artifact(recipe: MergeRecipe, directory: Path, dtype: str, max_shard_size: str | int, repo_id: str | None):
    """Merge what the recipe names and write the artifact into `directory` (a staging directory)."""
    backbone = get_backbone(recipe.architecture)
    classnames = recipe_classnames(recipe)
    experts = {task.name: task.model for task in recipe.tasks}
    templates = {task.name: task.templates for task in recipe.tasks if task.templates}
    if recipe.variant == "static":
        convert_static(backbone, recipe, classnames, experts, templates, directory, dtype, max_shard_size)
        return
    options = {name: getattr(recipe, name) for name in MergeOptions.model_fields}
    model = merge(backbone, recipe.base_model, experts, classnames or None, templates=templates, **options)
    model = model.to(DTYPES[dtype])
    card = render_model_card(model, recipe, backbone, repo_id=repo_id)
    write_artifact(
        model,
        directory,
        backbone.load_processor(recipe.base_model),
        extra_files={"README.md": str(card), "merge_config.yaml": recipe.to_yaml()},
        max_shard_size=max_shard_size,
    )


def convert_static(
    backbone: Backbone,
    recipe: MergeRecipe,
    classnames: dict[str, list[str]],
    experts: dict[str, str],
    templates: dict[str, list[str]],
    directory: Path,
    dtype: str,
    max_shard_size: str | int,
) -> None:
    """`variant: static`: plain models of the base's family, merged by the recipe's static method alone."""
    static_merge = recipe.static_merge.model_dump()
    tokenizer = load_tokenizer(recipe.base_model) if backbone.needs_tokenizer else None
    static = merge_static(
        backbone,
        recipe.base_model,
        experts,
        static_merge,
        classnames=classnames or None,
        data=static_merge.get("data"),
        processor=backbone.load_processor(recipe.base_model),
        tokenizer=tokenizer,
        templates=templates,
    )
    backbone.write_static(
        static,
        directory,
        backbone.static_processor(recipe.base_model, tokenizer),
        extra_files={"merge_config.yaml": recipe.to_yaml()},
        max_shard_size=max_shard_size,
        dtype=DTYPES[dtype],
    )


__all__ = ["DTYPES", "convert"]
