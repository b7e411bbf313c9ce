"""Layer-wise AdaMerging (Yang et al., ICLR 2024, https://arxiv.org/abs/2310.02575): a static merge whose
coefficients are learned on unlabeled test data.

Every tensor l of the merged tower becomes theta_0[l] + sum_i lambda[l, i] * tau_i[l], with one coefficient per tensor
and task, clamped to [0, 1] and trained by the same entropy minimisation as WEMoE's routers
(`wemoe.adaptation.adapt`).
The result is an ordinary model: after training, the coefficients are folded into the weights.
"""

from collections.abc import Mapping

import torch
from torch import nn
from torch.func import functional_call

from .adaptation import adapt
from .build import task_vector_stacks
from .checkpoints import TensorSource
from .recipe import DEFAULT_LAMBDA
from .streams import TaskStream

COEFFICIENTS = "merge_coefficients"


def buffer_name(key: str) -> str:
    return key.replace(".", "__")


class LayerWiseAdaMerging(nn.Module):
    """`classifier` with the tensors under `prefix` replaced by their layer-wise merge; only the coefficients train.

    `classifier(**inputs, task=...)` must return an output with `.logits`, as the TTA task streams expect. Holds
    theta_0 and every expert's task vector of each merged tensor (float32), so it suits models that fit in memory
    num_experts + 1 times.
    """

    def __init__(
        self,
        classifier: nn.Module,
        prefix: str,
        base: TensorSource,
        experts: Mapping[str, TensorSource],
        init_lambda: float = DEFAULT_LAMBDA,
    ):
        super().__init__()
        self.classifier = classifier.requires_grad_(False)
        self.prefix = prefix
        self.keys = []
        for key, task_vectors in task_vector_stacks(base, dict(experts)):
            if base[key].is_floating_point():
                self.keys.append(key)
                self.register_buffer(f"pretrained__{buffer_name(key)}", base[key].float(), persistent=False)
                self.register_buffer(f"task_vectors__{buffer_name(key)}", task_vectors, persistent=False)
        self.merge_coefficients = nn.Parameter(torch.full((len(self.keys), len(experts)), init_lambda))

    @property
    def config(self):
        """The wrapped model's config (the task streams read the decoder start token of a T5 from it)."""
        return self.classifier.config

    def merged_tensors(self) -> dict[str, torch.Tensor]:
        """theta_0 + sum_i lambda[l, i] tau_i for every merged tensor, keyed as in the base tower."""
        coefficients = self.merge_coefficients.clamp(0.0, 1.0)
        merged = {}
        for index, key in enumerate(self.keys):
            pretrained = getattr(self, f"pretrained__{buffer_name(key)}")
            task_vectors = getattr(self, f"task_vectors__{buffer_name(key)}")
            merged[key] = pretrained + (coefficients[index] @ task_vectors.flatten(1)).view_as(pretrained)
        return merged

    def forward(self, *args, **kwargs):
        tensors = {self.prefix + key: value for key, value in self.merged_tensors().items()}
        return functional_call(self.classifier, tensors, args, kwargs, strict=False)


def is_merge_coefficient(name: str) -> bool:
    return name == COEFFICIENTS


def train_layer_wise_merge(
    classifier: nn.Module,
    prefix: str,
    base: TensorSource,
    experts: Mapping[str, TensorSource],
    streams: Mapping[str, TaskStream],
    options: Mapping,
) -> dict[str, torch.Tensor]:
    """Layer-wise AdaMerging of the tensors under `prefix` in `classifier`, its coefficients trained on the tasks'
    unlabeled streams (`options`: a validated AdaMerging spec, `wemoe.recipe.AdaMergingSpec`, as a dict); the
    merged tensors, keyed as in the base."""
    merging = LayerWiseAdaMerging(classifier, prefix, base, experts, options["init_lambda"])
    merging = adapt(
        merging, streams, steps=options["steps"], lr=options["lr"], seed=options["seed"], trainable=is_merge_coefficient
    )
    with torch.no_grad():
        return {key: tensor.detach().clone() for key, tensor in merging.merged_tensors().items()}
