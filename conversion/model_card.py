"""The artifact's README.md: YAML front matter for the Hub plus a human description, from `model_cards/`; and its
model-index, which keeps every evaluated model's results under that model's name."""

from collections.abc import Mapping
from importlib.resources import files
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData, metadata_load
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results

from modeling_wemoe import WEMoEPreTrainedModel

from .backbones import Backbone
from .merge_methods import get_static_merge
from .recipe import MergeRecipe

VARIANT_NAMES = {"wemoe": "WEMoE", "e-wemoe": "E-WEMoE"}
# The Hub's id for "a license not in its list": a merge is bound by its base's and every expert's licenses, which the
# card cannot know unless the recipe states the result (`license`).
DEFAULT_LICENSE = "other"


def hub_id_or_none(name_or_path: str) -> str | None:
    """Hub ids go into the card's metadata; local paths mean nothing on the Hub."""
    return None if Path(name_or_path).exists() else name_or_path


def hub_lineage(recipe: MergeRecipe) -> list[str]:
    """The base and every expert that are Hub ids, for `base_model`: the Hub's model tree then shows a merge of
    them. Local paths mean nothing there; the card's body names them."""
    sources = [recipe.base_model, *(task.model for task in recipe.expert_tasks)]
    return list(dict.fromkeys(source for source in map(hub_id_or_none, sources) if source is not None))


def decoder_routing_text(config) -> str:
    """How an encoder-decoder's decoder routes, for the card's router description; nothing for other models."""
    if not config.is_encoder_decoder:
        return ""
    if config.decoder_routing == "prompt":
        return "; the decoder once per prompt, from the pooled encoder output"
    return "; the decoder per token"


def upscaled_parts(groups: tuple[str, ...]) -> tuple[str, str]:
    """What the card says is merged once, and which blocks are experts, for `WEMoEConfig.upscale`'s groups."""
    static = [name for group, name in (("attention", "attention"), ("mlp", "MLPs")) if group not in groups]
    static += ["norms", "embeddings"]
    experts = " and ".join(name for group, name in (("mlp", "MLP"), ("attention", "attention")) if group in groups)
    return ", ".join(static[:-1]) + " and " + static[-1], experts


def render_model_card(
    model: WEMoEPreTrainedModel,
    recipe: MergeRecipe,
    backbone: Backbone,
    repo_id: str | None = None,
    adaptation: Mapping[str, Any] | None = None,
) -> ModelCard:
    """One template for every family (`model_cards/wemoe.md`); the family's plug-in gives its summary, what its
    labels are called, its pipeline tag and a usage snippet. `adaptation` (a `wemoe-tta` run's record) makes it the
    card of the adapted model. The model is named `repo_id` when it is pushed, else by the card's title."""
    config = model.config
    variant = VARIANT_NAMES[recipe.variant] + (f", keep {recipe.keep:g}" if recipe.variant == "e-wemoe" else "")
    router = (
        "router in every layer" if config.router_mode == "per_layer" else "single router shared by all layers"
    ) + f" (depth {config.router_hidden_layers}, {config.routing_granularity} routing{decoder_routing_text(config)}"
    router += ", initialised as the reference implementation)" if config.router_init == "reference" else ")"
    static_parts, expert_blocks = upscaled_parts(config.upscaled_groups)
    task_labels = config.task_labels or {}
    tasks = [
        {"name": task.name, "model": task.model, "labels": task_labels.get(task.name, [])} for task in recipe.tasks
    ]
    title = f"{VARIANT_NAMES[recipe.variant]} {backbone.display_name}: {', '.join(task['name'] for task in tasks)}"
    title += " (test-time adapted)" if adaptation else ""
    lineage = hub_lineage(recipe)
    card_data = ModelCardData(
        base_model=lineage or None,
        base_model_relation="merge" if lineage else None,
        license=recipe.license or DEFAULT_LICENSE,
        model_name=repo_id or title,
        library_name="transformers",
        pipeline_tag=backbone.pipeline_tag,
        tags=["wemoe", "model-merging", "merge", recipe.variant, recipe.architecture, backbone.pipeline_tag]
        + (["test-time-adaptation"] if adaptation else []),
    )
    return ModelCard.from_template(
        card_data,
        template_str=(files("wemoe.model_cards") / "wemoe.md").read_text(),
        title=title,
        base_source=recipe.base_model,
        hub_ids=lineage,
        recipe_license=recipe.license,
        adaptation=adaptation,
        summary=backbone.card_summary.format(n=len(recipe.expert_tasks)),
        labels_name=backbone.labels_name,
        usage=backbone.card_usage(repo_id or "path/to/this/artifact", tasks[0]["name"]),
        variant_name=variant,
        static_merge_name=f"{get_static_merge(recipe.static_merge.method).pretty_name}, "
        f"scaling {recipe.static_merge.scaling:g}",
        router_description=router,
        static_parts=static_parts,
        expert_blocks=expert_blocks,
        tasks=tasks,
        report=model.parameter_report(),
        recipe_yaml=recipe.to_yaml(),
    )


def model_index_of(card_path: Path) -> tuple[str | None, list[dict]]:
    """The model name a card records, and its model-index entries as written, each under its own model's name
    (`ModelCardData` would file every entry under the last one's name). Nothing for a missing card."""
    metadata = (metadata_load(card_path) if card_path.is_file() else None) or {}
    entries = metadata.get("model-index") or []
    # Cards written by huggingface_hub alone name their model in the model-index only (its last entry).
    return metadata.get("model_name") or (entries[-1].get("name") if entries else None), entries


def set_model_index(card: ModelCard, model_name: str, entries: list[dict]) -> None:
    """Name the card's model, and give the card these model-index entries as they are."""
    card.data.model_name = model_name
    card.data.eval_results = None
    card.data["model-index"] = entries or None


def add_eval_results(entries: list[dict], model_name: str, results: list[EvalResult]) -> list[dict]:
    """`entries` with `results` added under `model_name`. A result replaces only this model's result for the same
    task, dataset and metric; other models' entries (the unadapted model's, say) are kept. This model's entry comes
    last, where `ModelCard.load` reads the model's name from."""

    def key(result: EvalResult) -> tuple:
        return result.unique_identifier, result.dataset_name, result.metric_type

    new = {key(result) for result in results}
    own = [entry for entry in entries if entry.get("name") == model_name]
    kept = [result for result in (model_index_to_eval_results(own)[1] if own else []) if key(result) not in new]
    others = [entry for entry in entries if entry.get("name") != model_name]
    return [*others, *eval_results_to_model_index(model_name, [*kept, *results])]
