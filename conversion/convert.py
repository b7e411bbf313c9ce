"""Converting a recipe into an artifact: a base model and fine-tuned checkpoints (full or LoRA) to a WEMoE artifact
ready for the Hub, or to a static baseline; the library behind `wemoe-convert` (`wemoe.cli.convert`).

The recipe is validated before anything is loaded; the artifact is staged beside its destination and renamed into
place only when complete (`wemoe.outputs`), so a failed conversion leaves nothing behind. `plan_conversion`
makes the same checks from metadata alone and says what a conversion would build (`wemoe-convert --dry-run`).
"""

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .artifact import check_max_shard_size, write_artifact
from .backbones import Backbone, get_backbone
from .build import wemoe_config_options
from .checkpoints import (
    CheckpointTensors,
    check_matching_tensors,
    load_tokenizer,
    metadata_only,
    resolve_checkpoint_dir,
)
from .data import data_inputs, open_dataset
from .merge import MergeInputs, merge, open_inputs, wemoe_config
from .model_card import render_model_card
from .outputs import check_output_target, push_folder, staged_output
from .recipe import (
    RECIPE_FILE,
    DatasetSource,
    MergeOptions,
    MergeRecipe,
    check_recipe_sources,
    load_recipe,
    recipe_file_text,
    recipe_inputs,
)

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
        recipe: what to merge; see `wemoe.recipe.MergeRecipe`.
        output_dir: the artifact directory; must not exist unless `overwrite`.
        dtype: storage dtype of the weights, `"float32"` or `"bfloat16"` (merging itself runs in float32).
        max_shard_size: safetensors shard size, as for `save_pretrained`.
        push_to_hub: `org/name` of a Hub model repo to upload the artifact to.
        private: create that repo private.
        overwrite: replace an existing `output_dir`.

    Returns:
        The artifact directory.
    """
    recipe, inputs = checked_recipe(recipe, dtype, max_shard_size)
    with staged_output(output_dir, overwrite=overwrite, inputs=inputs) as staging:
        build_artifact(recipe, staging, dtype, max_shard_size, push_to_hub)
    if push_to_hub:
        push_folder(Path(output_dir), push_to_hub, "Upload WEMoE model", private=private)
    return Path(output_dir)


def checked_recipe(
    recipe: MergeRecipe | dict | str | os.PathLike, dtype: str, max_shard_size: str | int
) -> tuple[MergeRecipe, list]:
    """The recipe validated with the run options, its sources checked, and the local paths it reads (which an output
    must never be): every check that comes before anything is opened."""
    recipe_path = recipe if isinstance(recipe, (str, os.PathLike)) else None
    recipe = load_recipe(recipe)
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}.")
    check_max_shard_size(max_shard_size)
    check_recipe_sources(recipe)
    inputs = [recipe_path, *recipe_inputs(recipe)]
    if recipe.static_merge.method == "adamerging":
        inputs += data_inputs(recipe.static_merge.data)
    return recipe, inputs


def recipe_experts(recipe: MergeRecipe) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Each expert (the tasks with a `model`), and every task's prompt templates where it gives them."""
    experts = {task.name: task.model for task in recipe.expert_tasks}
    return experts, {task.name: task.templates for task in recipe.tasks if task.templates}


def recipe_tasks(recipe: MergeRecipe) -> list[str]:
    """Every task's name, in order: the tasks without a `model` are the artifact's tasks without an expert."""
    return [task.name for task in recipe.tasks]


def recipe_classnames(recipe: MergeRecipe) -> dict[str, list[str]]:
    """Each task's labels as the recipe gives them: listed, or a dataset's ClassLabel names."""
    return {
        task.name: task.classnames if task.classnames is not None else dataset_classnames(task.dataset, task.name)
        for task in recipe.tasks
        if task.classnames is not None or task.dataset is not None
    }


def build_artifact(recipe: MergeRecipe, directory: Path, dtype: str, max_shard_size: str | int, repo_id: str | None):
    """Merge what the recipe names, as its variant says, and write the artifact into `directory` (a staging
    directory): a WEMoE model with its card, or the static baseline's plain model(s)."""
    backbone = get_backbone(recipe.architecture)
    experts, templates = recipe_experts(recipe)
    processor = backbone.load_processor(recipe.base_model)
    tokenizer = load_tokenizer(recipe.base_model) if backbone.needs_tokenizer else None
    options = {name: getattr(recipe, name) for name in MergeOptions.model_fields}
    merged = merge(backbone, recipe.base_model, experts, recipe_classnames(recipe) or None, tokenizer=tokenizer,
                   templates=templates, tasks=recipe_tasks(recipe), processor=processor, **options)  # fmt: skip
    files = {RECIPE_FILE: recipe_file_text(recipe)}
    if recipe.variant == "static":
        backbone.write_static(merged, directory, backbone.static_processor(recipe.base_model, tokenizer),
                              extra_files=files, max_shard_size=max_shard_size, dtype=DTYPES[dtype])  # fmt: skip
        return
    model = merged.to(DTYPES[dtype])
    files["README.md"] = str(render_model_card(model, recipe, backbone, repo_id=repo_id))
    write_artifact(model, directory, processor, extra_files=files, max_shard_size=max_shard_size)


# A dry run does not open datasets: a task whose labels come from one is planned with this one stand-in label where
# the family needs labels to build the model (its heads' size is all it decides, a few KiB per class).
DATASET_LABEL = "(from the dataset)"


def format_size(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def tensor_bytes(module: torch.nn.Module, dtype: torch.dtype) -> int:
    """Bytes of a module's saved tensors (each shared tensor once), floating-point ones stored as `dtype`."""
    tensors = {id(tensor): tensor for tensor in module.state_dict(keep_vars=True).values()}.values()
    return sum(
        tensor.numel() * (dtype.itemsize if tensor.is_floating_point() else tensor.element_size())
        for tensor in tensors
    )


@dataclass
class ConversionPlan:
    """What `convert` would build from a recipe, worked out from configs and tensor headers alone.

    Attributes:
        recipe: the validated recipe.
        base: the base model and its family, in words.
        experts: every task -> (its expert's source, what kind of checkpoint it is, its labels in words); a task
            without an expert says so.
        artifact: the model class the artifact holds, and `artifact_bytes` its weights' size in `dtype`.
        memory: the parts of the conversion's peak memory, in bytes, by what they hold.
        output: the output directory, checked to be writable, if one was given.
    """

    recipe: MergeRecipe
    base: str
    experts: dict[str, tuple[str, str, str]]
    artifact: str
    artifact_bytes: int
    dtype: str
    memory: dict[str, int]
    output: str | None = None

    def __str__(self) -> str:
        recipe = self.recipe
        static = recipe.static_merge.model_dump(exclude={"method"})
        options = ", ".join(f"{name} {value}" for name, value in static.items())
        lines = [
            f"Variant: {recipe.variant}"
            + (f" (keep {recipe.keep:g})" if recipe.variant == "e-wemoe" else "")
            + (f"; experts: {' and '.join(recipe.upscale)}" if recipe.variant != "static" else "")
            + f"; static merge: {recipe.static_merge.method} ({options})",
            f"Base model: {self.base}",
            f"Tasks ({len(self.experts)}):",
            *(
                f"  {task}: {source}\n      {kind}; {labels}"
                for task, (source, kind, labels) in self.experts.items()
            ),
            f"Artifact: {self.artifact}"
            + (" with merged weights (size per model written)" if recipe.variant == "static" else "")
            + f", weights about {format_size(self.artifact_bytes)} in {self.dtype}",
            f"Peak memory: about {format_size(sum(self.memory.values()))} above the Python process itself ("
            + ", ".join(f"{part} {format_size(size)}" for part, size in self.memory.items())
            + ")",
        ]
        if self.output:
            lines.append(f"Output: {self.output} (can be written)")
        return "\n".join(lines)


def plan_conversion(
    recipe: MergeRecipe | dict | str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    *,
    dtype: str = "float32",
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
) -> ConversionPlan:
    """Check a recipe as `convert` would, opening only configs and tensor headers (a Hub checkpoint's read remotely,
    no weights downloaded), and say what it would build; nothing is written. Datasets are not opened.

    The arguments are `convert`'s; `output_dir` is optional, and checked (not written) when given.
    """
    recipe, inputs = checked_recipe(recipe, dtype, max_shard_size)
    if output_dir is not None:
        check_output_target(Path(output_dir), overwrite, inputs)
    backbone = get_backbone(recipe.architecture)
    experts, templates = recipe_experts(recipe)
    classnames = {task.name: task.classnames for task in recipe.tasks if task.classnames is not None}
    if backbone.labels_required:
        classnames |= {task.name: [DATASET_LABEL] for task in recipe.tasks if task.dataset is not None}
    with metadata_only():
        opened = open_inputs(backbone, recipe.base_model, experts, classnames, templates, recipe_tasks(recipe))
        base_dir = resolve_checkpoint_dir(recipe.base_model, "base_model")
        what = f"{backbone.display_name} backbone"
        check_matching_tensors(
            opened.base_tensors, CheckpointTensors(base_dir, "The base model", backbone.key_of, what), backbone
        )
        if backbone.needs_tokenizer:
            load_tokenizer(base_dir)
        with torch.device("meta"):
            model = plan_model(backbone, recipe, opened)
    base_numel = sum(tensor.numel() for tensor in opened.base_model.state_dict().values())
    return ConversionPlan(
        recipe=recipe,
        base=f"{recipe.base_model} ({backbone.display_name}, {base_numel:,} parameters)",
        experts={task: plan_task(backbone, recipe, opened, task) for task in opened.tasks},
        artifact=type(model).__name__,
        artifact_bytes=tensor_bytes(model, DTYPES[dtype]),
        dtype=dtype,
        memory=peak_memory(recipe, opened, model),
        output=str(output_dir) if output_dir is not None else None,
    )


def peak_memory(recipe: MergeRecipe, opened: MergeInputs, model: torch.nn.Module) -> dict[str, int]:
    """What a conversion holds at its peak, in float32 (where merging computes), by part: the base model, what is
    being built, every expert's copy of the tensor being merged with the merge's temporaries (task vectors, their
    stack, a compressed format's masks or factors: about four copies), and what stays in memory throughout (LoRA
    factors, AdaMerging's task vectors). AdaMerging's activations are not counted."""
    float32 = torch.float32.itemsize
    num_experts = len(opened.expert_tensors)
    merged_numel = sum(shape.numel() for shape in opened.base_tensors.shapes.values())
    largest = max(shape.numel() for shape in opened.base_tensors.shapes.values())
    built = merged_numel * float32 if recipe.variant == "static" else tensor_bytes(model, torch.float32)
    memory = {
        "base model": tensor_bytes(opened.base_model, torch.float32),
        "model being built": built,
        "tensor being merged": 4 * num_experts * largest * float32,
    }
    held = sum(tensors.held_numel for tensors in opened.expert_tensors.values())
    if held:
        memory["LoRA factors"] = held * float32
    if recipe.static_merge.method == "adamerging":
        memory["AdaMerging task vectors"] = (num_experts + 1) * merged_numel * float32
    return memory


def plan_model(backbone: Backbone, recipe: MergeRecipe, opened: MergeInputs) -> torch.nn.Module:
    """The model the conversion builds, with no storage (on the meta device): a WEMoE model's tensors are all
    allocated from its config, so their sizes are the artifact's; a static baseline has the base's."""
    if recipe.variant == "static":
        return opened.base_model
    return backbone.model_class(wemoe_config(backbone, opened, wemoe_config_options(recipe)))


def plan_task(backbone: Backbone, recipe: MergeRecipe, opened: MergeInputs, task: str) -> tuple[str, str, str]:
    """A task's line in the plan: its expert's source and kind (or that it has none), and its labels."""
    spec = next(spec for spec in recipe.tasks if spec.name == task)
    if spec.model is None:
        source, kind = "(no model)", "no expert: only a zero-shot head, from the base's text tower"
    else:
        source, kind = spec.model, opened.expert_tensors[task].describe()
    return source, kind, labels_text(backbone, recipe, opened, task)


def labels_text(backbone: Backbone, recipe: MergeRecipe, opened: MergeInputs, task: str) -> str:
    spec = next(spec for spec in recipe.tasks if spec.name == task)
    if spec.dataset is not None:
        return f"{backbone.labels_name} from dataset {spec.dataset.path!r} ({spec.dataset.split}), read when converting"
    labels = (opened.task_labels or {}).get(task)
    if labels is None:
        return f"no {backbone.labels_name}"
    source = "listed" if spec.classnames is not None else "from the expert's config"
    return f"{len(labels)} {backbone.labels_name}, {source}"


__all__ = ["DTYPES", "ConversionPlan", "convert", "plan_conversion"]
