"""Adding a task without an expert to an existing artifact, without merging again: `wemoe.add_task`, the library
behind `wemoe-convert --add-task`.

The new task gets the head conversion would have built for it, from the text tower of the base model that the
artifact's `merge_config.yaml` names (or `base`), and no expert: the experts, the routers and every other tensor stay
as they were, so the other tasks' outputs do not change. The result is a new artifact, written atomically
(`wemoe.outputs`), with this release's model code (which knows tasks without an expert), its recipe and model card
updated, and every other file of the artifact kept.
"""

import fnmatch
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from transformers import PreTrainedConfig

from .artifact import check_max_shard_size, is_artifact, load_artifact_model, load_config, write_artifact
from .backbones import Backbone, backbone_for_config
from .model_card import model_index_of, render_model_card, set_model_index
from .outputs import push_folder, staged_output
from .recipe import (
    RECIPE_FILE,
    MergeRecipe,
    TaskSpec,
    artifact_recipe,
    load_validated,
    recipe_file_text,
)

logger = logging.getLogger(__name__)

# The weights `save_pretrained` writes, in every layout: the new artifact's replace them all (an artifact saved in
# shards must not keep a stale shard next to the new single file).
WEIGHT_FILES = ("model*.safetensors", "model*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model*.bin.*")
# `hf download --local-dir` keeps its download state here; it describes the downloaded files, not the new ones.
NOT_KEPT = (".cache",)


def add_task(
    artifact: str | os.PathLike,
    name: str,
    classnames: Sequence[str],
    *,
    output: str | os.PathLike,
    templates: Sequence[str] | None = None,
    base: str | os.PathLike | None = None,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
    push_to_hub: str | None = None,
    private: bool = False,
) -> Path:
    """Write `output`: the CLIP artifact in `artifact` plus the task `name`, which has no expert, only the zero-shot
    head built from `classnames` (and `templates`, CLIP's photo prompts by default), as a recipe task without
    `model` would have it.

    Args:
        artifact: a local WEMoE artifact directory (of the CLIP family: only its heads can be built without an
            expert).
        name: the new task's name; not one of the artifact's tasks.
        classnames: its class names.
        output: the new artifact's directory; must not exist unless `overwrite`, and is never `artifact` itself.
        templates: its prompt templates, each with one `{}` for the class name.
        base: the base model the artifact was merged from (local directory or Hub id), whose text tower builds the
            head; default: the `base_model` of the artifact's `merge_config.yaml`.
        max_shard_size: safetensors shard size, as for `save_pretrained`.
        push_to_hub: `org/name` of a Hub model repo to upload the new artifact to (created `private` if asked).

    Returns:
        The new artifact's directory.

    Example:

    ```python
    >>> import wemoe
    >>> wemoe.add_task("./clip-wemoe", "pets", ["cat", "dog"], output="./clip-wemoe-pets")
    ```
    """
    spec = new_task_spec(name, classnames, templates)
    artifact = Path(artifact)
    config = artifact_config(artifact)
    backbone = backbone_for_config(config)
    check_new_task(backbone, config, spec, artifact)
    recipe, adaptation = artifact_recipe(artifact)
    base = base_of(artifact, recipe, base)
    check_max_shard_size(max_shard_size)
    inputs = [artifact, *([base] if Path(base).exists() else [])]
    with staged_output(output, overwrite=overwrite, inputs=inputs) as staging:
        model = load_artifact_model(artifact)
        extended = backbone.with_task_without_expert(model, base, spec.name, spec.classnames, spec.templates)
        files = updated_recipe_and_card(artifact, recipe, adaptation, spec, extended, backbone, push_to_hub)
        processor = backbone.load_processor(str(artifact), config)
        write_artifact(extended, staging, processor, extra_files=files, max_shard_size=max_shard_size)
        keep_other_files(artifact, staging)
    logger.info("Added task %r (without an expert) to %s as %s", spec.name, artifact, output)
    if push_to_hub:
        push_folder(Path(output), push_to_hub, f"Add task {spec.name} (without an expert)", private=private)
    return Path(output)


def new_task_spec(name: str, classnames: Sequence[str] | None, templates: Sequence[str] | None) -> TaskSpec:
    """The new task as a recipe task without `model`, validated as a recipe's (its errors name the field)."""
    if classnames is None:
        raise ValueError(
            f"Task {name!r}: `classnames` is required: a task without an expert is classified by the zero-shot head "
            "built from its class names."
        )
    fields = {"name": name, "classnames": classnames, "templates": templates}
    return load_validated(TaskSpec, {key: value for key, value in fields.items() if value is not None}, "new task")


def artifact_config(artifact: Path) -> PreTrainedConfig:
    if not artifact.is_dir():
        raise ValueError(
            f"{str(artifact)!r} is not a local artifact directory; download a Hub artifact first "
            "(`hf download ORG/NAME --local-dir DIR`)."
        )
    try:
        config = load_config(artifact, "The artifact")
    except (OSError, ValueError) as error:
        raise ValueError(f"Cannot read the artifact {str(artifact)!r}: {error}") from None
    if not is_artifact(config):
        raise ValueError(f"{str(artifact)!r} is a {config.model_type!r} model, not a WEMoE artifact.")
    return config


def check_new_task(backbone: Backbone, config: PreTrainedConfig, spec: TaskSpec, artifact: Path) -> None:
    if not backbone.serves_tasks_without_experts:
        raise ValueError(
            f"{str(artifact)!r} is a {backbone.display_name} artifact: only CLIP artifacts take a task without an "
            "expert (a zero-shot head from the base's text tower). A "
            f"{backbone.display_name} task needs its fine-tuned model: convert a recipe that names it."
        )
    if spec.name in config.tasks:
        raise ValueError(
            f"Task {spec.name!r} is already one of the artifact's tasks {list(config.tasks)}; give the new task "
            "another name."
        )


def base_of(artifact: Path, recipe: MergeRecipe | None, base: str | os.PathLike | None) -> str:
    """The base model whose text tower builds the head: as given, else the one the artifact's recipe names."""
    if base is not None:
        return str(base)
    if recipe is None:
        raise ValueError(
            f"{str(artifact)!r} has no {RECIPE_FILE} naming its base model: give the base model it was merged from "
            "(`base=`, or --base), whose text tower builds the new task's head."
        )
    return recipe.base_model


def updated_recipe_and_card(
    artifact: Path,
    recipe: MergeRecipe | None,
    adaptation: dict | None,
    spec: TaskSpec,
    model,
    backbone: Backbone,
    repo_id: str | None,
) -> dict[str, str]:
    """The artifact's recipe with the new task (its adaptation record, if any, kept) and the card rendered from it,
    keeping the card's results. Without a recipe there is nothing to render from: the card is kept as it was."""
    if recipe is None:
        logger.warning("%s has no %s: its model card is kept as it was.", artifact, RECIPE_FILE)
        return {}
    recipe = MergeRecipe.model_validate({**recipe.model_dump(), "tasks": [*recipe.tasks, spec]})
    card = render_model_card(model, recipe, backbone, repo_id=repo_id, adaptation=adaptation)
    # The other tasks' outputs are unchanged, so the results recorded for them stay this model's, under its name.
    model_name, entries = model_index_of(artifact / "README.md")
    set_model_index(card, repo_id or model_name or card.data.model_name, entries)
    return {RECIPE_FILE: recipe_file_text(recipe, adaptation), "README.md": str(card)}


def keep_other_files(artifact: Path, staging: Path) -> None:
    """Copy into `staging` what the artifact holds besides what was just written and its old weights (a user's
    results, `.gitattributes`, ...): nothing is lost."""
    for entry in artifact.iterdir():
        written = (staging / entry.name).exists()
        if written or entry.name in NOT_KEPT or any(fnmatch.fnmatch(entry.name, p) for p in WEIGHT_FILES):
            continue
        if entry.is_dir():
            shutil.copytree(entry, staging / entry.name, symlinks=True)
        else:
            shutil.copy2(entry, staging / entry.name, follow_symlinks=False)


__all__ = ["add_task"]
