"""Merge methods as pure tensor functions, registered by name.

Each static method maps a pre-trained tensor and the experts' task vectors for it to one merged tensor, so it can
be unit-tested on plain tensors and chosen by name from a recipe (whose `static_merge` specs, in
`wemoe.recipe`, declare and validate each method's parameters). Where peft's `peft.utils.merge_utils` computes
the same thing, its function is used rather than a copy.
"""

import hashlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from peft.utils import merge_utils

from modeling_wemoe.modeling_wemoe import magnitude_keep_mask


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
    that agree with it, and add `scaling` times that to theta_0. Trimming is per tensor, as in mergekit.

    Not peft's `ties`, which differs from the paper's reference code in two ways: a tied vote elects + there (here the
    tensor's overall majority sign, as in the reference code; ties are frequent with `"frequency"`), and it keeps
    floor(density * numel) entries (here round(), as E-WEMoE's `keep` does)."""
    trimmed = task_vectors * magnitude_keep_mask(task_vectors, density)
    votes = trimmed.sum(dim=0) if majority_sign == "total" else torch.sign(trimmed).sum(dim=0)
    elected = torch.sign(votes)
    # Entries with a tied vote take the tensor's overall majority sign (as the reference implementation does).
    elected[elected == 0] = torch.sign(elected.sum()) if elected.sum() != 0 else 1.0
    agrees = (torch.sign(trimmed) == elected) & (trimmed != 0)
    return pretrained + scaling * merge_utils.disjoint_merge(trimmed, agrees)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch's global generator seeded with `seed` inside the block and restored after it: peft's random pruning
    draws from the global generator, and a merge must neither depend on nor disturb the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def equal_weights(task_vectors: torch.Tensor) -> torch.Tensor:
    """peft's methods weight each task vector; ours scale the sum once, so every expert weighs 1."""
    return torch.ones(task_vectors.shape[0], dtype=task_vectors.dtype)


@register_static_merge("magnitude_prune", "Magnitude pruning", "https://arxiv.org/abs/2306.01708")
def magnitude_prune(
    pretrained: torch.Tensor, task_vectors: torch.Tensor, scaling: float, density: float
) -> torch.Tensor:
    """Task arithmetic on task vectors trimmed to their `density` largest-magnitude entries (TIES's first step
    alone; peft's `magnitude_prune`)."""
    return pretrained + scaling * merge_utils.magnitude_prune(list(task_vectors), equal_weights(task_vectors), density)


@register_static_merge("dare_linear", "DARE (linear)", "https://arxiv.org/abs/2311.03099")
def dare_linear(
    pretrained: torch.Tensor, task_vectors: torch.Tensor, scaling: float, density: float, seed: int
) -> torch.Tensor:
    """DARE: drop each task-vector entry at random with probability 1 - `density`, rescale the kept ones by
    1 / `density`, and add `scaling` times their sum (peft's `dare_linear`). Random, but drawn from `seed`: the same
    inputs and seed give the same tensor."""
    with seeded(seed):
        return pretrained + scaling * merge_utils.dare_linear(list(task_vectors), equal_weights(task_vectors), density)


@register_static_merge("dare_ties", "DARE-TIES", "https://arxiv.org/abs/2311.03099")
def dare_ties(
    pretrained: torch.Tensor, task_vectors: torch.Tensor, scaling: float, density: float, majority_sign: str, seed: int
) -> torch.Tensor:
    """DARE's random drop and rescale, then TIES's sign election and disjoint mean (peft's `dare_ties`: a tied vote
    elects +). Random, but drawn from `seed`: the same inputs and seed give the same tensor."""
    with seeded(seed):
        merged = merge_utils.dare_ties(list(task_vectors), equal_weights(task_vectors), density, majority_sign)
    return pretrained + scaling * merged


def tensor_seed(seed: int, key: str) -> int:
    """A seed of its own for each tensor, from the recipe's seed and the tensor's key: tensors of one shape do not
    share a drop pattern, and a tensor's draw does not depend on which other tensors are merged or in what order."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little")


def static_merger(static_merge: Mapping[str, Any]) -> Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]:
    """A validated `static_merge` spec as one function `(key, pretrained, task_vectors) -> merged` for a pass over a
    model's tensors; a seeded method gets each tensor's own seed (`tensor_seed`)."""
    method = get_static_merge(static_merge["method"])
    options = {name: value for name, value in static_merge.items() if name != "method"}

    def merge_tensor(key: str, pretrained: torch.Tensor, task_vectors: torch.Tensor) -> torch.Tensor:
        seed = {"seed": tensor_seed(options["seed"], key)} if "seed" in options else {}
        return method.merge(pretrained, task_vectors, **{**options, **seed})

    return merge_tensor
