"""What a careful user hits on purpose or by accident: nothing is lost, nothing is silently wrong, and every expected
failure is one clear line on stderr with a non-zero exit. Each test reproduces one case; they go through the CLIs,
as a user would."""

import copy
import json
import os
import shutil
import stat

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from wemoe.cli.convert import main as convert_main
from wemoe.cli.evaluate import main as eval_main
from wemoe.cli.tta import main as tta_main

RUNS_AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def write_yaml(content, path) -> str:
    path.write_text(yaml.safe_dump(content))
    return str(path)


def fails_with(capsys, run, message: str) -> str:
    """`run()` exits 1 with one line on stderr that contains `message` (no traceback)."""
    with pytest.raises(SystemExit) as stop:
        run()
    assert stop.value.code == 1
    error = capsys.readouterr().err
    assert message in error, error
    assert "Traceback" not in error
    return error


def on_one_line(error: str, message: str) -> bool:
    """`message` stands on one line of stderr, the command's own (progress bars of the libraries aside)."""
    return any(message in line for line in error.splitlines() if line.startswith("wemoe-"))


def tree_digest(root) -> dict[str, int]:
    """Every file under `root` with its size: what must survive a refused command untouched."""
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def workspace(saved_checkpoints, recipe, tmp_path, monkeypatch):
    """A working directory holding the recipe, the base model and the experts, as a user's project would."""
    for name, path in saved_checkpoints.items():
        shutil.copytree(path, tmp_path / name)
    local = copy.deepcopy(recipe)
    local["base_model"] = "./base"
    for task in local["tasks"]:
        task["model"] = f"./{task['name']}"
    write_yaml(local, tmp_path / "recipe.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


# Data loss ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("output", [".", "..", "./base", "./shapes"], ids=["cwd", "parent-of-cwd", "base", "expert"])
def test_convert_refuses_to_overwrite_the_working_directory_or_an_input(workspace, capsys, output):
    before = tree_digest(workspace)
    error = fails_with(capsys, lambda: convert_main(["recipe.yaml", output, "--overwrite"]), "Output")
    assert "working directory" in error or "input" in error
    assert tree_digest(workspace) == before


def test_tta_refuses_to_overwrite_the_working_directory_or_its_artifact(
    artifact, task_data, tmp_path, capsys, monkeypatch
):
    data = write_yaml(task_data, tmp_path / "data.yaml")
    copied = shutil.copytree(artifact, tmp_path / "artifact")
    before = tree_digest(tmp_path)
    monkeypatch.chdir(tmp_path)
    fails_with(capsys, lambda: tta_main([str(copied), data, "--output", ".", "--overwrite"]), "working directory")
    fails_with(capsys, lambda: tta_main(["artifact", data, "--output", "artifact", "--overwrite"]), "input")
    assert tree_digest(tmp_path) == before


def test_an_existing_output_is_kept_without_overwrite(workspace, capsys):
    (workspace / "out").mkdir()
    (workspace / "out" / "notes.txt").write_text("mine")
    fails_with(capsys, lambda: convert_main(["recipe.yaml", "out"]), "already exists; pass --overwrite")
    assert (workspace / "out" / "notes.txt").read_text() == "mine"


def test_overwrite_onto_a_file_is_refused(workspace, capsys):
    (workspace / "out").write_text("a file")
    fails_with(capsys, lambda: convert_main(["recipe.yaml", "out", "--overwrite"]), "is not a directory")
    assert (workspace / "out").read_text() == "a file"


def test_overwrite_replaces_the_old_artifact_by_renames_and_leaves_nothing_beside_it(workspace):
    convert_main(["recipe.yaml", "out"])
    first = (workspace / "out" / "config.json").stat().st_ino
    convert_main(["recipe.yaml", "out", "--overwrite"])
    assert (workspace / "out" / "config.json").stat().st_ino != first
    assert sorted(p.name for p in workspace.iterdir() if p.name.startswith(".")) == []


# Silently wrong models ------------------------------------------------------------------------------------------


def test_a_base_without_tokenizer_files_is_refused(workspace, capsys):
    for name in os.listdir(workspace / "base"):
        if "token" in name or name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
            os.remove(workspace / "base" / name)
    fails_with(capsys, lambda: convert_main(["recipe.yaml", "out"]), "has no tokenizer files")
    assert not (workspace / "out").exists()


def broken_artifact(artifact, tmp_path, change) -> str:
    copied = shutil.copytree(artifact, tmp_path / "broken")
    change(copied)
    return str(copied)


def drop_tensor(directory, name: str) -> None:
    tensors = load_file(directory / "model.safetensors")
    del tensors[name]
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def edit_config(directory, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    for key, value in changes.items():
        if key == "num_hidden_layers":
            config["vision_config"][key] = value
        else:
            config[key] = value
    (directory / "config.json").write_text(json.dumps(config))


ARTIFACT_EDITS = {
    "missing-logit-scale": (lambda d: drop_tensor(d, "logit_scale"), "missing from the checkpoint: ['logit_scale']"),
    "layer-count": (lambda d: edit_config(d, num_hidden_layers=3), "missing from the checkpoint"),
    "router-depth": (lambda d: edit_config(d, router_hidden_layers=1), "in the checkpoint but not in the model"),
    "router-mode": (lambda d: edit_config(d, router_mode="shared"), "in the checkpoint but not in the model"),
    "expert-format": (lambda d: edit_config(d, expert_format="lowrank", rank=4), "missing from the checkpoint"),
    "task-order": (
        lambda d: edit_config(d, tasks=["colors", "shapes", "scenes"]),
        "config.json was edited",
    ),
}


@pytest.mark.parametrize("edit", list(ARTIFACT_EDITS))
def test_an_artifact_whose_tensors_do_not_match_its_config_is_refused(artifact, task_data, tmp_path, capsys, edit):
    change, message = ARTIFACT_EDITS[edit]
    broken = broken_artifact(artifact, tmp_path, change)
    data = write_yaml(task_data, tmp_path / "data.yaml")
    fails_with(capsys, lambda: eval_main([broken, data]), message)
    fails_with(capsys, lambda: tta_main([broken, data, "--output", str(tmp_path / "adapted"), "--steps", "1"]), message)
    assert not (tmp_path / "adapted").exists()


@pytest.mark.parametrize(
    ("key", "value"),
    [("router.init_lambda", ".nan"), ("router.init_lambda", ".inf"), ("static_merge.scaling", ".nan")],
)
def test_non_finite_numbers_in_a_recipe_are_refused(workspace, capsys, key, value):
    text = (workspace / "recipe.yaml").read_text()
    section, field = key.split(".")
    recipe = yaml.safe_load(text)
    recipe[section][field] = float(yaml.safe_load(value))
    (workspace / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    fails_with(capsys, lambda: convert_main(["recipe.yaml", "out"]), f"{key}: Input should be a finite number")


@pytest.mark.parametrize(
    ("option", "value"),
    [("--seed", "1"), ("--lr", "0.01"), ("--batch-size", "2"), ("data", None)],
    ids=["seed", "lr", "batch-size", "data"],
)
def test_resume_with_other_settings_is_refused_naming_them(artifact, task_data, tmp_path, capsys, option, value):
    data = write_yaml(task_data, tmp_path / "data.yaml")
    arguments = [str(artifact), data, "--output", str(tmp_path / "run"), "--steps", "2", "--batch-size", "4"]
    arguments += ["--checkpointing-steps", "1", "--lr", "1e-3"]
    tta_main([*arguments[:3], str(tmp_path / "first"), *arguments[4:], "--checkpoint-dir", str(tmp_path / "ck")])
    if option == "data":
        other = copy.deepcopy(task_data)
        del other["tasks"]["scenes"]
        arguments[1] = write_yaml(other, tmp_path / "other.yaml")
        name = "data"
    else:
        arguments += [option, value]
        name = option.removeprefix("--").replace("-", "_")
    resume = [*arguments, "--checkpoint-dir", str(tmp_path / "ck"), "--resume"]
    error = fails_with(capsys, lambda: tta_main(resume), "was written by a run with other settings")
    assert f"{name}: checkpoint" in error
    assert not (tmp_path / "run").exists()


def test_sixteen_bit_and_float_images_keep_their_contrast():
    from wemoe.data import to_rgb

    ramp = np.linspace(0, 65535, 256, dtype=np.uint16).reshape(16, 16)
    sixteen_bit = Image.fromarray(ramp)
    assert sixteen_bit.mode == "I;16"
    converted = np.asarray(to_rgb(sixteen_bit))[..., 0]
    assert converted.min() == 0 and converted.max() == 255 and len(np.unique(converted)) > 200
    unit = np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)
    converted = np.asarray(to_rgb(Image.fromarray(unit)))[..., 0]
    assert converted.min() == 0 and converted.max() == 255 and len(np.unique(converted)) > 200
    eight_bit = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert np.array_equal(np.asarray(to_rgb(Image.fromarray(eight_bit)))[..., 0], eight_bit)


def write_labelled_images(path, labels, label_feature=None) -> None:
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in labels]
    features = Features({"image": ImageFeature(), "label": label_feature or Value("int64")})
    Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(path)


def one_task_data(tmp_path, labels, label_feature=None) -> str:
    write_labelled_images(tmp_path / "shapes.parquet", labels, label_feature)
    spec = {"path": "parquet", "data_files": str(tmp_path / "shapes.parquet"), "split": "train"}
    return write_yaml({"tasks": {"shapes": spec}}, tmp_path / "data.yaml")


def test_unlabelled_samples_are_left_out_and_out_of_range_labels_refused(artifact, tmp_path, capsys):
    from datasets import Value

    labelled = [0, 1, 2, 0, 1, 2]
    eval_main([str(artifact), one_task_data(tmp_path, labelled), "--output", str(tmp_path / "all.json")])
    eval_main([str(artifact), one_task_data(tmp_path, labelled + [-1, -1]), "--output", str(tmp_path / "some.json")])
    scores = [json.loads((tmp_path / name).read_text())["shapes"] for name in ("all.json", "some.json")]
    assert scores[0] == scores[1] and scores[1]["num_samples"] == len(labelled)
    fails_with(capsys, lambda: eval_main([str(artifact), one_task_data(tmp_path, [0, 1, 3])]), "labels [3] are outside")
    names = one_task_data(tmp_path, ["circle", "square", "triangle"], Value("string"))
    eval_main([str(artifact), names, "--output", str(tmp_path / "names.json")])
    assert 0 <= json.loads((tmp_path / "names.json").read_text())["shapes"]["score"] <= 1


# Tracebacks instead of errors -----------------------------------------------------------------------------------


def test_a_missing_base_path_names_the_field(workspace, capsys):
    recipe = yaml.safe_load((workspace / "recipe.yaml").read_text())
    recipe["base_model"] = "./no-such-base"
    write_yaml(recipe, workspace / "recipe.yaml")
    fails_with(capsys, lambda: convert_main(["recipe.yaml", "out"]), "base_model: './no-such-base' does not exist")


def test_an_unsafe_pickle_in_an_expert_names_the_task(workspace, capsys):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (workspace / "colors" / "model.safetensors").unlink()
    torch.save({"vision_model.embeddings.class_embedding": Payload()}, workspace / "colors" / "pytorch_model.bin")
    error = fails_with(capsys, lambda: convert_main(["recipe.yaml", "out"]), "Expert 'colors': cannot read checkpoint")
    assert "pwned" not in error


def test_top_k_above_the_number_of_tasks_is_a_recipe_error(workspace, capsys):
    recipe = yaml.safe_load((workspace / "recipe.yaml").read_text())
    recipe["router"]["top_k"] = 4
    write_yaml(recipe, workspace / "recipe.yaml")
    fails_with(capsys, lambda: convert_main(["recipe.yaml", "out"]), "router.top_k (4) is larger than the number")


def test_an_unwritable_output_is_found_before_merging(workspace, capsys, caplog):
    (workspace / "file").write_text("not a directory")
    with caplog.at_level("INFO", logger="wemoe"):
        fails_with(capsys, lambda: convert_main(["recipe.yaml", "file/out"]), "file/out")
    assert "Merging" not in caplog.text


@pytest.mark.skipif(RUNS_AS_ROOT, reason="root writes into read-only directories")
def test_a_read_only_output_directory_is_found_before_merging(workspace, capsys):
    (workspace / "locked").mkdir()
    (workspace / "locked").chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        fails_with(capsys, lambda: convert_main(["recipe.yaml", "locked/out"]), "is not writable")
    finally:
        (workspace / "locked").chmod(stat.S_IRWXU)


def test_a_bad_shard_size_is_found_before_merging(workspace, capsys, caplog):
    with caplog.at_level("INFO", logger="wemoe"):
        run = ["recipe.yaml", "out", "--max-shard-size", "abc"]
        fails_with(capsys, lambda: convert_main(run), "'abc' is not a size")
    assert "Merging" not in caplog.text


def test_a_truncated_image_is_named_before_adaptation(artifact, task_data, tmp_path, capsys):
    folder = tmp_path / "images" / "circle"
    folder.mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(folder / f"{i}.png")
    (folder / "3.png").write_bytes((folder / "3.png").read_bytes()[:60])
    data = copy.deepcopy(task_data)
    data["tasks"]["shapes"] = {"path": "imagefolder", "data_dir": str(tmp_path / "images"), "split": "train"}
    arguments = [str(artifact), write_yaml(data, tmp_path / "data.yaml"), "--output", str(tmp_path / "out")]
    error = fails_with(capsys, lambda: tta_main([*arguments, "--batch-size", "4"]), "Task 'shapes': the image at row")
    assert "3.png" in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["0", "-4"])
def test_a_batch_size_that_is_not_positive_is_refused(artifact, task_data, tmp_path, capsys, value):
    data = write_yaml(task_data, tmp_path / "data.yaml")
    run = [str(artifact), data, "--output", str(tmp_path / "out"), "--batch-size", value]
    fails_with(capsys, lambda: tta_main(run), "--batch-size must be a positive number")


def test_eval_checks_where_its_results_go_before_evaluating(artifact, task_data, tmp_path, capsys, caplog):
    data = write_yaml(task_data, tmp_path / "data.yaml")
    with caplog.at_level("INFO", logger="wemoe"):
        fails_with(
            capsys,
            lambda: eval_main([str(artifact), data, "--output", str(tmp_path / "missing" / "r.json")]),
            "does not exist",
        )
    assert "accuracy" not in caplog.text
    fails_with(capsys, lambda: eval_main(["org/hub-model", data, "--update-model-card"]), "is not a directory")


@pytest.mark.skipif(RUNS_AS_ROOT, reason="root writes into read-only directories")
def test_update_model_card_on_a_read_only_artifact_is_refused(artifact, task_data, tmp_path, capsys):
    copied = shutil.copytree(artifact, tmp_path / "artifact")
    copied.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        data = write_yaml(task_data, tmp_path / "data.yaml")
        fails_with(capsys, lambda: eval_main([str(copied), data, "--update-model-card"]), "is not writable")
    finally:
        copied.chmod(stat.S_IRWXU)


def test_a_binary_recipe_is_named(tmp_path, capsys):
    (tmp_path / "recipe.yaml").write_bytes(bytes(range(256)) * 4)
    fails_with(capsys, lambda: convert_main([str(tmp_path / "recipe.yaml"), str(tmp_path / "out")]), "recipe.yaml")


# Hygiene --------------------------------------------------------------------------------------------------------


def test_stale_staging_is_removed_and_artifacts_follow_the_umask(workspace, caplog):
    stale = workspace / ".out.partial-12345-dead"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    previous = os.umask(0o022)
    try:
        with caplog.at_level("WARNING", logger="wemoe"):
            convert_main(["recipe.yaml", "out"])
    finally:
        os.umask(previous)
    assert not stale.exists() and "left by an interrupted run" in caplog.text
    assert stat.S_IMODE((workspace / "out").stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in (workspace / "out").iterdir()} == {0o644}


# Damaged files, and inputs that add nothing ---------------------------------------------------------------------


def truncate(path) -> None:
    """Cut a file in half, as an interrupted download or copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def commands_reading(artifact_dir: str, data: str, tmp_path) -> dict:
    """Every command that opens an artifact, as a user runs it."""
    from wemoe.cli.update_code import main as update_code_main

    return {
        "eval": lambda: eval_main([artifact_dir, data]),
        "tta": lambda: tta_main([artifact_dir, data, "--output", str(tmp_path / "adapted"), "--steps", "1"]),
        "add-task": lambda: convert_main([artifact_dir, str(tmp_path / "added"), "--add-task", "pets", "--classnames",
                                          "cat", "dog"]),  # fmt: skip
        "update-code": lambda: update_code_main([artifact_dir]),
    }


@pytest.mark.parametrize("command", ["eval", "tta", "add-task"])
def test_a_truncated_weights_file_is_named_in_one_line(artifact, task_data, tmp_path, capsys, command):
    broken = broken_artifact(artifact, tmp_path, lambda d: truncate(d / "model.safetensors"))
    run = commands_reading(broken, write_yaml(task_data, tmp_path / "data.yaml"), tmp_path)[command]
    message = f"{broken}/model.safetensors' is truncated or corrupt"
    assert on_one_line(fails_with(capsys, run, message), message)


def test_a_truncated_weights_file_is_named_when_transformers_loads_the_artifact(artifact, tmp_path):
    """The artifact's own code names the file for `from_pretrained` and the pipelines, which load through it."""
    from transformers import AutoModel

    broken = broken_artifact(artifact, tmp_path, lambda d: truncate(d / "model.safetensors"))
    with pytest.raises(OSError, match=r"model\.safetensors' is truncated or corrupt"):
        AutoModel.from_pretrained(broken, trust_remote_code=True)


@pytest.mark.parametrize("command", ["eval", "tta", "add-task", "update-code"])
def test_a_config_its_class_refuses_is_one_line(artifact, task_data, tmp_path, capsys, command):
    broken = broken_artifact(artifact, tmp_path, lambda d: edit_config(d, num_experts=4))
    run = commands_reading(broken, write_yaml(task_data, tmp_path / "data.yaml"), tmp_path)[command]
    message = "its config.json is refused: `num_experts` (4) must equal the number of tasks (3)"
    assert on_one_line(fails_with(capsys, run, message), message)


def test_a_config_that_is_not_json_is_named(artifact, tmp_path, capsys):
    from wemoe.cli.update_code import main as update_code_main

    broken = broken_artifact(artifact, tmp_path, lambda d: (d / "config.json").write_text("{not json"))
    fails_with(capsys, lambda: update_code_main([broken]), f"'{broken}/config.json' is not valid JSON")


def test_an_unreadable_image_processor_is_an_error_not_the_default(artifact, task_data, tmp_path, capsys):
    """A preprocessor_config.json that is there but cannot be read is not taken as missing (which falls back to CLIP's
    default preprocessing, silently wrong for an artifact saved with its own)."""
    broken = broken_artifact(artifact, tmp_path, lambda d: (d / "preprocessor_config.json").write_text("{"))
    data = write_yaml(task_data, tmp_path / "data.yaml")
    fails_with(capsys, lambda: eval_main([broken, data]), f"'{broken}/preprocessor_config.json' cannot be read")


def test_a_broken_recipe_file_in_an_artifact_is_one_line(artifact, task_data, tmp_path, capsys):
    broken = broken_artifact(artifact, tmp_path, lambda d: (d / "merge_config.yaml").write_text("tasks: [\n"))
    data = write_yaml(task_data, tmp_path / "data.yaml")
    run = commands_reading(broken, data, tmp_path)["tta"]
    message = f"The recipe '{broken}/merge_config.yaml' is not valid YAML"
    assert on_one_line(fails_with(capsys, run, message), message)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda w: truncate(w / "base" / "model.safetensors"), "base/model.safetensors' is truncated or corrupt"),
        (lambda w: (w / "base" / "config.json").write_text("{"), "base/config.json' is not valid JSON"),
        (lambda w: (w / "base" / "tokenizer.json").write_text("{"), "base/tokenizer.json' is not valid JSON"),
        (lambda w: edit_config(w / "shapes", hidden_size=-3), "Expert 'shapes' 'shapes': its config.json is refused"),
    ],
    ids=["truncated-base", "base-config-not-json", "base-tokenizer-not-json", "expert-config-refused"],
)
def test_damaged_checkpoints_are_named_in_one_line(workspace, capsys, damage, message):
    damage(workspace)
    assert on_one_line(fails_with(capsys, lambda: convert_main(["recipe.yaml", "out"]), message), message)
    assert not (workspace / "out").exists()


def test_an_expert_that_is_the_base_itself_is_named_in_a_warning(workspace, caplog):
    shutil.rmtree(workspace / "shapes")
    shutil.copytree(workspace / "base", workspace / "shapes")
    convert_main(["recipe.yaml", "out"])
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert [message for message in warnings if "equals the base model" in message] == [
        "Expert 'shapes' equals the base model: every tensor merged is the base's (its task vectors are zero), so it "
        "adds nothing to the merge. Check that its checkpoint is the fine-tuned model."
    ]


@pytest.mark.parametrize("output", ["./shapes/out", "./base/sub/out"], ids=["in-an-expert", "in-the-base"])
def test_convert_refuses_an_output_inside_an_input(workspace, capsys, output):
    before = tree_digest(workspace)
    fails_with(capsys, lambda: convert_main(["recipe.yaml", output]), "is inside the input")
    assert tree_digest(workspace) == before


def test_tta_refuses_an_output_inside_its_artifact_or_data(artifact, tmp_path, capsys):
    copied = shutil.copytree(artifact, tmp_path / "artifact")
    images = tmp_path / "images" / "circle"
    images.mkdir(parents=True)
    for index in range(4):
        Image.new("RGB", (8, 8), (index * 60, 0, 0)).save(images / f"{index}.png")
    data = write_yaml({"tasks": {"shapes": {"path": "imagefolder", "data_dir": str(tmp_path / "images"),
                                            "split": "train"}}}, tmp_path / "data.yaml")  # fmt: skip
    before = tree_digest(tmp_path)
    for output in (copied / "adapted", tmp_path / "images" / "adapted"):
        run = lambda output=output: tta_main([str(copied), data, "--output", str(output), "--steps", "1"])  # noqa: E731
        fails_with(capsys, run, "is inside the input")
    assert tree_digest(tmp_path) == before
