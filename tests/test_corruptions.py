"""Corrupted images (ImageNet-C) in evaluation and adaptation: every corruption changes the image, deterministically,
keeping its size and mode; bad flags and names are clear errors; wemoe-eval and wemoe-tta apply them and say so."""

import json
import shutil
import sys

import numpy as np
import pytest
import torch
import yaml
from datasets import Dataset, load_dataset
from huggingface_hub import ModelCard
from PIL import Image
from test_tta import run_tta, write_yaml
from transformers import AutoImageProcessor, AutoModel

from wemoe.cli.evaluate import main as wemoe_eval
from wemoe.cli.tta import main as wemoe_tta
from wemoe.corruptions import (
    CORRUPTIONS,
    PAPER_CORRUPTIONS,
    Corruption,
    corrupt_image,
    image_seed,
    library,
)
from wemoe.data import TaskData, load_data_config, load_task_dataset, pixel_values_of, with_corruption

# Those whose result draws nothing at random: the same for every seed and row.
DETERMINISTIC = {
    "defocus_blur",
    "zoom_blur",
    "brightness",
    "contrast",
    "pixelate",
    "jpeg_compression",
    "gaussian_blur",
    "saturate",
}


def picture(size: int, mode: str = "RGB") -> Image.Image:
    """A smooth gradient with a bright square: blurs, noise and contrast changes all show on it."""
    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    pixels = np.stack([x, y, 1 - x * y], axis=-1) * 180 + 20
    pixels[size // 4 : size // 2, size // 4 : size // 2] = 240
    return Image.fromarray(pixels.astype(np.uint8)).convert(mode)


def test_the_registry_names_every_corruption_of_the_library():
    assert list(CORRUPTIONS) == library().get_corruption_names("all")
    assert set(PAPER_CORRUPTIONS) <= set(CORRUPTIONS)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_a_corruption_changes_the_image_deterministically_and_keeps_size_and_mode(name):
    for size in (32, 224):
        image = picture(size)
        corrupted = corrupt_image(image, name, 3, seed=7)
        assert (corrupted.size, corrupted.mode) == (image.size, "RGB")
        assert corrupted.tobytes() != image.tobytes()
        assert corrupt_image(image, name, 3, seed=7).tobytes() == corrupted.tobytes()
        other_seed = corrupt_image(image, name, 3, seed=8).tobytes()
        assert (other_seed == corrupted.tobytes()) == (name in DETERMINISTIC)


@pytest.mark.parametrize("name", PAPER_CORRUPTIONS)
@pytest.mark.parametrize("size, mode", [(8, "RGB"), (28, "L"), (40, "RGBA")])
def test_small_images_and_other_modes_keep_their_size_and_mode(name, size, mode):
    image = picture(size, mode)
    corrupted = corrupt_image(image, name, 5, seed=0)
    assert (corrupted.size, corrupted.mode) == (image.size, mode)
    assert corrupted.tobytes() != image.tobytes()
    if mode == "RGBA":
        assert corrupted.getchannel("A").tobytes() == image.getchannel("A").tobytes()


def test_each_image_draws_from_its_own_seed_of_run_seed_task_and_row():
    image = picture(32)
    noise = Corruption(name="gaussian_noise", severity=2, seed=0)
    first = noise.apply(image, "shapes", 0).tobytes()
    assert noise.apply(image, "shapes", 0).tobytes() == first
    assert noise.apply(image, "shapes", 1).tobytes() != first
    assert noise.apply(image, "colors", 0).tobytes() != first
    assert Corruption(name="gaussian_noise", severity=2, seed=1).apply(image, "shapes", 0).tobytes() != first
    assert len({image_seed(0, "shapes", row, "gaussian_noise") for row in range(1000)}) == 1000
    blur = Corruption(name="contrast", severity=2)
    assert blur.apply(image, "shapes", 0).tobytes() == blur.apply(image, "colors", 5).tobytes()


def test_the_callers_numpy_random_state_is_left_as_it_was():
    np.random.seed(123)
    expected = np.random.random(3)
    np.random.seed(123)
    corrupt_image(picture(32), "motion_blur", 3, seed=5)
    assert np.array_equal(np.random.random(3), expected)


@pytest.mark.parametrize("severity", [0, 6, True, 2.5])
def test_a_severity_out_of_range_is_refused_naming_the_range(severity):
    with pytest.raises(ValueError, match=r"severity must be an integer from 1 to 5.*got"):
        Corruption(name="contrast", severity=severity)


def test_an_unknown_name_is_refused_listing_the_known_ones():
    with pytest.raises(ValueError, match="'blur' is not a known corruption; known: gaussian_noise, shot_noise"):
        Corruption(name="blur", severity=1)


def test_data_yaml_can_corrupt_a_task_and_bad_values_name_their_key(task_data):
    task = next(iter(task_data["tasks"]))
    spec = {**task_data["tasks"][task], "corruption": {"name": "pixelate", "severity": 2, "seed": 4}}
    config = load_data_config({"tasks": {task: spec}})
    assert config.tasks[task].corruption == Corruption(name="pixelate", severity=2, seed=4)
    with pytest.raises(ValueError, match=rf"tasks\.{task}\.corruption\.severity.*from 1 to 5"):
        load_data_config({"tasks": {task: {**spec, "corruption": {"name": "pixelate", "severity": 9}}}})


def test_clean_data_dumps_as_before_so_older_checkpoints_still_resume(task_data):
    spec = load_data_config(task_data).tasks["shapes"]
    assert "corruption" not in spec.model_dump(mode="json")
    corrupted = spec.model_copy(update={"corruption": Corruption(name="fog", severity=1)})
    assert corrupted.model_dump(mode="json")["corruption"] == {"name": "fog", "severity": 1, "seed": 0}


def test_with_corruption_sets_every_task_and_none_cleans_them(task_data):
    corruption = Corruption(name="spatter", severity=4, seed=2)
    corrupted = with_corruption(task_data, corruption)
    assert {spec.corruption for spec in corrupted.tasks.values()} == {corruption}
    assert {spec.corruption for spec in with_corruption(corrupted, None).tasks.values()} == {None}


def test_the_pipeline_corrupts_each_row_before_the_image_processor(artifact, task_data):
    processor = AutoImageProcessor.from_pretrained(artifact)
    spec = load_data_config(task_data).tasks["shapes"]
    dataset = load_task_dataset("shapes", spec)
    rows = [3, 4]
    corruption = Corruption(name="impulse_noise", severity=3)
    values = dataset[rows][spec.image_column]
    stored = load_dataset("parquet", data_files=spec.data_files, split="train")
    images = [corruption.apply(stored[row]["image"].convert("RGB"), "shapes", row) for row in rows]
    expected = processor(images=images, return_tensors="pt")["pixel_values"]
    assert torch.equal(pixel_values_of(values, rows, processor, "shapes", corruption), expected)
    assert not torch.equal(pixel_values_of(values, rows, processor, "shapes"), expected)


def test_a_text_task_cannot_be_corrupted(tmp_path):
    Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}).to_parquet(tmp_path / "text.parquet")
    spec = TaskData(path="parquet", data_files=str(tmp_path / "text.parquet"), split="train",
                    corruption=Corruption(name="contrast", severity=1))
    with pytest.raises(ValueError, match="Task 'sst2': corruptions apply to images; this model reads text"):
        load_task_dataset("sst2", spec, input_kind="text")


def test_without_the_library_a_corruption_says_how_to_install_it(artifact, task_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "imagecorruptions", None)  # what an uninstalled package looks like to import
    library.cache_clear()
    try:
        with pytest.raises(SystemExit) as exit_info:
            wemoe_eval([str(artifact), write_yaml(task_data, tmp_path / "data.yaml"), "--corruption", "fog",
                        "--severity", "1"])
    finally:
        library.cache_clear()
    assert exit_info.value.code == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, "refused before any data or model is loaded"
    assert error.startswith("wemoe-eval: error: Corruptions need the imagecorruptions-imaug package")
    assert error.endswith('install it with: pip install "wemoe[robustness]"')


# The command lines ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arguments, messages",
    [
        (["--corruption", "fog", "--severity", "0"], ["argument --severity: invalid choice: 0", "1, 2, 3, 4, 5"]),
        (["--corruption", "fog", "--severity", "6"], ["argument --severity: invalid choice: 6", "1, 2, 3, 4, 5"]),
        (["--corruption", "blur", "--severity", "1"], ["argument --corruption: invalid choice: 'blur'", *CORRUPTIONS]),
        (["--corruption", "fog"], ["--corruption needs --severity (1 to 5)"]),
        (["--severity", "3"], ["--severity applies to --corruption"]),
        (["--corruption-seed", "3"], ["--corruption-seed applies to --corruption"]),
    ],
)
@pytest.mark.parametrize("command", ["wemoe-eval", "wemoe-tta"])
def test_bad_corruption_flags_are_usage_errors_naming_the_flag(command, arguments, messages, capsys):
    main, extra = (wemoe_eval, []) if command == "wemoe-eval" else (wemoe_tta, ["--output", "out"])
    with pytest.raises(SystemExit) as exit_info:
        main(["model", "data.yaml", *extra, *arguments])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert all(message in error for message in messages), error


def test_clean_without_corruption_is_a_usage_error_and_tta_takes_one_corruption(capsys):
    with pytest.raises(SystemExit):
        wemoe_eval(["model", "data.yaml", "--clean"])
    assert "--clean applies to --corruption" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        wemoe_tta(["model", "data.yaml", "--output", "out", "--corruption", "fog", "--corruption", "snow",
                   "--severity", "1"])
    assert "wemoe-tta adapts on one corruption at one severity" in capsys.readouterr().err


@torch.no_grad()
def predictions(model_dir, data_file: str, task: str, corruption: Corruption | None) -> torch.Tensor:
    """A hand-written evaluation loop: each row's image corrupted as that row of that task."""
    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir)
    result = []
    for row, sample in enumerate(load_dataset("parquet", data_files=data_file, split="train")):
        image = sample["image"].convert("RGB")
        image = corruption.apply(image, task, row) if corruption else image
        result.append(model(processor(images=image, return_tensors="pt")["pixel_values"], task=task).logits.argmax())
    return torch.stack(result)


def test_eval_runs_clean_and_each_corruption_and_reports_them(artifact, task_data, tmp_path, capsys):
    output = tmp_path / "results.json"
    wemoe_eval([str(artifact), write_yaml(task_data, tmp_path / "data.yaml"), "--clean", "--corruption",
                "gaussian_noise", "--corruption", "contrast", "--severity", "5", "--output", str(output)])

    results = json.loads(output.read_text())
    assert list(results) == ["clean", "gaussian_noise-5", "contrast-5"]
    wemoe_eval([str(artifact), write_yaml(task_data, tmp_path / "data.yaml"), "--output", str(tmp_path / "plain.json")])
    assert results["clean"] == json.loads((tmp_path / "plain.json").read_text())
    assert results["gaussian_noise-5"]["shapes"]["corruption"] == {"name": "gaussian_noise", "severity": 5, "seed": 0}
    assert "corruption" not in results["clean"]["shapes"]
    # The toy model's predictions on its random-noise images move under low contrast (on `colors`), not under noise.
    data_file = task_data["tasks"]["colors"]["data_files"]
    labels = torch.tensor(load_dataset("parquet", data_files=data_file, split="train")["label"])
    low_contrast = Corruption(name="contrast", severity=5)
    corrupted, clean = (predictions(artifact, data_file, "colors", c) for c in (low_contrast, None))
    assert not torch.equal(corrupted, clean), "the corruption should change some prediction, or this checks nothing"
    assert results["contrast-5"]["colors"]["score"] == pytest.approx(float((corrupted == labels).float().mean()))

    out = capsys.readouterr().out
    assert "corruption: none (clean images)" in out
    assert "corruption: gaussian_noise, severity 5 (seed 0)" in out
    assert "corruption: contrast, severity 5 (seed 0)" in out


def test_the_model_card_keeps_corrupted_results_beside_the_clean_ones(artifact, task_data, tmp_path):
    model_dir = shutil.copytree(artifact, tmp_path / "model")
    data_yaml = write_yaml(task_data, tmp_path / "data.yaml")
    wemoe_eval([str(model_dir), data_yaml, "--update-model-card"])
    wemoe_eval([str(model_dir), data_yaml, "--update-model-card", "--corruption", "pixelate", "--severity", "2",
                "--corruption-seed", "9"])

    results = ModelCard.load(model_dir / "README.md").data.eval_results
    shapes = {result.dataset_config: result for result in results if result.dataset_name.startswith("shapes")}
    assert set(shapes) == {None, "pixelate-2"}
    assert shapes["pixelate-2"].dataset_name == "shapes (pixelate, severity 2)"
    assert shapes["pixelate-2"].dataset_args == {"name": "pixelate", "severity": 2, "seed": 9}
    assert len(results) == 2 * len(task_data["tasks"])


def test_tta_adapts_on_corrupted_images_records_them_and_resumes_only_with_the_same(artifact, task_data, tmp_path,
                                                                                    capsys):
    data_yaml = write_yaml(task_data, tmp_path / "data.yaml")
    corrupt = ["--corruption", "motion_blur", "--severity", "3", "--corruption-seed", "1"]
    run_tta(artifact, data_yaml, tmp_path / "adapted", "--steps", "2", "--checkpointing-steps", "1", *corrupt)

    record = yaml.safe_load((tmp_path / "adapted" / "merge_config.yaml").read_text())["adaptation"]
    assert record["data"]["shapes"]["corruption"] == {"name": "motion_blur", "severity": 3, "seed": 1}
    assert "corrupted: motion_blur, severity 3 (seed 1)" in (tmp_path / "adapted" / "README.md").read_text()

    with pytest.raises(SystemExit):
        run_tta(artifact, data_yaml, tmp_path / "adapted", "--steps", "3", "--overwrite", "--resume",
                "--corruption", "motion_blur", "--severity", "4", "--corruption-seed", "1")
    error = capsys.readouterr().err
    assert "written by a run with other settings" in error and "'severity': 4" in error
