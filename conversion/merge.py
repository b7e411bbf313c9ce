"""The merge, once for every family: open the base and the experts, check them against each other, build the
family's WEMoE model from a config, fill it tensor by tensor, and let the family finish it (heads, projections).
The static baselines (task arithmetic, TIES, DARE, ..., layer-wise AdaMerging) follow the same path into a plain
model.

What differs between families comes from their plug-in (`wemoe.backbones`); how to merge comes from
`MergeOptions`, validated like a recipe (every default declared there once).
"""

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedConfig, PreTrainedModel

from modeling_wemoe import WEMoEConfig, WEMoEPreTrainedModel

from .adamerging import train_layer_wise_merge
from .adaptation import load_task_datasets, task_streams
from .backbones import Backbone, get_backbone
from .build import (
    check_experts_given,
    fill_backbone,
    log_reconstruction_errors,
    open_experts,
    static_merge_tensors,
    wemoe_config_options,
)
from .checkpoints import InMemoryTensors, ModelSource, TensorSource, load_tokenizer
from .recipe import MergeOptions, load_validated

logger = logging.getLogger(__name__)


def merge_options(options: MergeOptions | Mapping | None) -> MergeOptions:
    """Merge options validated (and their errors worded) as a recipe's are."""
    return load_validated(MergeOptions, dict(options or {}) if not isinstance(options, MergeOptions) else options,
                          "merge options")


def check_templates(backbone: Backbone, experts: Mapping, templates: Mapping | None) -> None:
    if not templates:
        return
    if not backbone.templates_allowed:
        raise ValueError(f"`templates` build CLIP zero-shot heads; a {backbone.display_name} model has none.")
    unknown = sorted(set(templates) - set(experts))
    if unknown:
        raise ValueError(f"`templates` names tasks without an expert: {unknown}.")


def base_tokenizer(backbone: Backbone, base: ModelSource, tokenizer):
    """The tokenizer a family needs to finish its model (CLIP builds its heads with it): as given, else the base's."""
    if tokenizer is not None or not backbone.needs_tokenizer:
        return tokenizer
    if not isinstance(base, (str, os.PathLike)):
        raise ValueError(
            f"`tokenizer` is required when `base` is a model in memory (the {backbone.display_name} heads are built "
            "with it)."
        )
    return load_tokenizer(base)


@dataclass
class MergeInputs:
    """The base and the experts, opened and checked against each other: what every merge starts from, and what a
    dry run (`wemoe.convert.plan_conversion`) reports on."""

    base_model: PreTrainedModel
    base_tensors: TensorSource
    expert_tensors: dict[str, TensorSource]
    expert_configs: dict[str, PreTrainedConfig | None]
    task_labels: dict[str, list[str]] | None


def open_inputs(
    backbone: Backbone,
    base: ModelSource,
    experts: Mapping[str, ModelSource],
    classnames: Mapping[str, Sequence[str]] | None,
    templates: Mapping[str, Sequence[str]] | None,
) -> MergeInputs:
    """Open the base and the experts and make every check that needs no tensor data (architectures, tensor names
    and shapes, labels); under `wemoe.checkpoints.metadata_only()` nothing but metadata is read."""
    check_experts_given(experts)
    check_templates(backbone, experts, templates)
    base_model = backbone.load_base(base)
    base_tensors = InMemoryTensors(backbone.base_tensors(base_model), "The base model")
    expert_tensors, expert_configs = open_experts(
        base_tensors, backbone.config_of(base_model.config), experts, backbone
    )
    task_labels = backbone.task_labels(classnames, experts, expert_configs)
    return MergeInputs(base_model, base_tensors, expert_tensors, expert_configs, task_labels)


def wemoe_config(backbone: Backbone, inputs: MergeInputs, config_options: Mapping) -> WEMoEConfig:
    """The artifact's config: the base's architecture, the tasks and their labels, and the merge options (as
    `wemoe_config_options` gives them)."""
    return WEMoEConfig(
        **backbone.wemoe_config_fields(inputs.base_model),
        tasks=list(inputs.expert_tensors),
        task_labels=inputs.task_labels,
        **config_options,
    )


def merge(
    backbone: Backbone | str,
    base: ModelSource,
    experts: Mapping[str, ModelSource],
    classnames: Mapping[str, Sequence[str]] | None = None,
    *,
    tokenizer=None,
    templates: Mapping[str, Sequence[str]] | None = None,
    **options,
) -> WEMoEPreTrainedModel:
    """Merge fine-tuned models of one family into a WEMoE (or E-WEMoE) model.

    Args:
        backbone: the family, a registered architecture name (`"clip"`, `"t5"`, ...) or its `Backbone`.
        base: the pre-trained model, in memory, or its local directory / Hub id.
        experts: task name -> fine-tuned model in memory, or a directory / Hub id holding a full fine-tune
            (safetensors or `.bin`, either key layout) or a PEFT LoRA adapter; in expert order.
        classnames: task name -> the task's labels: CLIP class names (its zero-shot heads), T5 label words (what
            adaptation restricts its entropy to), a classifier's class names (else its experts' `id2label`).
        tokenizer: the base's tokenizer where the family needs one and `base` is a model in memory.
        templates: CLIP only: task name -> prompt templates with one `{}` for the class name.
        **options: `MergeOptions` fields: `variant` ("wemoe": a router per layer, dense task vectors; "e-wemoe": one
            shared router, task vectors pruned to `keep`), `keep`, `expert_format` ("dense", "sparse", "lowrank"),
            `rank`, `static_merge` (for the non-MLP tensors, e.g. `{"method": "ties", "density": 0.2}`) and
            `router` (`hidden_layers`, `top_k`, `init_lambda`, `granularity`, `seed`).

    Returns:
        The family's WEMoE model in eval mode, only its routers trainable; before adaptation it equals task
        arithmetic at `router.init_lambda` on the experts' blocks.
    """
    backbone = get_backbone(backbone) if isinstance(backbone, str) else backbone
    options = merge_options(options)
    config_options = wemoe_config_options(options)
    inputs = open_inputs(backbone, base, experts, classnames, templates)
    tokenizer = base_tokenizer(backbone, base, tokenizer)
    config = wemoe_config(backbone, inputs, config_options)
    with torch.random.fork_rng(devices=[]):  # seeded router initialisation, the caller's RNG untouched
        torch.manual_seed(options.router.seed)
        model = backbone.model_class(config)
    logger.info("Merging %d %s experts into a %s model (%s).", len(experts), backbone.display_name,
                options.variant, ", ".join(experts))
    reconstruction_errors = fill_backbone(backbone.merge_target(model), inputs.base_tensors, inputs.expert_tensors,
                                          config)
    log_reconstruction_errors(reconstruction_errors, config.rank)
    backbone.finish(model, inputs.base_model, experts, inputs.expert_tensors, inputs.task_labels, tokenizer=tokenizer,
                    templates=templates)
    model.freeze_all_but_routers()
    return model.eval()


def merge_static(
    backbone: Backbone | str,
    base: ModelSource,
    experts: Mapping[str, ModelSource],
    static_merge: Mapping,
    *,
    classnames: Mapping[str, Sequence[str]] | None = None,
    data=None,
    processor=None,
    tokenizer=None,
    templates: Mapping[str, Sequence[str]] | None = None,
):
    """The static baseline WEMoE is compared with: the base with its merged part replaced by a static merge of the
    experts' (`static_merge`, validated as a recipe's: a data-free method such as task arithmetic, TIES or DARE, or
    layer-wise AdaMerging, whose coefficients train on the unlabeled task data `data` names, prepared by
    `processor`). A plain model of the base's class; for families whose tasks keep their own heads, one per task
    (task name -> model)."""
    backbone = get_backbone(backbone) if isinstance(backbone, str) else backbone
    static_merge = merge_options({"variant": "static", "static_merge": static_merge}).static_merge.model_dump()
    inputs = open_inputs(backbone, base, experts, classnames, templates)
    logger.info("Merging %d %s experts by %s (%s).", len(experts), backbone.display_name, static_merge["method"],
                ", ".join(experts))
    if static_merge["method"] == "adamerging":
        if data is None or processor is None:
            raise ValueError("static_merge adamerging needs `data` (unlabeled task inputs) and the `processor`.")
        tokenizer = base_tokenizer(backbone, base, tokenizer)
        classifier, prefix = backbone.adamerging_classifier(
            inputs.base_model, inputs.task_labels, experts, inputs.expert_tensors, tokenizer=tokenizer,
            templates=templates
        )
        datasets = load_task_datasets(data, list(experts), backbone.input_kind)
        streams = task_streams(backbone, datasets, processor, static_merge["batch_size"], inputs.task_labels)
        merged = train_layer_wise_merge(
            classifier, prefix, inputs.base_tensors, inputs.expert_tensors, streams, static_merge
        )
    else:
        merged = static_merge_tensors(inputs.base_tensors, inputs.expert_tensors, static_merge)
    return backbone.static_model(inputs.base_model, merged, experts, inputs.expert_tensors, inputs.task_labels)


__all__ = ["merge", "merge_options", "merge_static"]
