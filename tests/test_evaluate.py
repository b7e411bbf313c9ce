"""wemoe-eval against a hand-written loop; per-sample predictions independent of batching; model-index."""

import json

import pytest
import torch
import yaml
from datasets import load_dataset
from huggingface_hub import ModelCard
from transformers import AutoImageProcessor, AutoModel

from wemoe.cli.evaluate import main
from wemoe.data import load_data_config, load_task_dataset, pixel_values_of
from wemoe.evaluation import evaluate


def hand_written_accuracy(model_dir, data_file, task) -> float:
    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir)
    correct = 0
    rows = load_dataset("parquet", data_files=data_file, split="train")
    for row in rows:
        pixel_values = processor(images=row["image"].convert("RGB"), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            correct += int(model(pixel_values, task=task).logits.argmax(-1).item() == row["label"])
    return correct / len(rows)


def test_cli_accuracy_equals_a_hand_written_loop(artifact, task_data, tmp_path, capsys):
    data_yaml = tmp_path / "data.yaml"
    data_yaml.write_text(yaml.safe_dump(task_data))
    main([str(artifact), str(data_yaml), "--batch-size", "7", "--output", str(tmp_path / "results.json")])
    results = json.loads((tmp_path / "results.json").read_text())
    for task, spec in task_data["tasks"].items():
        expected = hand_written_accuracy(artifact, spec["data_files"], task)
        assert results[task]["score"] == pytest.approx(expected, abs=1e-12)
    assert results["average"]["score"] == pytest.approx(sum(results[t]["score"] for t in task_data["tasks"]) / 3)
    assert "average" in capsys.readouterr().out


@torch.no_grad()
def task_predictions(model, task: str, dataset, spec, processor, batch_size: int) -> torch.Tensor:
    predictions = []
    for start in range(0, len(dataset), batch_size):
        rows = list(range(start, min(start + batch_size, len(dataset))))
        pixel_values = pixel_values_of(dataset[rows][spec.image_column], rows, processor, task)
        predictions.append(model(pixel_values, task=task).logits.argmax(dim=-1))
    return torch.cat(predictions)


def test_a_sample_prediction_does_not_depend_on_its_batch(artifact, task_data):
    model = AutoModel.from_pretrained(artifact, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(artifact)
    with torch.no_grad():  # make routing input-dependent, so batching would matter if routing leaked across samples
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.copy_(0.5 * torch.randn_like(parameter))
    spec = load_data_config(task_data).tasks["colors"]
    dataset = load_task_dataset("colors", spec, need_labels=True)
    alone = task_predictions(model, "colors", dataset, spec, processor, batch_size=1)
    for batch_size in (3, 7, len(dataset)):
        assert torch.equal(task_predictions(model, "colors", dataset, spec, processor, batch_size), alone)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    shuffled = task_predictions(model, "colors", dataset.select(order), spec, processor, batch_size=6)
    assert torch.equal(shuffled, alone[order])


def test_model_index_is_written_into_the_card(artifact, task_data, tmp_path):
    import shutil

    copy = tmp_path / "artifact"
    shutil.copytree(artifact, copy)
    data_yaml = tmp_path / "data.yaml"
    data_yaml.write_text(yaml.safe_dump(task_data))
    main([str(copy), str(data_yaml), "--update-model-card"])
    card = ModelCard.load(copy / "README.md")
    results = {result.dataset_name: result.metric_value for result in card.data.eval_results}
    assert set(results) == {"shapes", "colors", "scenes"}
    assert results == {task: value for task, value in evaluate(copy, data_yaml).items() if task != "average"}
    assert "| shapes |" in card.text  # the body is kept


def test_plain_clip_model_is_evaluated_zero_shot(saved_checkpoints, task_data):
    results = evaluate(saved_checkpoints["base"], task_data)
    assert set(results) == {"shapes", "colors", "scenes", "average"}
    assert all(0.0 <= value <= 1.0 for value in results.values())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["tasks"]["shapes"].update(label_column="target"), r"Task 'shapes': .* has no column 'target'"),
        (
            lambda d: d["tasks"].update(cars=dict(d["tasks"]["shapes"])),
            r"task\(s\) \['cars'\] that the model does not have",
        ),
        (
            lambda d: d["tasks"].update(colors=dict(d["tasks"]["shapes"])),
            r"Task 'colors': the dataset's classes \['circle'",
        ),
    ],
    ids=["missing-label-column", "unknown-task", "class-names-differ"],
)
def test_bad_data_is_reported(artifact, task_data, tmp_path, capsys, change, message):
    data = yaml.safe_load(yaml.safe_dump(task_data))
    change(data)
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(SystemExit):
        main([str(artifact), str(tmp_path / "data.yaml")])
    assert __import__("re").search(message, capsys.readouterr().err)
