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
from transformers import PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from modeling_wemoe import (
    WEMoEConfig,
    WEMoEForConditionalGeneration,
    WEMoEForImageClassification,
    WEMoEForSequenceClassification,
)

from .adamerging import train_layer_wise_merge
from .adaptation import task_streams
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
from .data import load_task_datasets
from .recipe import MergeOptions, StaticMergeSpec, check_router_fits
from .specs import load_validated

logger = logging.getLogger(__name__)


def merge_options(options: MergeOptions | Mapping | None) -> MergeOptions:
    """Merge options validated (and their errors worded) as a recipe's are."""
    return load_validated(MergeOptions, dict(options or {}) if not isinstance(options, MergeOptions) else options,
                          "merge options")


def check_templates(backbone: Backbone, tasks: Sequence[str], templates: Mapping | None) -> None:
    if not templates:
        return
    if not backbone.templates_allowed:
        raise ValueError(f"`templates` build CLIP zero-shot heads; a {backbone.display_name} model has none.")
    unknown = sorted(set(templates) - set(tasks))
    if unknown:
        raise ValueError(f"`templates` names tasks that are not the model's: {unknown}; its tasks: {list(tasks)}.")


def task_order(
    backbone: Backbone,
    experts: Mapping[str, ModelSource],
    classnames: Mapping[str, Sequence[str]] | None,
    tasks: Sequence[str] | None,
) -> list[str]:
    """Every task of the model, in order: `tasks` (those not in `experts` have no expert, only a head built from
    their `classnames`, where the family builds such heads), else the experts'."""
    if tasks is None:
        return list(experts)
    tasks = list(tasks)
    duplicates = sorted({task for task in tasks if tasks.count(task) > 1})
    if duplicates:
        raise ValueError(f"`tasks` has duplicate names {duplicates}; every task needs its own name.")
    unlisted = [task for task in experts if task not in tasks]
    if unlisted:
        raise ValueError(f"`tasks` must list every expert's task; it misses {unlisted} (tasks: {tasks}).")
    for task in tasks:
        if task not in experts:
            backbone.check_task_without_expert(bool((classnames or {}).get(task)), f"Task {task!r}")
    return tasks


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
    tasks: list[str]  # every task, in order; those not in `expert_tensors` have no expert


def open_inputs(
    backbone: Backbone,
    base: ModelSource,
    experts: Mapping[str, ModelSource],
    classnames: Mapping[str, Sequence[str]] | None,
    templates: Mapping[str, Sequence[str]] | None,
    tasks: Sequence[str] | None = None,
) -> MergeInputs:
    """Open the base and the experts (in the order of `tasks`, when given) and make every check that needs no tensor
    data (architectures, tensor names and shapes, labels); under `wemoe.checkpoints.metadata_only()` nothing but
    metadata is read."""
    check_experts_given(experts)
    tasks = task_order(backbone, experts, classnames, tasks)
    experts = {task: experts[task] for task in tasks if task in experts}
    check_templates(backbone, tasks, templates)
    base_model = backbone.load_base(base)
    base_tensors = InMemoryTensors(backbone.base_tensors(base_model), "The base model")
    expert_tensors, expert_configs = open_experts(
        base_tensors, backbone.config_of(base_model.config), experts, backbone
    )
    task_labels = backbone.task_labels(classnames, experts, expert_configs, tasks)
    return MergeInputs(base_model, base_tensors, expert_tensors, expert_configs, task_labels, tasks)


def wemoe_config(backbone: Backbone, inputs: MergeInputs, config_options: Mapping) -> WEMoEConfig:
    """The artifact's config: the base's architecture, the tasks and their labels, which tasks have an expert (set
    only when some has none, so other artifacts' configs stay as they were), and the merge options (as
    `wemoe_config_options` gives them)."""
    expert_tasks = list(inputs.expert_tensors)
    return WEMoEConfig(
        **backbone.wemoe_config_fields(inputs.base_model),
        tasks=inputs.tasks,
        expert_tasks=expert_tasks if expert_tasks != inputs.tasks else None,
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
    tasks: Sequence[str] | None = None,
    data=None,
    processor=None,
    **options,
):
    """Merge fine-tuned models of one family, as `variant` says: into a WEMoE (or E-WEMoE) model, or into the static
    baseline WEMoE is compared with (`variant="static"`).

    Args:
        backbone: the family, a registered architecture name (`"clip"`, `"t5"`, ...) or its `Backbone`.
        base: the pre-trained model, in memory, or its local directory / Hub id.
        experts: task name -> fine-tuned model in memory, or a directory / Hub id holding a full fine-tune
            (safetensors or `.bin`, either key layout) or a PEFT LoRA adapter; in expert order.
        classnames: task name -> the task's labels: CLIP class names (its zero-shot heads), T5 label words (what
            adaptation restricts its entropy to), a classifier's class names (else its experts' `id2label`).
        tokenizer: the base's tokenizer where the family needs one and `base` is a model in memory.
        templates: CLIP only: task name -> prompt templates with one `{}` for the class name.
        tasks: every task of the model, in order (default: the experts'). CLIP only: a task listed here but not in
            `experts` has no expert and no routing slot, only its zero-shot head from `classnames` (the papers'
            unseen tasks; `wemoe.add_task` adds one to an existing artifact).
        data: static AdaMerging only: the unlabeled task data its coefficients train on (a DATA.yaml path, dict or
            `DataConfig`; default: the spec's `data`), prepared by `processor` (default: the base's).
        **options: `MergeOptions` fields: `variant` ("wemoe": a router per layer, dense task vectors; "e-wemoe": one
            shared router, task vectors pruned to `keep`; "static": no experts, every tensor merged by
            `static_merge`), `keep`, `expert_format` ("dense", "sparse", "lowrank"), `rank`, `static_merge` (the
            method for the tensors merged once, e.g. `{"method": "ties", "density": 0.2}`) and `router`
            (`hidden_layers`, `top_k`, `init_lambda`, `init` ("exact" or "reference"), `granularity`,
            `decoder_routing` (T5: "token" or "prompt"), `seed`).

    Returns:
        The family's WEMoE model in eval mode, only its routers trainable; before adaptation it equals task
        arithmetic at `router.init_lambda` on the experts' blocks (exactly with `router.init` "exact", the default).
        With `variant="static"`, a plain model of the base's class; for families whose tasks keep their own heads,
        one per task (task name -> model).
    """
    backbone = get_backbone(backbone) if isinstance(backbone, str) else backbone
    options = merge_options(options)
    check_router_fits(backbone, options.router, "router")
    inputs = open_inputs(backbone, base, experts, classnames, templates, tasks)
    if options.variant == "static":
        merged = statically_merged_tensors(backbone, base, experts, inputs, options.static_merge, tokenizer=tokenizer,
                                           templates=templates, data=data, processor=processor)  # fmt: skip
        return backbone.static_model(inputs.base_model, merged, experts, inputs.expert_tensors, inputs.task_labels)
    tokenizer = base_tokenizer(backbone, base, tokenizer)
    config = wemoe_config(backbone, inputs, wemoe_config_options(options))
    with torch.random.fork_rng(devices=[]):  # seeded router initialisation, the caller's RNG untouched
        torch.manual_seed(options.router.seed)
        model = backbone.model_class(config)
    logger.info("Merging %d %s experts into a %s model (%s).", len(experts), backbone.display_name,
                options.variant, ", ".join(inputs.expert_tensors))
    if config.tasks_without_experts:
        logger.info("Tasks without an expert (a head only): %s.", ", ".join(config.tasks_without_experts))
    reconstruction_errors = fill_backbone(backbone.merge_target(model), inputs.base_tensors, inputs.expert_tensors,
                                          config)
    log_reconstruction_errors(reconstruction_errors, config.rank)
    backbone.finish(model, inputs.base_model, experts, inputs.expert_tensors, inputs.task_labels, tokenizer=tokenizer,
                    templates=templates)
    model.freeze_all_but_routers()
    return model.eval()


def statically_merged_tensors(
    backbone: Backbone,
    base: ModelSource,
    experts: Mapping[str, ModelSource],
    inputs: MergeInputs,
    static_merge: StaticMergeSpec,
    *,
    tokenizer,
    templates: Mapping[str, Sequence[str]] | None,
    data,
    processor,
) -> dict[str, torch.Tensor]:
    """Every merged tensor of the static baseline: by a data-free method (task arithmetic, TIES, DARE, ...), or by
    layer-wise AdaMerging, whose coefficients train on the tasks' unlabeled `data`."""
    logger.info("Merging %d %s experts by %s (%s).", len(inputs.expert_tensors), backbone.display_name,
                static_merge.method, ", ".join(inputs.expert_tensors))  # fmt: skip
    spec = static_merge.model_dump()
    if static_merge.method != "adamerging":
        return static_merge_tensors(inputs.base_tensors, inputs.expert_tensors, spec)
    tokenizer = base_tokenizer(backbone, base, tokenizer)
    classifier, prefix = backbone.adamerging_classifier(
        inputs.base_model, inputs.task_labels, experts, inputs.expert_tensors,
        tokenizer=tokenizer, templates=templates
    )
    datasets = load_task_datasets(static_merge.data if data is None else data, inputs.tasks, backbone.input_kind)
    processor = backbone.load_processor(base) if processor is None else processor
    streams = task_streams(backbone, datasets, processor, static_merge.batch_size, inputs.task_labels)
    return train_layer_wise_merge(classifier, prefix, inputs.base_tensors, inputs.expert_tensors, streams, spec)


def merge_clip(
    base: ModelSource,
    experts: Mapping[str, ModelSource],
    classnames: Mapping[str, Sequence[str]],
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    templates: Mapping[str, Sequence[str]] | None = None,
    **options,
) -> WEMoEForImageClassification:
    """Merge fine-tuned CLIP vision towers into one WEMoE (or E-WEMoE) image classifier: `wemoe.merge` for
    the CLIP family. `classnames` build each task's zero-shot head from the base text tower (with `tokenizer`,
    loaded from `base` when that is a path or Hub id); `options` are `MergeOptions` fields.

    Example:

    ```python
    >>> from wemoe import merge_clip
    >>> model = merge_clip(
    ...     "openai/clip-vit-base-patch32",
    ...     {"eurosat": "tanganke/clip-vit-base-patch32_eurosat", "gtsrb": "tanganke/clip-vit-base-patch32_gtsrb"},
    ...     {"eurosat": eurosat_classnames, "gtsrb": gtsrb_classnames},
    ...     variant="e-wemoe",
    ... )
    ```
    """
    return merge("clip", base, experts, classnames, tokenizer=tokenizer, templates=templates,
                 **options)


def merge_t5(
    base: ModelSource,
    experts: Mapping[str, ModelSource],
    classnames: Mapping[str, Sequence[str]] | None = None,
    **options,
) -> WEMoEForConditionalGeneration:
    """Merge fine-tuned T5 / Flan-T5 models into one WEMoE (or E-WEMoE) text-to-text model: `wemoe.merge` for
    the T5 family. `classnames` are tasks' label words (e.g. `["negative", "positive"]`), to which test-time
    adaptation restricts its entropy; tasks left out adapt on the whole vocabulary. `options` are `MergeOptions`
    fields; `router.granularity` applies to the encoder, `router.decoder_routing` to the decoder (`"token"`, the
    paper's, or `"prompt"`: once per prompt, from the pooled encoder output).

    Example:

    ```python
    >>> from wemoe import merge_t5
    >>> model = merge_t5(
    ...     "google/flan-t5-base",
    ...     {"sst2": "tanganke/flan-t5-base_glue-sst2", "qqp": "tanganke/flan-t5-base_glue-qqp"},
    ...     classnames={"sst2": ["negative", "positive"], "qqp": ["not_duplicate", "duplicate"]},
    ...     variant="e-wemoe",
    ... )
    ```
    """
    return merge("t5", base, experts, classnames, **options)


def merge_bert(
    base: ModelSource,
    experts: Mapping[str, ModelSource],
    classnames: Mapping[str, Sequence[str]] | None = None,
    **options,
) -> WEMoEForSequenceClassification:
    """Merge BERT-style classifiers fine-tuned from one encoder into one WEMoE (or E-WEMoE) multi-task classifier:
    `wemoe.merge` for the BERT family. Each task keeps its expert's pooler and classifier; `classnames` name a
    task's classes where its expert's `id2label` does not (LoRA adapters). `options` are `MergeOptions` fields."""
    return merge("bert", base, experts, classnames, **options)


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
    tasks: Sequence[str] | None = None,
):
    """`merge` with `variant="static"`: the static baseline WEMoE is compared with, the base with its merged part
    replaced by a static merge of the experts' (`static_merge`, validated as a recipe's: a data-free method such as
    task arithmetic, TIES or DARE, or layer-wise AdaMerging, whose coefficients train on the unlabeled task data
    `data` names, prepared by `processor`). A plain model of the base's class; for families whose tasks keep their
    own heads, one per task (task name -> model)."""
    return merge(backbone, base, experts, classnames, tokenizer=tokenizer, templates=templates, tasks=tasks,
                 data=data, processor=processor, variant="static", static_merge=static_merge)  # fmt: skip


__all__ = ["merge", "merge_bert", "merge_clip", "merge_options", "merge_static", "merge_t5"]
