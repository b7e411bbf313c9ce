"""What a backbone family plug-in says, and the registry of plug-ins: everything about a model family that building,
adapting and evaluating WEMoE models needs, in one object. The rest of `wemoe` asks the registry for it and never
tests which family it holds.

A family plug-in (a module of `wemoe.backbones`) subclasses `Backbone`, sets its class attributes and implements the
methods marked as such, then registers an instance with `register_backbone`. Its modeling code is a
`modeling_wemoe/modeling_wemoe_<family>.py`. `docs/adding-a-backbone.md` walks through adding one.

The interface lives at the bottom of the library, beside the types it names, so that everything above it (the
recipe's validation included) can ask the registry without importing the plug-ins themselves.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel

from .checkpoints import ModelSource, TensorSource
from .results import EvaluationResults
from .streams import LABEL_WORDS, TASK_ROUTING, TaskStream


class Backbone:
    """One model family: its checkpoints' layout, how its WEMoE model is built and finished, its static baseline,
    how its task data becomes model inputs, how it is evaluated, and what its model card says.

    Attributes:
        architecture: the recipe's `architecture:` value, and the `backbone` of the family's WEMoE configs.
        display_name: the family's name in messages and model card titles (`"CLIP"`).
        plain_model_types: `model_type`s of this family's ordinary checkpoints (base models, fine-tunes), so that
            `wemoe-eval` knows which family scores a plain model directory.
        partial_model_types: those of `plain_model_types` that hold only part of what scoring needs, so that
            `wemoe-eval` scores them inside a base model (`--base`): a bare CLIP vision tower has no text tower.
        model_class: the WEMoE model class (from `modeling_wemoe`).
        expert_linears: the linear layers that are weight-ensembled experts, by module path within a layer.
        input_kind: what a task's data column holds, `"image"` or `"text"`.
        pipeline_tag: the Hub pipeline tag of the family's artifacts.
        labels_name: what a task's `classnames` are for this family, in cards and messages.
        labels_required: whether every task needs `classnames` (or a dataset's ClassLabel) in a recipe.
        templates_allowed: whether a task may give prompt templates (zero-shot heads).
        needs_tokenizer: whether finishing a merged model needs the base's tokenizer (to build heads).
        serves_tasks_without_experts: whether a task may have no expert, only a head built from the base (CLIP's
            zero-shot heads). BERT's heads are its experts' classifiers; T5 has no per-task head at all.
        has_decoder: whether the model has a decoder whose routing `router.decoder_routing` chooses (T5).
        architecture_fields: config fields that must agree between the base and every expert.
        tensor_hints: what a missing or extra tensor usually means, by merge key.
        card_summary: one paragraph on what the artifact is, for its model card (`{n}`: the number of experts).
        objectives: the test-time adaptation objectives `task_stream` offers (`wemoe.streams.OBJECTIVES`), the
            paper's (`"label-words"`: the entropy over the task's classes or label words) first.
    """

    architecture: str
    display_name: str
    plain_model_types: tuple[str, ...] = ()
    partial_model_types: tuple[str, ...] = ()
    model_class: type
    expert_linears: tuple[str, ...] = ()
    input_kind: str
    pipeline_tag: str
    labels_name: str = "classes"
    labels_required: bool = True
    templates_allowed: bool = False
    needs_tokenizer: bool = False
    serves_tasks_without_experts: bool = False
    has_decoder: bool = False
    architecture_fields: tuple[str, ...] = ()
    tensor_hints: Mapping[str, str] = {}
    card_summary: str = ""
    objectives: tuple[str, ...] = (LABEL_WORDS, TASK_ROUTING)

    # Checkpoints -------------------------------------------------------------------------------------------------

    def key_of(self, checkpoint_key: str) -> str | None:
        """The merge key of a checkpoint key, or None for a tensor that is not part of the merged backbone."""
        raise NotImplementedError

    def config_of(self, config: PreTrainedConfig) -> PreTrainedConfig | None:
        """The backbone's config within a checkpoint's config; None for another kind of model."""
        raise NotImplementedError

    def model_tensors(self, model: PreTrainedModel) -> tuple[Mapping[str, torch.Tensor], PreTrainedConfig] | None:
        """An in-memory model's backbone tensors by merge key, and its backbone config; None for another kind."""
        raise NotImplementedError

    # Building ----------------------------------------------------------------------------------------------------

    def load_base(self, source: ModelSource) -> PreTrainedModel:
        """The pre-trained base model, in memory, from a local directory or from the Hub."""
        raise NotImplementedError

    def base_tensors(self, base: PreTrainedModel) -> Mapping[str, torch.Tensor]:
        """The base's tensors that are merged (keys as `key_of` gives them)."""
        raise NotImplementedError

    def wemoe_config_fields(self, base: PreTrainedModel) -> dict[str, Any]:
        """The `WEMoEConfig` fields that describe the backbone (e.g. `vision_config`, `text_config`)."""
        raise NotImplementedError

    def merge_target(self, model: nn.Module) -> nn.Module:
        """The part of a WEMoE model whose tensors carry the merge keys."""
        raise NotImplementedError

    def task_labels(
        self,
        classnames: Mapping[str, Sequence[str]] | None,
        experts: Mapping[str, ModelSource],
        expert_configs: Mapping[str, PreTrainedConfig | None],
        tasks: Sequence[str] | None = None,
    ) -> dict[str, list[str]] | None:
        """Each task's labels for the artifact, from the given `classnames`; checked against the experts and `tasks`
        (every task, those without an expert included; default: the experts')."""
        classnames = {task: list(names) for task, names in (classnames or {}).items()}
        tasks = list(experts) if tasks is None else list(tasks)
        unknown = sorted(set(classnames) - set(tasks))
        if unknown:
            hint = " (a task without an expert must be listed in `tasks`)" if self.serves_tasks_without_experts else ""
            raise ValueError(f"`classnames` names tasks that are not the model's: {unknown}; its tasks: {tasks}{hint}.")
        empty = [task for task, names in classnames.items() if not names]
        if empty:
            raise ValueError(f"`classnames` has an empty class list for task(s) {empty}.")
        missing = [task for task in tasks if task not in classnames]
        if self.labels_required and missing:
            raise ValueError(
                f"`experts` and `classnames` must name the same tasks: experts {sorted(experts)}, "
                f"classnames {sorted(classnames)}."
            )
        return classnames or None

    def finish(
        self,
        model: nn.Module,
        base: PreTrainedModel,
        experts: Mapping[str, ModelSource],
        expert_tensors: Mapping[str, TensorSource],
        task_labels: Mapping[str, list[str]] | None,
        tokenizer=None,
        templates: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        """Write what the merge does not (classification heads, projections, generation settings)."""

    def load_processor(self, source: ModelSource, config: PreTrainedConfig | None = None):
        """The processor (image processor or tokenizer) that a base model or an artifact prepares inputs with."""
        raise NotImplementedError

    def static_model(
        self,
        base: PreTrainedModel,
        merged: Mapping[str, torch.Tensor],
        experts: Mapping[str, ModelSource],
        expert_tensors: Mapping[str, TensorSource],
        task_labels: Mapping[str, list[str]] | None,
    ):
        """The static baseline: the base with `merged` written into its merged part; for families whose tasks keep
        their own heads, a model per task (task name -> model)."""
        raise NotImplementedError

    def write_static(
        self, static, directory, processor, *, extra_files: Mapping[str, str], max_shard_size, dtype: torch.dtype
    ) -> None:
        """Save `static_model`'s result into `directory` as ordinary checkpoints, in `dtype`."""
        raise NotImplementedError

    def static_processor(self, source: ModelSource, tokenizer=None):
        """The processor saved with a static baseline."""
        return self.load_processor(source)

    def adamerging_classifier(
        self,
        base: PreTrainedModel,
        task_labels: Mapping[str, list[str]] | None,
        experts: Mapping[str, ModelSource],
        expert_tensors: Mapping[str, TensorSource],
        tokenizer=None,
        templates: Mapping[str, Sequence[str]] | None = None,
    ) -> tuple[nn.Module, str]:
        """A classifier `(**inputs, task=...) -> .logits` over the base, and the prefix of the merged tensors in it,
        for layer-wise AdaMerging."""
        raise NotImplementedError

    def check_task_without_expert(self, has_labels: bool, where: str) -> None:
        """A task without an expert (no `model`) is served by a head built from its labels alone: only where the
        family builds such heads, and never without labels."""
        if not self.serves_tasks_without_experts:
            raise ValueError(
                f"{where}: no expert (`model`): a {self.display_name} task needs its fine-tuned model; only CLIP "
                "serves a task without an expert, with a zero-shot head from the base's text tower"
            )
        if not has_labels:
            raise ValueError(
                f"{where}: a task without an expert (no `model`) is classified by a zero-shot head built from its "
                "class names: give `classnames` (in a recipe, or a `dataset` with a ClassLabel column)"
            )

    def with_task_without_expert(
        self, model: nn.Module, base: ModelSource, task: str, labels: list[str], templates: list[str] | None
    ) -> nn.Module:
        """`model` (an artifact's, loaded) plus a task without an expert: its head built from `labels` (and
        `templates`) with the `base` the model was merged from; every other tensor as it was. Only for families that
        `serves_tasks_without_experts`."""
        raise NotImplementedError

    # Adaptation and evaluation -----------------------------------------------------------------------------------

    def task_stream(
        self, dataset, spec, processor, batch_size: int, task: str, labels: Sequence[str] | None
    ) -> TaskStream:
        """One task's unlabeled samples as model inputs, and the logits whose entropy adaptation minimises."""
        raise NotImplementedError

    def evaluate(
        self,
        model_dir: str,
        datasets: Mapping,
        data_config,
        batch_size: int,
        max_new_tokens: int,
        *,
        device: torch.device,
        base: str | None = None,
    ) -> EvaluationResults:
        """Scores per task of a WEMoE artifact or a plain model of this family on labeled data, run on `device`; a
        model of `partial_model_types` is scored inside `base`."""
        raise NotImplementedError

    def card_usage(self, repo_id: str, task: str) -> str:
        """A Python snippet loading and using the artifact (model card)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{self.display_name} backbone {self.architecture!r}: {self.model_class.__name__}>"


BACKBONES: dict[str, Backbone] = {}


def register_backbone(backbone_class: type[Backbone]) -> type[Backbone]:
    """Class decorator: register one instance of a family's `Backbone` under its `architecture`."""
    BACKBONES[backbone_class.architecture] = backbone_class()
    return backbone_class


def get_backbone(architecture: str) -> Backbone:
    if architecture not in BACKBONES:
        raise ValueError(f"Unknown architecture {architecture!r}; registered: {sorted(BACKBONES)}.")
    return BACKBONES[architecture]


def backbone_for_config(config: PreTrainedConfig) -> Backbone:
    """The family of a WEMoE artifact's config (its `backbone`) or of a plain model's (its `model_type`)."""
    if config.model_type == "wemoe":
        # Configs saved by 0.1.0 code name no backbone: a vision tower is CLIP, a text model T5.
        backbone = getattr(config, "backbone", None) or ("clip" if config.vision_config is not None else "t5")
        return get_backbone(backbone)
    for backbone in BACKBONES.values():
        if config.model_type in backbone.plain_model_types:
            return backbone
    known = sorted(model_type for backbone in BACKBONES.values() for model_type in backbone.plain_model_types)
    raise ValueError(f"No backbone family handles {config.model_type!r} models; known model types: {known}.")


__all__ = ["BACKBONES", "Backbone", "backbone_for_config", "get_backbone", "register_backbone"]
