"""The artifact's README.md: YAML front matter for the Hub plus a human description, from `model_cards/`."""

from importlib.resources import files
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from modeling_wemoe import WEMoEPreTrainedModel

from .backbones import Backbone
from .merge_methods import get_static_merge
from .recipe import MergeRecipe

VARIANT_NAMES = {"wemoe": "WEMoE", "e-wemoe": "E-WEMoE"}


def hub_id_or_none(name_or_path: str) -> str | None:
    """Hub ids go into the card's metadata; local paths mean nothing on the Hub."""
    return None if Path(name_or_path).exists() else name_or_path


def render_model_card(
    model: WEMoEPreTrainedModel, recipe: MergeRecipe, backbone: Backbone, repo_id: str | None = None
) -> ModelCard:
    """One template for every family (`model_cards/wemoe.md`); the family's plug-in gives its summary, what its
    labels are called, its pipeline tag and a usage snippet."""
    config = model.config
    variant = VARIANT_NAMES[recipe.variant] + (f", keep {recipe.keep:g}" if recipe.variant == "e-wemoe" else "")
    router = (
        "router in every layer" if config.router_mode == "per_layer" else "single router shared by all layers"
    ) + f" (depth {config.router_hidden_layers}, {config.routing_granularity} routing)"
    card_data = ModelCardData(
        base_model=hub_id_or_none(recipe.base_model),
        library_name="transformers",
        pipeline_tag=backbone.pipeline_tag,
        tags=["wemoe", "model-merging", "merge", recipe.variant, recipe.architecture, backbone.pipeline_tag],
    )
    task_labels = config.task_labels or {}
    tasks = [
        {"name": task.name, "model": task.model, "labels": task_labels.get(task.name, [])} for task in recipe.tasks
    ]
    return ModelCard.from_template(
        card_data,
        template_str=(files("model_cards") / "wemoe.md").read_text(),
        title=f"{VARIANT_NAMES[recipe.variant]} {backbone.display_name}: {', '.join(task['name'] for task in tasks)}",
        summary=backbone.card_summary.format(n=len(tasks)),
        labels_name=backbone.labels_name,
        usage=backbone.card_usage(repo_id or "path/to/this/artifact", tasks[0]["name"]),
        variant_name=variant,
        static_merge_name=f"{get_static_merge(recipe.static_merge.method).pretty_name}, "
        f"scaling {recipe.static_merge.scaling:g}",
        router_description=router,
        tasks=tasks,
        report=model.parameter_report(),
        recipe_yaml=recipe.to_yaml(),
    )
