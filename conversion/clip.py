"""Building a WEMoE / E-WEMoE CLIP classifier from a base CLIP model and fine-tuned experts (models in memory,
checkpoint directories or Hub ids; expert tensors streamed one at a time)."""

import logging
from collections.abc import Mapping, Sequence

import torch
from transformers import CLIPModel, PreTrainedTokenizerBase

from modeling_wemoe import WEMoEConfig, WEMoEForImageClassification

from .adamerging import train_layer_wise_merge
from .build import (
    check_experts_given,
    check_variant,
    fill_backbone,
    log_reconstruction_errors,
    open_experts,
    resolve_static_merge,
    static_merge_tensors,
    wemoe_options,
)
from .checkpoints import CLIP_VISION, InMemoryTensors, ModelSource, load_clip_model, load_tokenizer
from .heads import ZeroShotCLIP, zero_shot_heads
from .tta import load_task_datasets, task_streams

logger = logging.getLogger(__name__)


def check_task_names(experts: Mapping[str, object], classnames: Mapping[str, Sequence[str]]) -> None:
    check_experts_given(experts)
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
    return load_tokenizer(base)


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
    check_variant(variant)
    check_task_names(experts, classnames)
    templates = templates or {}
    unknown_templates = sorted(set(templates) - set(experts))
    if unknown_templates:
        raise ValueError(f"`templates` names tasks without an expert: {unknown_templates}.")

    static_merge = resolve_static_merge(static_merge, scaling)
    clip = load_clip_model(base)
    tokenizer = resolve_tokenizer(base, tokenizer)
    base_tensors = InMemoryTensors(clip.vision_model.state_dict(), "The base model")
    expert_tensors = open_experts(base_tensors, clip.config.vision_config, experts, CLIP_VISION)
    for task, source in experts.items():
        warn_on_ignored_expert_parts(clip, source, task)

    config = WEMoEConfig(
        vision_config=clip.config.vision_config.to_dict(),
        projection_dim=clip.config.projection_dim,
        tasks=list(experts),
        task_labels={task: list(classnames[task]) for task in experts},
        init_lambda=init_lambda,
        router_hidden_layers=router_hidden_layers,
        router_top_k=router_top_k,
        routing_granularity=granularity,
        **wemoe_options(variant, expert_format, keep, rank, static_merge),
    )
    model = WEMoEForImageClassification(config)
    logger.info("Merging %d experts into a %s model (%s).", len(experts), variant, ", ".join(experts))
    reconstruction_errors = fill_backbone(model.vision_model, base_tensors, expert_tensors, config)
    log_reconstruction_errors(reconstruction_errors, rank)

    with torch.no_grad():
        model.visual_projection.weight.copy_(clip.visual_projection.weight)
        model.logit_scale.copy_(clip.logit_scale)
        heads = zero_shot_heads(clip, tokenizer, {task: classnames[task] for task in config.tasks}, templates)
        model.classifier.weight.copy_(torch.cat(list(heads.values())))
    model.freeze_all_but_routers()
    return model.eval()


def merge_static_clip(
    base: ModelSource,
    experts: Mapping[str, ModelSource],
    static_merge: Mapping,
    *,
    classnames: Mapping[str, Sequence[str]] | None = None,
    data=None,
    image_processor=None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    templates: Mapping[str, Sequence[str]] | None = None,
) -> CLIPModel:
    """A plain `CLIPModel`: the base with its vision tower replaced by a static merge of the experts' (text tower and
    projections stay the base's, which builds zero-shot heads as for WEMoE). The baseline WEMoE is compared with.

    `static_merge` is `{"method": "task_arithmetic" | "ties", ...}`, or `{"method": "adamerging", ...}` (see
    `conversion.recipe.AdaMergingSpec`), which also needs each task's `classnames`, unlabeled `data` (a DATA.yaml
    path, dict or `DataConfig`) and the `image_processor`.
    """
    check_experts_given(experts)
    clip = load_clip_model(base)
    base_tensors = InMemoryTensors(clip.vision_model.state_dict(), "The base model")
    expert_tensors = open_experts(base_tensors, clip.config.vision_config, experts, CLIP_VISION)
    logger.info("Merging %d experts by %s (%s).", len(experts), static_merge["method"], ", ".join(experts))
    if static_merge["method"] == "adamerging":
        check_task_names(experts, classnames or {})
        if data is None or image_processor is None:
            raise ValueError("static_merge adamerging needs `data` (unlabeled task images) and the `image_processor`.")
        classifier = ZeroShotCLIP(clip, resolve_tokenizer(base, tokenizer), classnames, templates)
        datasets = load_task_datasets(data, list(experts))
        streams = task_streams(datasets, image_processor, static_merge.get("batch_size", 16))
        merged = train_layer_wise_merge(
            classifier, "clip.vision_model.", base_tensors, expert_tensors, streams, static_merge
        )
    else:
        merged = static_merge_tensors(base_tensors, expert_tensors, static_merge)
    clip.vision_model.load_state_dict(merged)
    return clip.eval()
