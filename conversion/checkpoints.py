"""Reading CLIP base models and fine-tuned experts, and checking up front that they can be merged.

Every problem is reported with the task, the tensor or config field, and what was expected: a merge either
succeeds with the right model or stops before building anything.
"""

import logging
import os

import torch
from transformers import CLIPModel, CLIPVisionConfig, CLIPVisionModel, PreTrainedModel

logger = logging.getLogger(__name__)

ModelSource = PreTrainedModel | str | os.PathLike

# Fields that decide tensor shapes or the forward computation of a CLIP vision tower.
CLIP_VISION_ARCHITECTURE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "image_size",
    "patch_size",
    "hidden_act",
    "layer_norm_eps",
)


def from_pretrained_checked(model_class: type[PreTrainedModel], source: ModelSource, owner: str) -> PreTrainedModel:
    """`model_class.from_pretrained(source)`, refusing checkpoints that leave tensors missing or mis-shaped."""
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"{owner} must be a CLIP model, a local directory or a Hub id, got {type(source).__name__}.")
    model, loading_info = model_class.from_pretrained(source, output_loading_info=True)
    # transformers 5 leaves tensors absent from a checkpoint uninitialised: that would be a silently wrong model.
    missing = sorted(loading_info.get("missing_keys", ()))
    if missing:
        raise ValueError(f"{owner} checkpoint {str(source)!r} is missing tensors {missing}.")
    mismatched = sorted(loading_info.get("mismatched_keys", ()))
    if mismatched:
        raise ValueError(
            f"{owner} checkpoint {str(source)!r} has tensors whose shape does not match its config: {mismatched}."
        )
    return model


def load_clip_model(source: ModelSource) -> CLIPModel:
    """The base model: a `CLIPModel` (its text tower builds the zero-shot heads), in memory, a local dir or a Hub id."""
    if isinstance(source, CLIPModel):
        return source
    if isinstance(source, PreTrainedModel):
        raise TypeError(f"The base model must be a CLIPModel (vision and text towers), got {type(source).__name__}.")
    return from_pretrained_checked(CLIPModel, source, "The base model")


def load_vision_tower(source: ModelSource, task: str) -> CLIPVisionModel:
    """A fine-tuned expert's vision tower, from a `CLIPModel` or `CLIPVisionModel` in memory, a local dir or a Hub id
    (both checkpoint key layouts, with and without the `vision_model.` prefix)."""
    if isinstance(source, CLIPModel):
        return source.vision_model
    if isinstance(source, CLIPVisionModel):
        return source
    if isinstance(source, PreTrainedModel):
        raise TypeError(f"Expert {task!r} must be a CLIPVisionModel or CLIPModel, got {type(source).__name__}.")
    return from_pretrained_checked(CLIPVisionModel, source, f"Expert {task!r}")


def check_same_architecture(base: CLIPVisionConfig, expert: CLIPVisionConfig, task: str) -> None:
    differences = [
        f"{field}: base {getattr(base, field)!r}, expert {getattr(expert, field)!r}"
        for field in CLIP_VISION_ARCHITECTURE_FIELDS
        if getattr(base, field) != getattr(expert, field)
    ]
    if differences:
        raise ValueError(f"Expert {task!r} does not share the base model's architecture: {'; '.join(differences)}.")


def check_finite(state_dict: dict[str, torch.Tensor], owner: str) -> None:
    for key, tensor in state_dict.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"Tensor {key!r} of {owner} contains NaN or inf values.")


def check_matching_tensors(base: dict[str, torch.Tensor], expert: dict[str, torch.Tensor], task: str) -> None:
    missing = sorted(base.keys() - expert.keys())
    if missing:
        raise ValueError(f"Expert {task!r} is missing tensors that the base model has: {missing}.")
    extra = sorted(expert.keys() - base.keys())
    if extra:
        raise ValueError(f"Expert {task!r} has tensors that the base model does not: {extra}.")
    for key, tensor in base.items():
        if expert[key].shape != tensor.shape:
            raise ValueError(
                f"Tensor {key!r} of expert {task!r} has shape {tuple(expert[key].shape)}, "
                f"the base model's has {tuple(tensor.shape)}."
            )
