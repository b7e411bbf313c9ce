"""WEMoE model configuration.

Shipped inside every artifact: imports only transformers (and, through it, huggingface_hub).
"""

import copy
import math
from typing import Any, Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, CLIPVisionConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

# Which modules of a layer can be weight-ensembled experts (`WEMoEConfig.upscale`).
UPSCALE_GROUPS = ("mlp", "attention")


@strict
class WEMoEConfig(PreTrainedConfig):
    r"""
    Configuration of a weight-ensembling mixture-of-experts (WEMoE / E-WEMoE) model: a backbone whose MLP blocks
    (and, with `upscale`, attention projections) re-mix per input the task vectors of several fine-tuned experts,
    everything else merged statically.

    It holds architecture facts only (what `__init__` needs to build every tensor); device, dtype and seeds never
    go here. `static_merge` is recorded for provenance and is not read by the model.

    The backbone is exactly one of `vision_config` (a CLIP image classifier, `WEMoEForImageClassification`) and
    `text_config` (a text model of the family its `model_type` names: T5 / Flan-T5, `WEMoEForConditionalGeneration`;
    other families register their own model class). `backbone` says which family it is.

    Args:
        vision_config (`dict` or `CLIPVisionConfig`, *optional*):
            The CLIP vision tower the experts were fine-tuned from.
        projection_dim (`int`, *optional*):
            Output size of the visual projection (the CLIP joint embedding size); required with `vision_config`.
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            The text model the experts were fine-tuned from; a dict is read as the config of its `model_type`
            (`"t5"` when it has none, as in artifacts saved before other text families existed). A T5 has plain
            `wi`/`wo` or gated `wi_0`/`wi_1`/`wo` feed-forward blocks; its decoder routes as `decoder_routing` says.
        tie_word_embeddings (`bool`, defaults to `False`):
            T5 only: whether `lm_head` shares the weight of the `shared` input embedding (as in the original T5) or
            has its own (Flan-T5, T5 v1.1). Set by the converter from the base checkpoint.
        tasks (`list[str]`):
            Every task the model serves (a classification head each, for CLIP), in order. Names are unique and
            non-empty. Unless `expert_tasks` says otherwise, each task has an expert, in this order.
        expert_tasks (`list[str]`, *optional*):
            The tasks that have an expert (a task vector and a routing slot), in expert order, which is their order
            in `tasks`. Unset: every task has one (artifacts saved before tasks without an expert existed). CLIP
            only: a task without an expert has just its zero-shot head, built from the base model's text tower,
            and the routers mix the other tasks' experts for its inputs too (the papers' unseen tasks).
        task_labels (`dict[str, list[str]]`, *optional*):
            CLIP: class names of each task's classification head, keyed by task (every task must have a non-empty
            list); required. T5: label words (the texts a task answers with) of some or all tasks, to which
            test-time adaptation restricts its entropy; optional. `id2label` is derived from it as
            `"<task>: <label>"`, in task order.
        num_experts (`int`, *optional*):
            Number of experts (task vectors) per WEMoE layer, the routers' output size. Defaults to the number of
            tasks with an expert (`tasks_with_experts`) and must equal it.
        upscale (`list[str]`, *optional*):
            The module groups of every layer whose linears are weight-ensembled experts: `"mlp"` (the feed-forward
            block, the paper's choice) and/or `"attention"` (the query, key, value and output projections; in a T5
            decoder, of the self- and the cross-attention). Every other tensor is merged statically. One routing
            vector per layer serves every upscaled linear of it, read from the input of the first upscaled group
            (the attention block's, when attention is upscaled). Unset: `["mlp"]` (artifacts saved before this
            field existed).
        router_mode (`"per_layer"` or `"shared"`, defaults to `"per_layer"`):
            `"per_layer"`: one router in every WEMoE layer (WEMoE). `"shared"`: one router owned by the model and
            used by every layer (E-WEMoE).
        router_hidden_layers (`int`, defaults to 2):
            Router depth. 2: `Linear(d, d) -> ReLU -> Linear(d, num_experts)` (the paper's default);
            1: `Linear(d, num_experts)`; 0: a learned vector of `num_experts` weights, the same for every input.
        init_lambda (`float`, defaults to 0.3):
            Initial routing weight of every expert: the last router layer starts at bias `init_lambda`.
        router_init (`"exact"` or `"reference"`, defaults to `"exact"`):
            How the routers start. `"exact"`: the last router layer's weight is 0, so a fresh model is exactly task
            arithmetic with scaling `init_lambda`. `"reference"`: that weight is drawn from N(0, 0.01), as the
            authors' reference implementation does, so a fresh model is task arithmetic up to small per-input
            deviations. The hidden layer is drawn from N(0, 0.01) either way. Only the initialisation differs: a
            saved model loads its router weights as they are.
        router_normalization (`"none"` or `"softmax"`, defaults to `"none"`):
            `"none"`: the router's outputs are the routing weights (the paper). `"softmax"` (an option, not the
            paper's method): a softmax over the experts, so every weight-ensembled matrix is a convex combination
            of the experts' own (`W0 + sum_i r_i tau_i = sum_i r_i theta_i`), uniform at the start (weight
            averaging; `init_lambda` then has no effect) and one expert's exactly when the router is sure. Test-time
            adaptation by entropy minimisation can then not sharpen predictions by inflating the task vectors'
            total scale, which unnormalised routing weights allow.
        router_top_k (`int`, *optional*):
            Keep only the `router_top_k` largest routing weights of each sample (or token) and zero the others, so
            fewer experts are mixed per input. Unset: every expert is mixed.
        routing_granularity (`"sample"` or `"token"`, defaults to `"sample"`):
            `"sample"`: one routing vector per sample, the router outputs averaged over its tokens (padding
            excluded). `"token"`: one routing vector per token (exact per-token weight ensembling). This applies
            to CLIP, BERT and the T5 encoder; the T5 decoder routes as `decoder_routing` says.
        decoder_routing (`"token"` or `"prompt"`, defaults to `"token"`):
            T5 only: how the decoder's WEMoE layers route. `"token"` (the paper): each layer routes every decoded
            token from the hidden states entering its feed-forward block (a generated sample is not known until it
            ends). `"prompt"` (an option, not the paper's method): each layer's router reads the prompt's pooled
            encoder output (the encoder's final hidden states averaged over the real tokens) and gives one routing
            vector per sample, the same at every decoding step: each generated sequence is decoded by one merged
            model, like the encoder's per-sample routing. Both give the same result with and without the KV cache.
        expert_format (`"dense"`, `"sparse"` or `"lowrank"`, defaults to `"dense"`):
            How task vectors are stored. `"sparse"` keeps the `keep` fraction of largest-magnitude entries of each
            tensor, stored as values plus a packed bitmask. `"lowrank"` stores each weight matrix's task vector as
            factors `B @ A` of rank `rank` (biases stay dense) and applies them as `sum_i r_i B_i (A_i x)`.
        keep (`float`, *optional*):
            Fraction of entries kept per task-vector tensor, in (0, 1]; required with `expert_format="sparse"`
            (0.1 is "E-WEMoE-90%"), must be unset otherwise.
        rank (`int`, *optional*):
            Rank of every low-rank task vector; required with `expert_format="lowrank"`, must be unset otherwise.
        static_merge (`dict`, *optional*):
            How the non-MLP parameters were merged, e.g. `{"method": "task_arithmetic", "scaling": 0.3}`.
            Provenance only.

    Example:

    ```python
    >>> from transformers import CLIPVisionConfig
    >>> from modeling_wemoe import WEMoEConfig, WEMoEForImageClassification

    >>> config = WEMoEConfig(
    ...     vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...                                    num_attention_heads=4, image_size=32, patch_size=8),
    ...     projection_dim=32,
    ...     tasks=["digits", "shapes"],
    ...     task_labels={"digits": ["zero", "one"], "shapes": ["circle", "square", "triangle"]},
    ... )
    >>> model = WEMoEForImageClassification(config)
    >>> config.id2label[2]
    'shapes: circle'
    ```
    """

    model_type = "wemoe"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=CLIPVisionConfig, optional=True),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="t5", optional=True),
    }

    vision_config: dict | PreTrainedConfig | None = None
    projection_dim: int | None = None
    text_config: dict | PreTrainedConfig | None = None
    tie_word_embeddings: bool = False
    tasks: list[str] | None = None
    expert_tasks: list[str] | None = None
    task_labels: dict[str, list[str]] | None = None
    num_experts: int | None = None
    upscale: list[str] | None = None
    router_mode: Literal["per_layer", "shared"] = "per_layer"
    router_hidden_layers: int = 2
    router_normalization: Literal["none", "softmax"] = "none"
    router_top_k: int | None = None
    init_lambda: float | int = 0.3
    router_init: Literal["exact", "reference"] = "exact"
    routing_granularity: Literal["sample", "token"] = "sample"
    decoder_routing: Literal["token", "prompt"] = "token"
    expert_format: Literal["dense", "sparse", "lowrank"] = "dense"
    keep: float | int | None = None
    rank: int | None = None
    static_merge: dict[str, Any] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.text_config is not None:
            self.is_encoder_decoder = bool(getattr(self.text_config, "is_encoder_decoder", False))
        if self.num_experts is None and self.tasks is not None:
            self.num_experts = len(self.tasks_with_experts)
        if self.task_labels is not None and self.tasks is not None:
            labels = [f"{task}: {label}" for task in self.tasks for label in self.task_labels.get(task, [])]
            self.id2label = dict(enumerate(labels))
            self.label2id = {label: i for i, label in enumerate(labels)}

    def validate_backbone(self):
        if (self.vision_config is None) == (self.text_config is None):
            raise ValueError(
                "Give exactly one of `vision_config` (CLIP) and `text_config` (T5): the backbone the experts were "
                "fine-tuned from."
            )
        if self.vision_config is not None and (self.projection_dim is None or self.projection_dim <= 0):
            raise ValueError(
                f"`projection_dim` must be a positive int with a CLIP backbone, got {self.projection_dim}."
            )
        if self.text_config is not None and self.projection_dim is not None:
            raise ValueError("`projection_dim` only applies to a CLIP backbone; unset it with `text_config`.")

    def validate_tasks(self):
        if not self.tasks:
            raise ValueError("`tasks` must list at least one task name.")
        if any(not isinstance(t, str) or not t for t in self.tasks):
            raise ValueError(f"`tasks` must hold non-empty strings, got {self.tasks}.")
        duplicates = sorted({t for t in self.tasks if self.tasks.count(t) > 1})
        if duplicates:
            raise ValueError(f"`tasks` has duplicate names {duplicates}; every task needs its own name.")
        self.check_expert_tasks()
        if self.num_experts != len(self.tasks_with_experts):
            what = "tasks" if self.expert_tasks is None else "tasks with an expert (`expert_tasks`)"
            raise ValueError(
                f"`num_experts` ({self.num_experts}) must equal the number of {what} "
                f"({len(self.tasks_with_experts)}): every expert is one task's fine-tuned model."
            )
        if self.task_labels is None:
            return
        # An image classifier's heads need every task's classes; a text model's labels may be given for some tasks
        # (T5 label words; a text classifier checks for all of them itself).
        labelled = set(self.task_labels) == set(self.tasks) or (
            self.text_config is not None and set(self.task_labels) <= set(self.tasks)
        )
        if not labelled:
            raise ValueError(
                f"`task_labels` must have one entry per task: tasks {self.tasks}, "
                f"task_labels keys {list(self.task_labels)}."
            )
        empty = [t for t in self.task_labels if not self.task_labels[t]]
        if empty:
            raise ValueError(f"`task_labels` has an empty class list for task(s) {empty}.")

    def check_expert_tasks(self) -> None:
        if self.expert_tasks is None:
            return
        if self.vision_config is None:
            raise ValueError(
                "`expert_tasks` applies to a CLIP backbone only: a task without an expert needs a zero-shot head, "
                "which only CLIP builds; every task of a text model has an expert (unset `expert_tasks`)."
            )
        if not self.expert_tasks:
            raise ValueError("`expert_tasks` must list at least one task: a WEMoE model needs an expert to route to.")
        in_task_order = [task for task in self.tasks if task in self.expert_tasks]
        if self.expert_tasks != in_task_order:
            raise ValueError(
                f"`expert_tasks` {self.expert_tasks} must name tasks of `tasks` {self.tasks}, each once and in the "
                "order of `tasks`."
            )

    def validate_upscale(self):
        if self.upscale is None:
            return
        unknown = [group for group in self.upscale if group not in UPSCALE_GROUPS]
        if not self.upscale or unknown or len(set(self.upscale)) != len(self.upscale):
            raise ValueError(
                f"`upscale` must list one or more of {list(UPSCALE_GROUPS)}, each once, got {self.upscale}."
            )

    @property
    def upscaled_groups(self) -> tuple[str, ...]:
        """The module groups whose linears are experts (`upscale`, `("mlp",)` when unset)."""
        return tuple(self.upscale or ("mlp",))

    def validate_router(self):
        if self.router_hidden_layers not in (0, 1, 2):
            raise ValueError(f"`router_hidden_layers` must be 0, 1 or 2, got {self.router_hidden_layers}.")
        if self.router_top_k is not None and not 1 <= self.router_top_k <= (self.num_experts or 0):
            raise ValueError(
                f"`router_top_k` must be between 1 and num_experts ({self.num_experts}), got {self.router_top_k}."
            )
        if self.router_normalization not in ("none", "softmax"):
            raise ValueError(f"`router_normalization` must be 'none' or 'softmax', got {self.router_normalization!r}.")
        if not math.isfinite(self.init_lambda):
            raise ValueError(f"`init_lambda` must be a finite number, got {self.init_lambda}.")
        if self.router_init not in ("exact", "reference"):
            raise ValueError(f"`router_init` must be 'exact' or 'reference', got {self.router_init!r}.")

    def validate_decoder_routing(self):
        if self.decoder_routing not in ("token", "prompt"):
            raise ValueError(f"`decoder_routing` must be 'token' or 'prompt', got {self.decoder_routing!r}.")
        if self.decoder_routing == "prompt" and not self.is_encoder_decoder:
            raise ValueError(
                "`decoder_routing='prompt'` routes a decoder once per prompt, from the encoder's output: it needs an "
                f"encoder-decoder backbone (T5), and this config's is {self.backbone!r}."
            )

    def validate_expert_format(self):
        if self.expert_format == "sparse":
            if self.keep is None or not 0 < self.keep <= 1:
                raise ValueError(f"`keep` must be in (0, 1] with expert_format='sparse', got {self.keep}.")
        elif self.keep is not None:
            raise ValueError(
                f"`keep` ({self.keep}) only applies to expert_format='sparse', got '{self.expert_format}'."
            )
        if self.expert_format == "lowrank":
            if self.rank is None or self.rank < 1:
                raise ValueError(f"`rank` must be a positive int with expert_format='lowrank', got {self.rank}.")
        elif self.rank is not None:
            raise ValueError(
                f"`rank` ({self.rank}) only applies to expert_format='lowrank', got '{self.expert_format}'."
            )

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> PreTrainedConfig:
        """As for any config; with `decoder=True` and an encoder-decoder backbone (T5), the decoder's view of
        `text_config` (its own layer count), which `generate()` sizes the KV cache from."""
        text_config = super().get_text_config(decoder=decoder, encoder=encoder)
        if decoder and not encoder and text_config is self.text_config and self.is_encoder_decoder:
            text_config = copy.deepcopy(text_config)
            text_config.is_decoder, text_config.num_layers = True, text_config.num_decoder_layers
        return text_config

    @property
    def backbone(self) -> str:
        """Which model family the experts are: `"clip"` (with `vision_config`), else `text_config`'s model type."""
        return "clip" if self.vision_config is not None else self.text_config.model_type

    @property
    def tasks_with_experts(self) -> list[str]:
        """The tasks that have an expert, in expert order: routing weight `i` is `tasks_with_experts[i]`'s."""
        return list(self.tasks) if self.expert_tasks is None else list(self.expert_tasks)

    @property
    def tasks_without_experts(self) -> list[str]:
        """The tasks served by their head alone (CLIP zero-shot heads), in task order."""
        return [task for task in self.tasks if task not in self.tasks_with_experts]

    @property
    def task_label_offsets(self) -> dict[str, tuple[int, int]]:
        """`(start, end)` of each task's classes in the concatenated label space."""
        offsets, start = {}, 0
        for task in self.tasks:
            end = start + len(self.task_labels[task])
            offsets[task] = (start, end)
            start = end
        return offsets


WEMoEConfig.register_for_auto_class()

__all__ = ["UPSCALE_GROUPS", "WEMoEConfig"]
