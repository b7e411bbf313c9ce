"""Tiny random CLIP models built in-process: the demo's embedded default and the tests' fixtures.

Nothing is downloaded. Experts are the base vision tower plus seeded random perturbations: they have the structure
of real fine-tunes (same architecture, distinct task vectors) but no learned skill.
"""

import string

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, CLIPVisionModel

TOY_CHARACTERS = string.ascii_lowercase + string.digits + ".,'-"


def toy_tokenizer() -> CLIPTokenizer:
    """A character-level CLIP tokenizer (no merges) covering lowercase prompts."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for character in TOY_CHARACTERS:
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
