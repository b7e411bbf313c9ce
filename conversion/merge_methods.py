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


@register_static_merge("ties", "TIES-Merging", "https://arxiv.org/abs/2306.01708")
def ties_merging(
    pretrained: torch.Tensor,
    task_vectors: torch.Tensor,
    scaling: float = 0.3,
    density: float = 0.2,
    majority_sign: str = "total",
) -> torch.Tensor:
    """TIES on one tensor: trim each task vector to its `density` largest-magnitude entries, elect a sign per entry
    (`"total"`: sign of the summed trimmed values; `"frequency"`: sign held by most experts), average the entries
    that agree with it, and add `scaling` times that to theta_0. Trimming is per tensor, as in mergekit."""
    trimmed = task_vectors * magnitude_keep_mask(task_vectors, density)
    votes = trimmed.sum(dim=0) if majority_sign == "total" else torch.sign(trimmed).sum(dim=0)
    elected = torch.sign(votes)
    # Entries with a tied vote take the tensor's overall majority sign (as the reference implementation does).
    elected[elected == 0] = torch.sign(elected.sum()) if elected.sum() != 0 else 1.0
    agrees = (torch.sign(trimmed) == elected) & (trimmed != 0)
    merged = (trimmed * agrees).sum(dim=0) / agrees.sum(dim=0).clamp_min(1)
    return pretrained + scaling * merged


def low_rank_factors(task_vectors: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors of each expert's task-vector matrix in `(num_experts, out, in)` (truncated SVD):
    `A` `(num_experts, rank, in)`, `B` `(num_experts, out, rank)`, and each expert's relative reconstruction error
    ||tau - B A||_F / ||tau||_F. Ranks above the matrix size are zero-padded (exact)."""
    u, s, vh = torch.linalg.svd(task_vectors.float(), full_matrices=False)
    kept = min(rank, s.shape[-1])
    factor_b = task_vectors.new_zeros(task_vectors.shape[0], task_vectors.shape[1], rank, dtype=torch.float32)
    factor_a = task_vectors.new_zeros(task_vectors.shape[0], rank, task_vectors.shape[2], dtype=torch.float32)
    factor_b[..., :kept] = u[..., :kept] * s[..., None, :kept]
    factor_a[:, :kept] = vh[:, :kept]
    residual = torch.linalg.matrix_norm(task_vectors.float() - factor_b @ factor_a)
    error = residual / torch.linalg.matrix_norm(task_vectors.float()).clamp_min(torch.finfo(torch.float32).tiny)
    return factor_a, factor_b, error
