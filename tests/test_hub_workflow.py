"""Publishing every stage: convert, adapt and evaluate with --push-to-hub, against a recording fake of HfApi; the
card's lineage, license, adaptation record and model-index, read back with huggingface_hub."""

import hashlib
import json
import shutil

import huggingface_hub
import pytest
import yaml
from huggingface_hub import EvalResult, ModelCard, metadata_load

from wemoe import convert
from wemoe.cli.convert import main as convert_main
from wemoe.cli.evaluate import main as evaluate_main
from wemoe.cli.tta import main as tta_main
from wemoe.model_card import add_eval_results

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


@pytest.fixture
def hub(monkeypatch) -> list[dict]:
    """A fake HfApi where the commands get theirs: records each call, and what each upload holds at that moment."""
    calls = []

    class RecordingApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append({"call": "create_repo", "repo_id": repo_id, **kwargs})

        def upload_folder(self, *, folder_path, repo_id, **kwargs):
            calls.append(
                {
                    "call": "upload_folder",
                    "repo_id": repo_id,
                    "folder_path": folder_path,
                    "files": {path.name for path in folder_path.iterdir()},
                    "readme": (folder_path / "README.md").read_text(),
                    **kwargs,
                }
            )
            return type("Commit", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/0"})()

    monkeypatch.setattr("wemoe.outputs.HfApi", RecordingApi)
    return calls


def hub_recipe(classnames, models: dict[str, str], **fields) -> dict:
    return {
        "base_model": models["base"],
        "tasks": [{"name": task, "model": models[task], "classnames": names} for task, names in classnames.items()],
        **fields,
    }


def write_yaml(content: dict, path) -> str:
    path.write_text(yaml.safe_dump(content))
    return str(path)


def test_publish_convert_adapt_evaluate(hub_models, hub, classnames, task_data, tmp_path):
    recipe = write_yaml(hub_recipe(classnames, hub_models), tmp_path / "recipe.yaml")
    data = write_yaml(task_data, tmp_path / "data.yaml")
    unadapted, adapted = tmp_path / "wemoe", tmp_path / "wemoe-tta"

    results = tmp_path / "results.json"
    convert_main([recipe, str(unadapted), "--push-to-hub", "my-org/wemoe", "--private"])
    evaluate_main([str(unadapted), data, "--update-model-card", "--push-to-hub", "my-org/wemoe"])
    adapt = ["--steps", "3", "--batch-size", "4", "--lr", "1e-3", "--push-to-hub", "my-org/wemoe-tta"]
    tta_main([str(unadapted), data, "--output", str(adapted), *adapt])
    card_update = ["--update-model-card", "--push-to-hub", "my-org/wemoe-tta"]
    evaluate_main([str(adapted), data, "--output", str(results), *card_update])

    # Every stage went to its repo, the whole artifact each time, the card as that stage left it.
    stages = ["my-org/wemoe", "my-org/wemoe", "my-org/wemoe-tta", "my-org/wemoe-tta"]
    assert [(call["call"], call["repo_id"]) for call in hub] == [
        (call, repo) for repo in stages for call in ("create_repo", "upload_folder")
    ]
    assert hub[0]["private"] is True and hub[4]["private"] is False
    uploads = [call for call in hub if call["call"] == "upload_folder"]
    artifact_files = {"config.json", "model.safetensors", "modeling_wemoe.py", "README.md", "merge_config.yaml"}
    assert all(artifact_files <= upload["files"] for upload in uploads)
    assert [upload["folder_path"] for upload in uploads] == [unadapted, unadapted, adapted, adapted]
    assert "model-index" not in uploads[0]["readme"] and "model-index" in uploads[1]["readme"]
    assert "Test-time adaptation" in uploads[2]["readme"]

    card = ModelCard.load(adapted / "README.md")
    # Lineage: the base and every expert, as a merge.
    assert card.data.base_model == [BASE, *EXPERTS.values()]
    assert card.data.base_model_relation == "merge"
    assert card.data.license == "other"
    assert 'AutoModel.from_pretrained("my-org/wemoe-tta"' in card.text
    # The adaptation, in the card and in merge_config.yaml.
    record = yaml.safe_load((adapted / "merge_config.yaml").read_text())["adaptation"]
    assert {key: record[key] for key in ("adapted_from", "steps", "lr", "batch_size", "seed")} == {
        "adapted_from": "my-org/wemoe",
        "steps": 3,
        "lr": 1e-3,
        "batch_size": 4,
        "seed": 0,
    }
    assert set(record["data"]) == set(classnames)
    assert all(record["data"][task].items() >= spec.items() for task, spec in task_data["tasks"].items())
    assert record["objective"] == "task-routing" and record["final_loss"] > 0 and record["final_loss_steps"] == 3
    assert "test-time-adaptation" in card.data.tags
    assert "This is **my-org/wemoe** after test-time adaptation" in card.text
    assert f"| final loss | {record['final_loss']:.4f} (mean over the last 3 steps) |" in card.text
    for task, spec in task_data["tasks"].items():
        assert f"| {task} | path: parquet; " in card.text and spec["data_files"] in card.text
    # The model-index: the unadapted model's results, kept under its name, then the adapted model's.
    assert card.data.model_name == "my-org/wemoe-tta"
    assert len(card.data.eval_results) == 2 * len(classnames)
    index = {entry["name"]: entry["results"] for entry in metadata_load(adapted / "README.md")["model-index"]}
    assert list(index) == ["my-org/wemoe", "my-org/wemoe-tta"]
    unadapted_index = metadata_load(unadapted / "README.md")["model-index"]
    assert index["my-org/wemoe"] == unadapted_index[0]["results"]
    scores = json.loads(results.read_text())
    assert {r["dataset"]["name"]: r["metrics"][0]["value"] for r in index["my-org/wemoe-tta"]} == {
        task: scores[task]["score"] for task in classnames
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
