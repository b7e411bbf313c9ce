"""`wemoe-convert`: recipe in, loadable artifact out, and nothing out when the input is bad."""

import copy
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from fresh_process import run_in_fresh_process
from huggingface_hub import ModelCard
from reference import stacked_task_vectors, textbook_ties
from safetensors.torch import load_file, save_file
from test_checkpoints import lora_expert
from transformers import AutoModel

from wemoe import convert, merge_clip
from wemoe.cli.convert import main
from wemoe.toy import build_toy_base, build_toy_expert


def write_recipe(recipe: dict, tmp_path) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def console_script() -> list[str]:
    script = shutil.which("wemoe-convert")
    return [script] if script else [sys.executable, "-m", "wemoe.cli.convert"]


def test_cli_artifact_loads_in_a_fresh_process_and_equals_merge_clip(
    recipe, saved_checkpoints, classnames, tmp_path, pixel_values
):
    completed = subprocess.run(
        [*console_script(), write_recipe(recipe, tmp_path), str(tmp_path / "artifact")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    artifact = tmp_path / "artifact"
    names = {p.name for p in artifact.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "modeling_wemoe.py"} <= names
    assert {"configuration_wemoe.py", "README.md", "merge_config.yaml"} <= names
    assert yaml.safe_load((artifact / "merge_config.yaml").read_text())["tasks"][0]["name"] == "shapes"

    results = run_in_fresh_process(artifact, pixel_values, tmp_path)
    in_memory = merge_clip(saved_checkpoints["base"], {t: saved_checkpoints[t] for t in classnames}, classnames)
    with torch.no_grad():
        expected = in_memory(pixel_values).logits
    for auto_class in ("AutoModel", "AutoModelForImageClassification"):
        assert results[auto_class]["missing"] == [] and results[auto_class]["unexpected"] == []
        torch.testing.assert_close(torch.tensor(results[auto_class]["logits"]), expected, atol=1e-6, rtol=0)


def test_lora_expert_recipe_equals_the_dense_fine_tune(base, recipe, tmp_path, pixel_values):
    peft_model, dense = lora_expert(base, rslora=False)
    peft_model.save_pretrained(tmp_path / "adapter")
    dense.save_pretrained(tmp_path / "dense")
    outputs = {}
    for kind in ("adapter", "dense"):
        variant = copy.deepcopy(recipe)
        variant["tasks"][1]["model"] = str(tmp_path / kind)
        model = AutoModel.from_pretrained(convert(variant, tmp_path / f"out-{kind}"), trust_remote_code=True)
        with torch.no_grad():
            outputs[kind] = model(pixel_values).logits
    torch.testing.assert_close(outputs["adapter"], outputs["dense"], atol=1e-5, rtol=0)


def test_ties_static_merge_matches_ties_on_the_same_tensors(base, experts, recipe, tmp_path):
    recipe["static_merge"] = {"method": "ties", "scaling": 0.4, "density": 0.3, "majority_sign": "frequency"}
    model = AutoModel.from_pretrained(convert(recipe, tmp_path / "out"), trust_remote_code=True)
    for key in (
        "encoder.layers.0.self_attn.q_proj.weight",
        "encoder.layers.1.layer_norm1.bias",
        "embeddings.class_embedding",
    ):
        pretrained = base.vision_model.state_dict()[key]
        expected = textbook_ties(pretrained, stacked_task_vectors(base, experts, key), 0.4, 0.3, "frequency")
        torch.testing.assert_close(model.vision_model.state_dict()[key], expected, atol=1e-6, rtol=0, msg=key)


def test_model_card_front_matter_parses(recipe, tmp_path):
    recipe["variant"] = "e-wemoe"
    artifact = convert(recipe, tmp_path / "out")
    card = ModelCard.load(artifact / "README.md")
    assert card.data.pipeline_tag == "image-classification"
    assert {"wemoe", "model-merging", "e-wemoe"} <= set(card.data.tags)
    assert card.data.library_name == "transformers"
    for task in ("shapes", "colors", "scenes"):
        assert f"| {task} |" in card.text
    assert "trainable (routers)" in card.text and "trust_remote_code=True" in card.text


def test_bfloat16_and_sharded_output_load(recipe, tmp_path, pixel_values):
    artifact = convert(recipe, tmp_path / "out", dtype="bfloat16", max_shard_size="100KB")
    assert (artifact / "model.safetensors.index.json").exists()
    model, info = AutoModel.from_pretrained(artifact, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.vision_model.encoder.layers[0].mlp.fc1.weight_task_vectors.values.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(model(pixel_values.bfloat16()).logits).all()


def test_classnames_from_a_dataset_class_label(recipe, tmp_path):
    from datasets import ClassLabel, Dataset, Features, Value

    features = Features({"text": Value("string"), "label": ClassLabel(names=["apple", "banana", "cherry"])})
    Dataset.from_dict({"text": ["a", "b"], "label": [0, 2]}, features=features).to_parquet(tmp_path / "fruit.parquet")
    recipe["tasks"][2].pop("classnames")
    recipe["tasks"][2]["dataset"] = {"path": "parquet", "data_files": str(tmp_path / "fruit.parquet"), "split": "train"}
    model = AutoModel.from_pretrained(convert(recipe, tmp_path / "out"), trust_remote_code=True)
    assert model.config.task_labels["scenes"] == ["apple", "banana", "cherry"]

    recipe["tasks"][2]["dataset"]["label_column"] = "text"
    with pytest.raises(ValueError, match="Task 'scenes': column 'text' .* not a ClassLabel"):
        convert(recipe, tmp_path / "out2")
    recipe["tasks"][2]["dataset"]["label_column"] = "fine_label"
    with pytest.raises(ValueError, match=r"no column 'fine_label'; columns: \['text', 'label'\]"):
        convert(recipe, tmp_path / "out2")


def test_push_to_hub_creates_the_repo_and_uploads_the_folder(recipe, tmp_path, monkeypatch):
    calls = []

    class Commit:
        commit_url = "https://huggingface.co/my-org/wemoe/commit/0"

    monkeypatch.setattr("huggingface_hub.HfApi.create_repo", lambda self, repo_id, **kw: calls.append((repo_id, kw)))
    monkeypatch.setattr(
        "huggingface_hub.HfApi.upload_folder", lambda self, **kw: calls.append(("upload", kw)) or Commit()
    )
    artifact = convert(recipe, tmp_path / "out", push_to_hub="my-org/wemoe", private=True)
    assert calls[0] == ("my-org/wemoe", {"repo_type": "model", "private": True, "exist_ok": True})
    assert calls[1][1]["folder_path"] == artifact and calls[1][1]["repo_id"] == "my-org/wemoe"
    assert 'AutoModel.from_pretrained("my-org/wemoe"' in (artifact / "README.md").read_text()


# Each bad input: the CLI exits non-zero, names the file or key, and leaves no output (not even a partial one).


def wider_expert(tmp_path):
    wide = build_toy_expert(build_toy_base(seed=1, hidden_size=64), seed=5)
    wide.save_pretrained(tmp_path / "wide")
    return str(tmp_path / "wide")


def expert_missing_a_tensor(tmp_path, saved_checkpoints):
    shutil.copytree(saved_checkpoints["colors"], tmp_path / "missing")
    weights = load_file(tmp_path / "missing" / "model.safetensors")
    del weights["encoder.layers.1.mlp.fc2.weight"]
    save_file(weights, tmp_path / "missing" / "model.safetensors", metadata={"format": "pt"})
    return str(tmp_path / "missing")


def corrupt_expert(tmp_path, saved_checkpoints):
    shutil.copytree(saved_checkpoints["colors"], tmp_path / "corrupt")
    data = (tmp_path / "corrupt" / "model.safetensors").read_bytes()
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(data[: len(data) // 2])
    return str(tmp_path / "corrupt")


BAD_RECIPES = {
    "architecture-mismatch": (
        lambda r, tmp, ckpt: r["tasks"][1].update(model=wider_expert(tmp)),
        r"Expert 'colors' does not share the base model's architecture: hidden_size: base 32, expert 64",
    ),
    "missing-tensor": (
        lambda r, tmp, ckpt: r["tasks"][1].update(model=expert_missing_a_tensor(tmp, ckpt)),
        r"Expert 'colors' checkpoint '.*missing' is missing tensors .*'encoder.layers.1.mlp.fc2.weight'",
    ),
    "corrupt-safetensors": (
        lambda r, tmp, ckpt: r["tasks"][1].update(model=corrupt_expert(tmp, ckpt)),
        r"Expert 'colors': cannot read checkpoint file '.*corrupt/model.safetensors'",
    ),
    "unknown-key": (
        lambda r, tmp, ckpt: r.update(routr={"hidden_layers": 1}),
        r"routr: Extra inputs are not permitted",
    ),
    "duplicate-task": (
        lambda r, tmp, ckpt: r["tasks"].append(dict(r["tasks"][0])),
        r"tasks: Value error, duplicate task names \['shapes'\]",
    ),
    "empty-class-list": (
        lambda r, tmp, ckpt: r["tasks"][2].update(classnames=[]),
        r"tasks.2.classnames: List should have at least 1 item",
    ),
    "wrong-type": (lambda r, tmp, ckpt: r.update(keep="most"), r"keep: Input should be a valid number"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_bad_input_exits_non_zero_naming_it_and_leaves_no_output(recipe, saved_checkpoints, tmp_path, capsys, case):
    break_recipe, message = BAD_RECIPES[case]
    break_recipe(recipe, tmp_path, saved_checkpoints)
    output_root = tmp_path / "outputs"
    output_root.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main([write_recipe(recipe, tmp_path), str(output_root / "artifact")])
    assert exit_info.value.code != 0
    assert __import__("re").search(message, capsys.readouterr().err), case
    assert list(output_root.iterdir()) == []


def test_existing_output_is_refused_before_any_work(recipe, tmp_path, capsys):
    (tmp_path / "artifact").mkdir()
    with pytest.raises(SystemExit):
        main([write_recipe(recipe, tmp_path), str(tmp_path / "artifact")])
    assert "already exists" in capsys.readouterr().err


def test_the_documented_example_recipe_is_valid(capsys):
    from wemoe.recipe import EXAMPLE_RECIPE, load_recipe

    recipe = load_recipe(yaml.safe_load(EXAMPLE_RECIPE))
    assert recipe.variant == "e-wemoe" and recipe.tasks[0].dataset.path == "tanganke/eurosat"
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "model: ./my-lora-adapter" in capsys.readouterr().out
