"""Zero-shot classification heads from the base CLIP text tower (as in the paper and CLIP's own evaluation)."""

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import CLIPModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import ImageClassifierOutput

# A few of CLIP's ImageNet prompt templates; tasks may bring their own.
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a good photo of a {}.",
    "a close-up photo of a {}.",
)


@torch.no_grad()
def zero_shot_head(
    clip: CLIPModel,
    tokenizer: PreTrainedTokenizerBase,
    classnames: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
) -> torch.Tensor:
    """`(num_classes, projection_dim)` class embeddings: each class's prompts embedded by the text tower,
    L2-normalised, averaged over templates and normalised again."""
    texts = [template.format(name) for name in classnames for template in templates]
    inputs = tokenizer(
        texts,
        padding=True,
        truncation=True,
        max_length=clip.config.text_config.max_position_embeddings,
        return_tensors="pt",
    ).to(clip.device)
    embeddings = clip.get_text_features(**inputs).pooler_output
    embeddings = F.normalize(embeddings, dim=-1).view(len(classnames), len(templates), -1)
    head = F.normalize(embeddings.mean(dim=1), dim=-1)
    check_distinct_classes(head, classnames)
    return head


def check_distinct_classes(head: torch.Tensor, classnames: Sequence[str]) -> None:
    """Two classes with the same embedding can never be told apart: a tokenizer that reads their names alike (one
    with no vocabulary reads every name alike) would give a head whose logits are all equal."""
    similarity = head @ head.t()
    similarity.fill_diagonal_(-1.0)
    first, second = divmod(int(similarity.argmax()), len(classnames))
    if len(classnames) > 1 and similarity[first, second] > 1 - 1e-6:
        raise ValueError(
            f"Classes {classnames[first]!r} and {classnames[second]!r} get the same zero-shot embedding: the "
            "tokenizer reads their prompts alike, so the head could never tell them apart. Check the base model's "
            "tokenizer and the class names."
        )


def zero_shot_heads(
    clip: CLIPModel,
    tokenizer: PreTrainedTokenizerBase,
    classnames: Mapping[str, Sequence[str]],
    templates: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, torch.Tensor]:
    """Each task's head, with the task's own templates where given and CLIP's photo prompts otherwise."""
    templates = templates or {}
    heads = {}
    for task, names in tqdm(classnames.items(), desc="Building zero-shot heads", unit="task"):
        try:
            heads[task] = zero_shot_head(clip, tokenizer, names, templates.get(task, DEFAULT_TEMPLATES))
        except ValueError as error:
            raise ValueError(f"Task {task!r}: {error}") from None
    return heads


class ZeroShotCLIP(torch.nn.Module):
    """A plain `CLIPModel` as a per-task classifier: heads from its own text tower and the tasks' class names."""

    def __init__(
        self,
        clip: CLIPModel,
        tokenizer: PreTrainedTokenizerBase,
        classnames: Mapping[str, Sequence[str]],
        templates: Mapping[str, Sequence[str]] | None = None,
    ):
        super().__init__()
        self.clip = clip
        self.heads = zero_shot_heads(clip, tokenizer, classnames, templates)

    def forward(self, pixel_values: torch.Tensor, task: str) -> ImageClassifierOutput:
        image_embeds = F.normalize(self.clip.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)
        logits = self.clip.logit_scale.exp() * image_embeds @ self.heads[task].t()
        return ImageClassifierOutput(logits=logits)
