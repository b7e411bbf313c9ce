"""Building a WEMoE / E-WEMoE CLIP classifier from a base CLIP model and fine-tuned experts (models in memory,
checkpoint directories or Hub ids; expert tensors streamed one at a time)."""

import logging
from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, CLIPModel, PreTrainedTokenizerBase

from modeling_wemoe import WEMoEConfig, WEMoEForImageClassification
from modeling_wemoe.modeling_wemoe import WEMoELinear, WEMoELowRankTaskVectors, WEMoESparseTaskVectors

from .checkpoints import (
    InMemoryTensors,
    ModelSource,
    TensorSource,
    check_finite,
    check_matching_tensors,
    check_same_architecture,
    load_clip_model,
    open_expert,
)
from .heads import DEFAULT_TEMPLATES, zero_shot_head
from .merge_methods import get_static_merge, low_rank_factors, magnitude_keep_mask

logger = logging.getLogger(__name__)

# WEMoE (ICML 2024): a router per layer, dense task vectors. E-WEMoE: one shared router, sparse task vectors.
VARIANTS = {
    "wemoe": {"router_mode": "per_layer", "expert_format": "dense"},
    "e-wemoe": {"router_mode": "shared", "expert_format": "sparse"},
}


def check_task_names(experts: Mapping[str, object], classnames: Mapping[str, Sequence[str]]) -> None:
    if not experts:
        raise ValueError("`experts` is empty: give at least one fine-tuned model, keyed by task name.")
    if set(experts) != set(classnames):
        raise ValueError(
            f"`experts` and `classnames` must name the same tasks: experts {sorted(experts)}, "
            f"classnames {sorted(classnames)}."
        )
    empty = [task for task in experts if not classnames[task]]
    if empty:
        raise ValueError(f"`classnames` has an empty class list for task(s) {empty}.")


def resolve_tokenizer(base: ModelSource, tokenizer: PreTrainedTokenizerBase | None) -> PreTrainedTokenizerBase:
    if tokenizer is not None:
        return tokenizer
    if isinstance(base, CLIPModel):
        raise ValueError("`tokenizer` is required when `base` is a model in memory (it builds the zero-shot heads).")
    return AutoTokenizer.from_pretrained(base)


def warn_on_ignored_expert_parts(clip: CLIPModel, expert: ModelSource, task: str) -> None:
    # Heads and projection come from the base model, as in the paper; say so when an expert changed them.
    if not isinstance(expert, CLIPModel):
        return
    if not torch.equal(expert.visual_projection.weight, clip.visual_projection.weight):
        logger.warning("Expert %r has a fine-tuned visual_projection; the base model's is used.", task)
    text_parts = ("text_model", "text_projection")
    expert_text = {k: v for k, v in expert.state_dict().items() if k.startswith(text_parts)}
    base_text = {k: v for k, v in clip.state_dict().items() if k.startswith(text_parts)}
    if any(not torch.equal(tensor, base_text[key]) for key, tensor in expert_text.items()):
        logger.warning("Expert %r has a fine-tuned text tower; the base model's builds the heads.", task)


def assign_task_vectors(store: torch.nn.Module, task_vectors: torch.Tensor, config) -> torch.Tensor | None:
    """Store task vectors in the layer's format; for low-rank, return each expert's relative reconstruction error."""
    if isinstance(store, WEMoESparseTaskVectors):
        store.assign(task_vectors, magnitude_keep_mask(task_vectors, config.keep))
    elif isinstance(store, WEMoELowRankTaskVectors):
        factor_a, factor_b, error = low_rank_factors(task_vectors, config.rank)
        store.assign(factor_a, factor_b)
        return error
    else:
        store.assign(task_vectors)
    return None


def open_experts(clip: CLIPModel, experts: Mapping[str, ModelSource]) -> tuple[TensorSource, dict[str, TensorSource]]:
    """The base's and every expert's vision-tower tensors, their architectures and tensor shapes checked before
    anything is built (tensors themselves are read later, one at a time)."""
    base = InMemoryTensors(clip.vision_model.state_dict(), "The base model")
    sources = {}
    for task, source in tqdm(experts.items(), desc="Opening experts", unit="expert"):
        tensors, vision_config = open_expert(source, task, base)
        if vision_config is not None:
            check_same_architecture(clip.config.vision_config, vision_config, task)
        check_matching_tensors(base, tensors)
        warn_on_ignored_expert_parts(clip, source, task)
        sources[task] = tensors
    return base, sources


def stacked_task_vectors(key: str, base: TensorSource, experts: dict[str, TensorSource]) -> torch.Tensor:
    """`(num_experts, *shape)` task vectors of one tensor, in float32, each expert's tensor read and checked once."""
    pretrained = base[key].float()
    check_finite(key, pretrained, base.owner)
    rows = []
    for expert in experts.values():
        tensor = expert[key]
        check_finite(key, tensor, expert.owner)
        rows.append(tensor.float() - pretrained)
    return torch.stack(rows)


@torch.no_grad()
def fill_vision_model(
    model: WEMoEForImageClassification,
    base: TensorSource,
    experts: dict[str, TensorSource],
    static_merge: dict,
) -> dict[str, list[float]]:
    """Weight-ensembled linears keep theta_0 plus their stacked task vectors; every other tensor is merged once.
    Tensors are processed one key at a time, so only one tensor per expert is held in memory. Returns, for low-rank
    experts, each compressed tensor's relative reconstruction error per expert."""
    method = get_static_merge(static_merge["method"])
    merge_options = {key: value for key, value in static_merge.items() if key != "method"}
    linears = {name: module for name, module in model.vision_model.named_modules() if isinstance(module, WEMoELinear)}
    ensembled = {f"{name}.{kind}": (module, kind) for name, module in linears.items() for kind in ("weight", "bias")}

    merged_state, reconstruction_errors = {}, {}
    for key in tqdm(base.shapes, desc="Merging tensors", unit="tensor"):
        task_vectors = stacked_task_vectors(key, base, experts)
        if key in ensembled:
            module, kind = ensembled[key]
            error = assign_task_vectors(getattr(module, f"{kind}_task_vectors"), task_vectors, model.config)
            if error is not None:
                reconstruction_errors[key] = error.tolist()
            merged_state[key] = base[key]
        else:
            merged_state[key] = method.merge(base[key].float(), task_vectors, **merge_options)

    result = model.vision_model.load_state_dict(merged_state, strict=False)
    not_written = [key for key in result.missing_keys if "task_vectors" not in key and ".router." not in key]
    if not_written or result.unexpected_keys:
        raise RuntimeError(
            f"The WEMoE vision tower does not match the CLIP vision tower: not written {not_written}, "
            f"unexpected {result.unexpected_keys}."
        )
    return reconstruction_errors


def log_reconstruction_errors(errors: dict[str, list[float]], rank: int | None) -> None:
    """One line per compressed tensor: the relative error ||tau - B A|| / ||tau|| of its rank-`rank` factors."""
    for key, per_expert in errors.items():
        logger.info(
            "rank-%s %s: relative reconstruction error mean %.4f, max %.4f over experts",
            rank,
            key,
            sum(per_expert) / len(per_expert),
            max(per_expert),
        )


def merge_clip(
    base: ModelSource,
    experts: Mapping[str, ModelSource],
    classnames: Mapping[str, Sequence[str]],
    *,
    variant: str = "wemoe",
    keep: float = 0.1,
    expert_format: str | None = None,
    rank: int | None = None,
    init_lambda: float = 0.3,
    scaling: float = 0.3,
    router_hidden_layers: int = 2,
    router_top_k: int | None = None,
    granularity: str = "sample",
    static_merge: Mapping | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    templates: Mapping[str, Sequence[str]] | None = None,
) -> WEMoEForImageClassification:
    """Merge fine-tuned CLIP vision towers into one WEMoE (or E-WEMoE) image classifier.

    Args:
        base: the pre-trained `CLIPModel`, or its local directory / Hub id.
        experts: task name -> fine-tuned `CLIPVisionModel` or `CLIPModel` in memory, or a directory / Hub id holding
            a full fine-tune (either CLIP key layout, safetensors or `.bin`) or a PEFT LoRA adapter; in expert order.
        classnames: task name -> class names; each task's head is built from the base text tower.
        variant: `"wemoe"` (a router per layer, dense task vectors) or `"e-wemoe"` (one shared router, task vectors
            pruned to the `keep` fraction of largest-magnitude entries per tensor).
        keep: kept fraction for sparse experts (0.1 = "E-WEMoE-90%"); ignored otherwise.
        expert_format: `"dense"`, `"sparse"` or `"lowrank"`, overriding the variant's storage (routers stay as the
            variant has them): `"lowrank"` keeps each weight's task vector as its rank-`rank` truncated SVD.
        rank: rank of low-rank experts.
        init_lambda: initial routing weight of every expert.
        scaling: task-arithmetic coefficient for the statically merged (non-MLP) parameters.
        static_merge: another static merge for the non-MLP parameters, e.g.
            `{"method": "ties", "scaling": 0.3, "density": 0.2}`; overrides `scaling`.
        router_hidden_layers: router depth, 0, 1 or 2.
        router_top_k: mix only each sample's `router_top_k` largest routing weights (unset: all experts).
        granularity: `"sample"` (one routing vector per image) or `"token"`.
        tokenizer: the base model's tokenizer; loaded from `base` when it is a path or Hub id.
        templates: task name -> prompt templates with one `{}` for the class name (default: CLIP photo prompts).

    Returns:
        A `WEMoEForImageClassification` in eval mode whose only trainable parameters are the routers; at init it
        equals task arithmetic with coefficient `init_lambda` on the MLPs.

    Example:

    ```python
    >>> from conversion import merge_clip
    >>> model = merge_clip(
    ...     "openai/clip-vit-base-patch32",
    ...     {"eurosat": "tanganke/clip-vit-base-patch32_eurosat", "gtsrb": "tanganke/clip-vit-base-patch32_gtsrb"},
    ...     {"eurosat": eurosat_classnames, "gtsrb": gtsrb_classnames},
    ...     variant="e-wemoe",
    ... )
    ```
    """
    if variant not in VARIANTS:
        raise ValueError(f"Unknown variant {variant!r}; choose one of {sorted(VARIANTS)}.")
    check_task_names(experts, classnames)
    templates = templates or {}
    unknown_templates = sorted(set(templates) - set(experts))
    if unknown_templates:
        raise ValueError(f"`templates` names tasks without an expert: {unknown_templates}.")

    static_merge = dict(static_merge or {"method": "task_arithmetic", "scaling": scaling})
    get_static_merge(static_merge.get("method", ""))
    clip = load_clip_model(base)
    tokenizer = resolve_tokenizer(base, tokenizer)
    base_tensors, expert_tensors = open_experts(clip, experts)

    expert_format = expert_format or VARIANTS[variant]["expert_format"]
    config = WEMoEConfig(
        vision_config=clip.config.vision_config.to_dict(),
        projection_dim=clip.config.projection_dim,
        tasks=list(experts),
        task_labels={task: list(classnames[task]) for task in experts},
        init_lambda=init_lambda,
        router_hidden_layers=router_hidden_layers,
        router_top_k=router_top_k,
        routing_granularity=granularity,
        router_mode=VARIANTS[variant]["router_mode"],
        expert_format=expert_format,
        keep=keep if expert_format == "sparse" else None,
        rank=rank if expert_format == "lowrank" else None,
        static_merge=static_merge,
    )
    model = WEMoEForImageClassification(config)
    logger.info("Merging %d experts into a %s model (%s).", len(experts), variant, ", ".join(experts))
    reconstruction_errors = fill_vision_model(model, base_tensors, expert_tensors, static_merge)
    log_reconstruction_errors(reconstruction_errors, rank)

    with torch.no_grad():
        model.visual_projection.weight.copy_(clip.visual_projection.weight)
        model.logit_scale.copy_(clip.logit_scale)
        heads = [
            zero_shot_head(clip, tokenizer, classnames[task], templates.get(task, DEFAULT_TEMPLATES))
            for task in tqdm(config.tasks, desc="Building zero-shot heads", unit="task")
        ]
        model.classifier.weight.copy_(torch.cat(heads))
    model.freeze_all_but_routers()
    return model.eval()
