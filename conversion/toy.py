"""Tiny random CLIP models built in-process: the demo's embedded default and the tests' fixtures.

Nothing is downloaded. `build_toy_expert` makes the base vision tower plus seeded random perturbations: the
structure of real fine-tunes (same architecture, distinct task vectors) without skill, for the tests.
`train_toy_expert` fine-tunes the tower on a task's labelled images in a few seconds, for the demo.
"""

import string

import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, CLIPVisionModel

TOY_CHARACTERS = string.ascii_lowercase + string.digits + ".,'-"


def toy_tokenizer(characters: str = TOY_CHARACTERS) -> CLIPTokenizer:
    """A character-level CLIP tokenizer (no merges) covering lowercase prompts (any other character reads as the
    end of text)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for character in characters:
        vocab[character] = len(vocab)
        vocab[f"{character}</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def toy_clip_config(
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    projection_dim: int = 16,
) -> CLIPConfig:
    vocab_size = len(toy_tokenizer())
    shared = {
        "hidden_size": hidden_size,
        "intermediate_size": 4 * hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": 4,
        "hidden_act": "quick_gelu",
    }
    return CLIPConfig(
        vision_config={**shared, "image_size": image_size, "patch_size": patch_size},
        text_config={
            **shared,
            "vocab_size": vocab_size,
            "max_position_embeddings": 64,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        projection_dim=projection_dim,
    )


def build_toy_base(seed: int = 0, **config_kwargs) -> CLIPModel:
    torch.manual_seed(seed)
    return CLIPModel(toy_clip_config(**config_kwargs)).eval()


@torch.no_grad()
def build_toy_expert(base: CLIPModel, seed: int, scale: float = 0.1) -> CLIPVisionModel:
    """A "fine-tuned" vision tower: every base tensor plus seeded noise proportional to its spread."""
    expert = CLIPVisionModel(base.config.vision_config)
    expert.load_state_dict(base.vision_model.state_dict())
    return perturb_(expert, seed, scale).eval()


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int, scale: float) -> torch.nn.Module:
    """Add seeded noise proportional to each parameter's spread, in place: a stand-in for fine-tuning."""
    generator = torch.Generator().manual_seed(seed)
    for parameter in model.parameters():
        spread = parameter.std().clamp_min(0.02) if parameter.numel() > 1 else torch.tensor(0.02)
        parameter.add_(scale * spread * torch.randn(parameter.shape, generator=generator))
    return model


def train_toy_expert(
    base: CLIPModel,
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    head: torch.Tensor,
    steps: int,
    seed: int,
    lr: float = 1e-3,
    batch_size: int = 32,
) -> CLIPVisionModel:
    """A vision tower fine-tuned on one task: cross-entropy of its images against the task's zero-shot `head` (the
    class names' text embeddings, as the paper's experts are trained). Only the MLPs train, so that the part a merge
    keeps static is the base's, as on a strong base whose attention moves little in fine-tuning."""
    expert = CLIPVisionModel(base.config.vision_config)
    expert.load_state_dict(base.vision_model.state_dict())
    mlps = [parameter for name, parameter in expert.named_parameters() if ".mlp." in name]
    optimizer = torch.optim.Adam(mlps, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = torch.randint(len(labels), (batch_size,), generator=generator)
        embeddings = base.visual_projection(expert(pixel_values=pixel_values[batch]).pooler_output)
        logits = base.logit_scale.exp() * F.normalize(embeddings, dim=-1) @ head.t()
        loss = F.cross_entropy(logits, labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return expert.eval()
