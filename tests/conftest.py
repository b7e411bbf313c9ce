"""Session fixtures: a tiny random CLIP base, task experts and class names, built in-process (no network)."""

import pytest
import torch
from transformers import CLIPModel

from conversion.toy import build_toy_base, build_toy_expert, toy_tokenizer

CLASSNAMES = {
    "shapes": ["circle", "square", "triangle"],
    "colors": ["red", "green", "blue", "yellow"],
    "scenes": ["beach", "forest"],
}


@pytest.fixture(scope="session")
def base() -> CLIPModel:
    return build_toy_base(seed=0)


@pytest.fixture(scope="session")
def tokenizer():
    return toy_tokenizer()


@pytest.fixture(scope="session")
def experts(base):
    """Three experts of both accepted kinds: `CLIPVisionModel`s and one full `CLIPModel`."""
    towers = {task: build_toy_expert(base, seed=i + 1) for i, task in enumerate(CLASSNAMES)}
    full = CLIPModel(base.config).eval()
    full.load_state_dict(base.state_dict())
    full.vision_model.load_state_dict(towers["scenes"].state_dict())
    return {"shapes": towers["shapes"], "colors": towers["colors"], "scenes": full}


@pytest.fixture(scope="session")
def classnames():
    return CLASSNAMES


@pytest.fixture
def pixel_values():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(123))


@pytest.fixture(scope="session")
def saved_checkpoints(base, experts, tokenizer, tmp_path_factory):
    """The base (with tokenizer and image processor) and the experts saved as ordinary checkpoint directories."""
    from conversion import default_image_processor

    root = tmp_path_factory.mktemp("checkpoints")
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    default_image_processor(base.config.vision_config).save_pretrained(root / "base")
    paths = {"base": str(root / "base")}
    for task, expert in experts.items():
        expert.save_pretrained(root / task)
        paths[task] = str(root / task)
    return paths


@pytest.fixture
def recipe(saved_checkpoints, classnames):
    """A recipe naming the saved base and the three saved full fine-tunes."""
    return {
        "base_model": saved_checkpoints["base"],
        "variant": "wemoe",
        "static_merge": {"method": "task_arithmetic", "scaling": 0.3},
        "router": {"hidden_layers": 2, "init_lambda": 0.3, "granularity": "sample"},
        "tasks": [
            {"name": task, "model": saved_checkpoints[task], "classnames": names} for task, names in classnames.items()
        ],
    }
