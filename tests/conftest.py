"""Session fixtures: a tiny random CLIP base, task experts and class names, built in-process (no network)."""

import pytest
import torch
from transformers import CLIPModel

from wemoe.toy import build_toy_base, build_toy_expert, toy_tokenizer

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
    from wemoe import default_image_processor

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


def write_image_dataset(path, classnames: list[str], size: int, seed: int) -> None:
    """A small labeled image dataset (random coloured squares) as parquet with Image and ClassLabel features."""
    import numpy as np
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage

    rng = np.random.default_rng(seed)
    images = [PILImage.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(size)]
    labels = rng.integers(0, len(classnames), size).tolist()
    features = Features({"image": Image(), "label": ClassLabel(names=classnames)})
    Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(path)


@pytest.fixture(scope="session")
def task_data(classnames, tmp_path_factory):
    """DATA.yaml content: one small parquet image dataset per task (labels included, for evaluation)."""
    root = tmp_path_factory.mktemp("data")
    tasks = {}
    for i, (task, names) in enumerate(classnames.items()):
        write_image_dataset(root / f"{task}.parquet", names, size=20, seed=i)
        tasks[task] = {"path": "parquet", "data_files": str(root / f"{task}.parquet"), "split": "train"}
    return {"tasks": tasks}


@pytest.fixture(scope="session")
def artifact(saved_checkpoints, classnames, tmp_path_factory):
    """A converted WEMoE artifact of the saved base and experts."""
    from wemoe import convert

    recipe = {
        "base_model": saved_checkpoints["base"],
        "tasks": [{"name": t, "model": saved_checkpoints[t], "classnames": n} for t, n in classnames.items()],
    }
    return convert(recipe, tmp_path_factory.mktemp("artifacts") / "wemoe")
