"""Filling a WEMoE model from a base model's and experts' tensors, for any backbone.

The MLP / feed-forward linears keep theta_0 plus the experts' stacked task vectors (dense, sparse or low-rank);
every other tensor is merged once by a static merge method. Tensors are processed one key at a time, so only one
tensor per expert is in memory.
"""

import logging
from collections.abc import Iterator, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedConfig

from modeling_wemoe import WEMoEConfig
from modeling_wemoe.modeling_wemoe import (
    TASK_RECORD,
    WEMoELinear,
    is_router_parameter,
)

from .checkpoints import (
    CheckpointLayout,
    ModelSource,
    TensorSource,
    check_finite,
    check_matching_tensors,
    check_same_architecture,
    open_expert,
)
from .merge_methods import static_merger
from .recipe import MergeOptions

logger = logging.getLogger(__name__)

# WEMoE (ICML 2024): a router per layer, dense task vectors. E-WEMoE: one shared router, sparse task vectors.
VARIANTS = {
    "wemoe": {"router_mode": "per_layer", "expert_format": "dense"},
    "e-wemoe": {"router_mode": "shared", "expert_format": "sparse"},
}


def check_experts_given(experts: Mapping[str, object]) -> None:
    if not experts:
        raise ValueError("`experts` is empty: give at least one fine-tuned model, keyed by task name.")


def wemoe_config_options(options: MergeOptions) -> dict:
    """The `WEMoEConfig` fields that the merge options decide (the recipe's names map to the artifact's here)."""
    if options.variant not in VARIANTS:
        raise ValueError(
            f"variant {options.variant!r} builds a plain model (`merge_static`); a WEMoE model is one of "
            f"{sorted(VARIANTS)}."
        )
    expert_format = options.expert_format or VARIANTS[options.variant]["expert_format"]
    return {
        "router_mode": VARIANTS[options.variant]["router_mode"],
        "expert_format": expert_format,
        "keep": options.keep if expert_format == "sparse" else None,
        "rank": options.rank if expert_format == "lowrank" else None,
        "init_lambda": options.router.init_lambda,
        "router_init": options.router.init,
        "router_hidden_layers": options.router.hidden_layers,
        "router_normalization": options.router.normalization,
        "router_top_k": options.router.top_k,
        "routing_granularity": options.router.granularity,
        "decoder_routing": options.router.decoder_routing,
        "static_merge": options.static_merge.model_dump(),
        "upscale": list(options.upscale),
    }


def open_experts(
    base: TensorSource, base_config: PreTrainedConfig, experts: Mapping[str, ModelSource], layout: CheckpointLayout
) -> tuple[dict[str, TensorSource], dict[str, PreTrainedConfig | None]]:
    """Every expert's tensors and config (None for a LoRA adapter), their architectures and tensor shapes checked
    against the base before anything is built (tensors themselves are read later, one at a time)."""
    sources, configs = {}, {}
    for task, source in tqdm(experts.items(), desc="Opening experts", unit="expert"):
        tensors, config = open_expert(source, task, base, layout)
        if config is not None:
            check_same_architecture(base_config, config, task, layout)
        check_matching_tensors(base, tensors, layout)
        sources[task], configs[task] = tensors, config
    return sources, configs


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


def task_vector_stacks(base: TensorSource, experts: dict[str, TensorSource]) -> Iterator[tuple[str, torch.Tensor]]:
    """Each of the base's tensors with its stacked task vectors (`stacked_task_vectors`), one key at a time. Once
    every tensor is read, an expert whose task vectors are all zero is named in a warning: it is the base itself
    (a checkpoint given by mistake, or one that was never trained), and its expert adds nothing to the merge."""
    moved = torch.zeros(len(experts), dtype=torch.bool)
    for key in tqdm(base.shapes, desc="Merging tensors", unit="tensor"):
        task_vectors = stacked_task_vectors(key, base, experts)
        moved |= task_vectors.flatten(1).ne(0).any(dim=1)
        yield key, task_vectors
    for task, expert_moved in zip(experts, moved.tolist(), strict=True):
        if not expert_moved:
            logger.warning(
                "Expert %r equals the base model: every tensor merged is the base's (its task vectors are zero), so "
                "it adds nothing to the merge. Check that its checkpoint is the fine-tuned model.", task
            )


@torch.no_grad()
def static_merge_tensors(base: TensorSource, experts: dict[str, TensorSource], static_merge: Mapping) -> dict:
    """Every tensor of the base merged by a data-free static method (task arithmetic, TIES, ...), keyed as in
    `base`."""
    merge_tensor = static_merger(static_merge)
    return {
        key: merge_tensor(key, base[key].float(), task_vectors).to(base[key].dtype)
        for key, task_vectors in task_vector_stacks(base, experts)
    }


@torch.no_grad()
def fill_backbone(
    target: nn.Module,
    base: TensorSource,
    experts: dict[str, TensorSource],
    config: WEMoEConfig,
) -> dict[str, list[float]]:
    """Write every backbone tensor of `target` (keys as in `base`): weight-ensembled linears get theta_0 and their
    stacked task vectors, every other tensor the static merge of `config.static_merge`. Returns, for low-rank
    experts, each compressed tensor's relative reconstruction error per expert."""
    merge_tensor = static_merger(config.static_merge)
    linears = {name: module for name, module in target.named_modules() if isinstance(module, WEMoELinear)}
    ensembled = {f"{name}.{kind}": (module, kind) for name, module in linears.items() for kind in ("weight", "bias")}

    merged_state, reconstruction_errors = {}, {}
    for key, task_vectors in task_vector_stacks(base, experts):
        if key in ensembled:
            module, kind = ensembled[key]
            error = getattr(module, f"{kind}_task_vectors").assign_task_vectors(task_vectors)
            if error is not None:
                reconstruction_errors[key] = error.tolist()
            merged_state[key] = base[key]
        else:
            merged_state[key] = merge_tensor(key, base[key].float(), task_vectors)

    result = target.load_state_dict(merged_state, strict=False)
    # A tied parameter (T5's lm_head reusing `shared`) is written through the key it is tied to.
    parameters = dict(target.named_parameters(remove_duplicate=False))
    written = {id(parameters[key]) for key in merged_state if key in parameters}
    not_written = [
        key
        for key in result.missing_keys
        if "task_vectors" not in key
        and not is_router_parameter(key)
        and key != TASK_RECORD
        and id(parameters.get(key)) not in written
    ]
    if not_written or result.unexpected_keys:
        raise RuntimeError(
            f"The WEMoE model does not match the {base.owner.lower()}'s tensors: not written {not_written}, "
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
