"""Merge methods as pure tensor functions, registered by name.

Each static method maps a pre-trained tensor and the experts' task vectors for it to one merged tensor, so it can
be unit-tested on plain tensors and chosen by name from a recipe.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from modeling_wemoe.modeling_wemoe import num_kept_entries


@dataclass(frozen=True)
class StaticMergeMethod:
    name: str
    pretty_name: str
    reference: str
    merge: Callable[..., torch.Tensor]


STATIC_MERGE_METHODS: dict[str, StaticMergeMethod] = {}


def register_static_merge(name: str, pretty_name: str, reference: str):
    def decorator(function: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        STATIC_MERGE_METHODS[name] = StaticMergeMethod(name, pretty_name, reference, function)
        return function

    return decorator


def get_static_merge(name: str) -> StaticMergeMethod:
    if name not in STATIC_MERGE_METHODS:
        raise ValueError(f"Unknown static merge method {name!r}; available: {sorted(STATIC_MERGE_METHODS)}.")
    return STATIC_MERGE_METHODS[name]


@register_static_merge("task_arithmetic", "Task Arithmetic", "https://arxiv.org/abs/2212.04089")
def task_arithmetic(pretrained: torch.Tensor, task_vectors: torch.Tensor, scaling: float = 0.3) -> torch.Tensor:
    """theta_0 + scaling * sum_i tau_i, for task vectors stacked as `(num_experts, *shape)`."""
    return pretrained + scaling * task_vectors.sum(dim=0)


def magnitude_keep_mask(task_vectors: torch.Tensor, keep: float) -> torch.Tensor:
    """For each expert's tensor in `(num_experts, *shape)`, mark exactly round(keep * numel) entries of largest
    magnitude (E-WEMoE's per-tensor magnitude pruning)."""
    flat = task_vectors.reshape(task_vectors.shape[0], -1)
    num_kept = num_kept_entries(flat.shape[1], keep)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask.scatter_(1, flat.abs().topk(num_kept, dim=1).indices, True)
    return mask.view(task_vectors.shape)
