"""The model card as the Hub reads it: lineage, license and the model's name, read back with huggingface_hub."""

import hashlib
import shutil

import huggingface_hub
import pytest
from huggingface_hub import ModelCard

from conversion import convert

BASE = "wemoe-test/clip-base"
EXPERTS = {"shapes": "wemoe-test/clip-shapes", "colors": "wemoe-test/clip-colors", "scenes": "wemoe-test/clip-scenes"}


@pytest.fixture
def hub_models(saved_checkpoints, tmp_path, monkeypatch) -> dict[str, str]:
    """The saved base and experts served as Hub repos from an offline cache, so that a recipe names Hub ids as it
    would for real checkpoints (nothing is downloaded). Returns task (and "base") -> repo id."""
    cache = tmp_path / "hub-cache"
    repos = {"base": BASE, **EXPERTS}
    for name, repo_id in repos.items():
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        commit = hashlib.sha1(repo_id.encode()).hexdigest()
        shutil.copytree(saved_checkpoints[name], repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return repos


def hub_recipe(classnames, models: dict[str, str], **fields) -> dict:
    return {
        "base_model": models["base"],
        "tasks": [{"name": task, "model": models[task], "classnames": names} for task, names in classnames.items()],
        **fields,
    }



def test_card_names_local_models_in_its_body_only_and_takes_the_recipe_license(
    hub_models, saved_checkpoints, classnames, tmp_path
):
    models = {**hub_models, "scenes": saved_checkpoints["scenes"]}
    artifact = convert(hub_recipe(classnames, models, license="mit"), tmp_path / "out")
    card = ModelCard.load(artifact / "README.md")
    assert card.data.base_model == [BASE, EXPERTS["shapes"], EXPERTS["colors"]]
    assert card.data.base_model_relation == "merge"
    assert card.data.license == "mit" and "`mit`, as the merge recipe states" in card.text
    assert f"| scenes | beach, forest | `{saved_checkpoints['scenes']}` (local) |" in card.text
    assert f"[{BASE}](https://huggingface.co/{BASE})" in card.text
    # Not pushed: the model is named by the card's title, not by its directory.
    assert card.data.model_name == "WEMoE CLIP: shapes, colors, scenes" and f"# {card.data.model_name}" in card.text
