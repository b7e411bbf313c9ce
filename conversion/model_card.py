"""The artifact's README.md: YAML front matter for the Hub plus a human description, from `model_cards/`."""

from importlib.resources import files
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from modeling_wemoe import WEMoEPreTrainedModel

from .merge_methods import get_static_merge
from .recipe import MergeRecipe

VARIANT_NAMES = {"wemoe": "WEMoE", "e-wemoe": "E-WEMoE"}


def hub_id_or_none(name_or_path: str) -> str | None:
    """Hub ids go into the card's metadata; local paths mean nothing on the Hub."""
    return None if Path(name_or_path).exists() else name_or_path


# Per architecture: the card template, the Hub pipeline tag and tags, and the title's model name.
ARCHITECTURE_CARDS = {
    "clip": {"template": "wemoe_clip.md", "pipeline_tag": "image-classification", "title": "CLIP"},
    "t5": {"template": "wemoe_t5.md", "pipeline_tag": "text2text-generation", "title": "T5"},
}


def render_model_card(model: WEMoEPreTrainedModel, recipe: MergeRecipe, repo_id: str | None = None) -> ModelCard:
    config = model.config
    card = ARCHITECTURE_CARDS[recipe.architecture]
    variant = VARIANT_NAMES[recipe.variant] + (f", keep {recipe.keep:g}" if recipe.variant == "e-wemoe" else "")
    router = (
        "router in every layer" if config.router_mode == "per_layer" else "single router shared by all layers"
    ) + f" (depth {config.router_hidden_layers}, {config.routing_granularity} routing)"
    card_data = ModelCardData(
        base_model=hub_id_or_none(recipe.base_model),
        library_name="transformers",
        pipeline_tag=card["pipeline_tag"],
        tags=["wemoe", "model-merging", "merge", recipe.variant, recipe.architecture, card["pipeline_tag"]],
    )
    task_labels = config.task_labels or {}
    tasks = [
        {"name": task.name, "model": task.model, "labels": task_labels.get(task.name, [])} for task in recipe.tasks
    ]
    return ModelCard.from_template(
        card_data,
        template_str=(files("model_cards") / card["template"]).read_text(),
        title=f"{VARIANT_NAMES[recipe.variant]} {card['title']}: {', '.join(task['name'] for task in tasks)}",
        variant_name=variant,
        static_merge_name=f"{get_static_merge(recipe.static_merge.method).pretty_name}, "
        f"scaling {recipe.static_merge.scaling:g}",
        router_description=router,
        tasks=tasks,
        report=model.parameter_report(),
        repo_id=repo_id or "path/to/this/artifact",
        recipe_yaml=recipe.to_yaml(),
    )
