"""The model card as the Hub reads it: lineage, license, the model's name and every model's results in the model-index,
read back with huggingface_hub."""

import hashlib
import shutil

import huggingface_hub
import pytest
import yaml
from huggingface_hub import EvalResult, ModelCard

from conversion import convert
from conversion.cli.evaluate import main as evaluate_main
from conversion.model_card import add_eval_results

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


def write_yaml(content: dict, path) -> str:
    path.write_text(yaml.safe_dump(content))
    return str(path)


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


def test_a_new_result_replaces_only_the_same_models_same_task_dataset_and_metric():
    def result(dataset: str, value: float, metric: str = "accuracy") -> EvalResult:
        return EvalResult(
            task_type="image-classification",
            dataset_type=dataset,
            dataset_name=dataset,
            metric_type=metric,
            metric_value=value,
        )

    entries = add_eval_results([], "org/unadapted", [result("shapes", 0.5), result("colors", 0.4)])
    entries = add_eval_results(entries, "org/adapted", [result("shapes", 0.6), result("shapes", 0.7, "f1")])
    entries = add_eval_results(entries, "org/adapted", [result("shapes", 0.8)])
    values = {
        entry["name"]: sorted(
            (r["dataset"]["name"], metric["type"], metric["value"]) for r in entry["results"] for metric in r["metrics"]
        )
        for entry in entries
    }
    assert values == {
        "org/unadapted": [("colors", "accuracy", 0.4), ("shapes", "accuracy", 0.5)],
        "org/adapted": [("shapes", "accuracy", 0.8), ("shapes", "f1", 0.7)],
    }
    assert [entry["name"] for entry in entries] == ["org/unadapted", "org/adapted"]


def test_eval_push_needs_the_card_update(artifact, task_data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate_main([str(artifact), write_yaml(task_data, tmp_path / "data.yaml"), "--push-to-hub", "my-org/m"])
    assert "give --update-model-card too" in capsys.readouterr().err
