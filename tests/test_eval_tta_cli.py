"""wemoe-eval and wemoe-tta as a user runs them: the results table and JSON, the device they run on, a fine-tune saved
as a bare CLIPVisionModel scored over its base, and how many TTA checkpoints stay on disk."""

import json

import pytest
import torch
from test_tta import all_tensors, write_yaml

from wemoe.cli.evaluate import main as wemoe_eval
from wemoe.results import EvaluationResults


def test_eval_prints_a_table_with_metric_and_samples_and_writes_them_as_json(artifact, task_data, tmp_path, capsys):
    output = tmp_path / "results.json"
    wemoe_eval([str(artifact), write_yaml(task_data, tmp_path / "data.yaml"), "--output", str(output)])

    results = json.loads(output.read_text())
    assert set(results) == {*task_data["tasks"], "average"}
    for task in task_data["tasks"]:
        assert results[task].keys() == {"metric", "score", "num_samples"}
        assert results[task]["metric"] == "accuracy" and results[task]["num_samples"] == 20
        assert 0 <= results[task]["score"] <= 1
    scores = [results[task]["score"] for task in task_data["tasks"]]
    assert results["average"] == {"metric": "accuracy", "score": pytest.approx(sum(scores) / 3), "num_samples": 60}

    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["task", "metric", "score", "samples"]
    shapes = next(line for line in lines if line.startswith("shapes "))
    assert shapes.split() == ["shapes", "accuracy", f"{100 * results['shapes']['score']:.2f}%", "20"]


def test_spearman_is_shown_as_a_correlation_and_an_average_of_unlike_metrics_as_a_mean():
    from wemoe.cli.evaluate import results_table

    results = EvaluationResults(
        {"sst2": 0.875, "stsb": -0.25},
        {"sst2": "exact_match", "stsb": "spearmanr"},
        "text2text-generation",
        {"sst2": 8, "stsb": 12},
    )
    rows = {line.split()[0]: line.split()[1:] for line in results_table(results).splitlines()}
    assert rows["sst2"] == ["exact", "match", "87.50%", "8"]
    assert rows["stsb"] == ["spearman", "-0.2500", "12"]
    assert rows["average"] == ["mean", "+0.3125", "20"]
    assert "in [-1, 1]" in results_table(results)
    assert results.to_json()["stsb"] == {"metric": "spearmanr", "score": -0.25, "num_samples": 12}


def test_results_json_of_either_layout_reads_as_scores():
    from wemoe.results import scores_from_json

    old = {"shapes": 0.5, "average": 0.5}
    new = {"shapes": {"metric": "accuracy", "score": 0.5, "num_samples": 4}, "average": {"score": 0.5}}
    assert scores_from_json(old) == scores_from_json(new) == old


@pytest.fixture
def machine(monkeypatch):
    """Pretend the machine has (or lacks) CUDA and MPS devices, with ACCELERATE_USE_CPU unset."""
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)

    def pretend(cuda: int = 0, mps: bool = False) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)

    return pretend


def test_the_default_device_is_cuda_then_mps_then_cpu(machine, monkeypatch):
    from wemoe.evaluation import resolve_device

    machine(cuda=1, mps=True)
    assert resolve_device() == torch.device("cuda")
    machine(cuda=0, mps=True)
    assert resolve_device() == torch.device("mps")
    machine(cuda=0, mps=False)
    assert resolve_device() == torch.device("cpu")
    machine(cuda=1)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # accelerate's own switch to the CPU
    assert resolve_device() == torch.device("cpu")


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("gpu", r"--device 'gpu' is not a torch device"),
        ("cuda:1", r"--device 'cuda:1': this machine has no such cuda device"),
        ("mps", r"--device 'mps': this machine has no such mps device"),
        ("meta", r"--device meta holds no weights"),
    ],
)
def test_a_device_the_machine_lacks_is_refused_before_loading(machine, device, message):
    from wemoe.evaluation import resolve_device

    machine(cuda=1)
    assert resolve_device("cuda:0") == torch.device("cuda:0") and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=message):
        resolve_device(device)


@pytest.fixture
def model_moves(monkeypatch) -> list[torch.device]:
    """Where models are sent by `Module.to`, which then keeps them on the CPU (this machine's only device)."""
    moves, to = [], torch.nn.Module.to

    def record(module, *args, **kwargs):
        device = kwargs.get("device", args[0] if args else None)
        if isinstance(device, (str, torch.device)):
            moves.append(torch.device(device))
            return to(module, "cpu")
        return to(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", record)
    return moves


def test_eval_puts_the_model_on_the_chosen_device_and_says_which(
    artifact, task_data, tmp_path, machine, model_moves, caplog
):
    data_yaml = write_yaml(task_data, tmp_path / "data.yaml")
    machine(cuda=1)
    with caplog.at_level("INFO", logger="wemoe.evaluation"):
        wemoe_eval([str(artifact), data_yaml])
    assert model_moves == [torch.device("cuda")]
    assert f"Evaluating {artifact} on cuda" in caplog.text

    model_moves.clear()
    with caplog.at_level("INFO", logger="wemoe.evaluation"):
        wemoe_eval([str(artifact), data_yaml, "--device", "cpu"])  # honoured even where a GPU is present
    assert model_moves == [torch.device("cpu")]
    assert f"Evaluating {artifact} on cpu" in caplog.text


def test_tta_runs_on_the_cpu_with_cpu_and_says_so(artifact, task_data, tmp_path, caplog, monkeypatch):
    from wemoe import adaptation
    from wemoe.cli.tta import main as wemoe_tta

    accelerators, accelerator_class = [], adaptation.Accelerator
    monkeypatch.setattr(
        adaptation, "Accelerator", lambda **kwargs: accelerators.append(kwargs) or accelerator_class(**kwargs)
    )
    data_yaml = write_yaml(task_data, tmp_path / "data.yaml")
    arguments = ["--steps", "1", "--batch-size", "4", "--cpu"]
    with caplog.at_level("INFO", logger="wemoe.adaptation"):
        wemoe_tta([str(artifact), data_yaml, "--output", str(tmp_path / "adapted"), *arguments])
    assert [kwargs["cpu"] for kwargs in accelerators] == [True]  # accelerate's own switch, as `launch --cpu` sets
    assert "Process 0 of 1 adapts on cpu" in caplog.text


@pytest.fixture(scope="module")
def demo_checkpoints(tmp_path_factory) -> dict[str, str]:
    """The demo's checkpoints: a base CLIPModel (tokenizer, image processor) and experts saved as CLIPVisionModel."""
    from wemoe.cli.demo import save_toy_checkpoints, write_demo_data

    workspace = tmp_path_factory.mktemp("demo")
    paths = save_toy_checkpoints(workspace, seed=0, expert_steps=1)
    shapes = write_demo_data(workspace, seed=0)["tasks"]["shapes"]
    return {**paths, "data": write_yaml({"tasks": {"shapes": shapes}}, workspace / "shapes.yaml")}


def test_a_bare_vision_tower_without_a_base_is_refused_saying_what_to_pass(demo_checkpoints, capsys):
    with pytest.raises(SystemExit) as exit_info:
        wemoe_eval([demo_checkpoints["shapes"], demo_checkpoints["data"]])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert "is a CLIPVisionModel (config.json" in error and "names no base model" in error
    assert "Pass --base with the CLIP model it was fine-tuned from" in error


def whole_clip(demo_checkpoints, directory):
    """The shapes fine-tune as a whole CLIPModel (the base's text tower and processors, the expert's vision tower)."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, CLIPVisionModel

    whole = CLIPModel.from_pretrained(demo_checkpoints["base"])
    whole.vision_model.load_state_dict(CLIPVisionModel.from_pretrained(demo_checkpoints["shapes"]).state_dict())
    whole.save_pretrained(directory)
    for part in (AutoTokenizer, AutoImageProcessor):
        part.from_pretrained(demo_checkpoints["base"]).save_pretrained(directory)
    return whole


@torch.no_grad()
def test_a_bare_vision_tower_is_scored_zero_shot_in_its_base(demo_checkpoints, tmp_path):
    from transformers import AutoTokenizer

    from wemoe.backbones import get_backbone
    from wemoe.backbones.clip import ZeroShotCLIP
    from wemoe.cli.demo import HELD_OUT_IMAGES_PER_TASK
    from wemoe.data import load_data_config, load_task_dataset

    whole = whole_clip(demo_checkpoints, tmp_path / "whole")
    base, data = demo_checkpoints["base"], demo_checkpoints["data"]
    wemoe_eval([demo_checkpoints["shapes"], data, "--base", base, "--output", str(tmp_path / "tower.json")])
    wemoe_eval([str(tmp_path / "whole"), data, "--output", str(tmp_path / "whole.json")])
    tower, expected = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("tower", "whole"))
    assert tower == expected and tower["shapes"]["num_samples"] == HELD_OUT_IMAGES_PER_TASK

    # Not equal by chance: the classifier gives the whole model's logits.
    data_config = load_data_config(data)
    datasets = {"shapes": load_task_dataset("shapes", data_config.tasks["shapes"], need_labels=True)}
    model, names, _ = get_backbone("clip").classifier_for(
        demo_checkpoints["shapes"], datasets, data_config, torch.device("cpu"), base
    )
    reference = ZeroShotCLIP(whole, AutoTokenizer.from_pretrained(base), names)
    pixel_values = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(pixel_values, "shapes").logits, reference(pixel_values, "shapes").logits)


def test_a_vision_tower_whose_config_names_its_base_needs_no_flag(demo_checkpoints, tmp_path, caplog):
    """transformers 4 saved `_name_or_path` in config.json: the public fine-tunes name their base that way."""
    import shutil

    tower = tmp_path / "shapes"
    shutil.copytree(demo_checkpoints["shapes"], tower)
    config = json.loads((tower / "config.json").read_text())
    (tower / "config.json").write_text(json.dumps({**config, "_name_or_path": demo_checkpoints["base"]}))
    with caplog.at_level("INFO", logger="wemoe"):
        wemoe_eval([str(tower), demo_checkpoints["data"], "--output", str(tmp_path / "tower.json")])
    assert f"in the base {demo_checkpoints['base']} (named by its config.json)" in caplog.text
    wemoe_eval([demo_checkpoints["shapes"], demo_checkpoints["data"], "--base", demo_checkpoints["base"],
                "--output", str(tmp_path / "flag.json")])  # fmt: skip
    assert json.loads((tmp_path / "tower.json").read_text()) == json.loads((tmp_path / "flag.json").read_text())


def test_base_is_refused_for_a_whole_model(artifact, task_data, demo_checkpoints, tmp_path, capsys):
    with pytest.raises(SystemExit):
        wemoe_eval([str(artifact), write_yaml(task_data, tmp_path / "data.yaml"), "--base", demo_checkpoints["base"]])
    assert "is a whole 'wemoe' model, scored as it is" in capsys.readouterr().err


def test_tta_keeps_the_newest_checkpoints_and_resumes_from_them(artifact, task_data, tmp_path):
    from wemoe.cli.tta import main as wemoe_tta

    data_yaml = write_yaml(task_data, tmp_path / "data.yaml")

    def run(output, steps: int, keep: int, *extra) -> list[str]:
        checkpoints = tmp_path / f"{output}.checkpoints"
        wemoe_tta([str(artifact), data_yaml, "--output", str(tmp_path / output), "--steps", str(steps),
                   "--batch-size", "4", "--lr", "1e-3", "--checkpointing-steps", "5", "--checkpoint-dir",
                   str(checkpoints), "--keep-checkpoints", str(keep), *extra])  # fmt: skip
        return sorted(path.name for path in checkpoints.iterdir())

    assert run("straight", 20, keep=2) == ["step_15", "step_20"]
    # A run stopped after step 10 with one checkpoint kept, then resumed from it into another output.
    assert run("interrupted", 10, keep=1) == ["step_10"]
    (tmp_path / "resumed.checkpoints").mkdir()
    (tmp_path / "interrupted.checkpoints" / "step_10").rename(tmp_path / "resumed.checkpoints" / "step_10")
    assert run("resumed", 20, 1, "--resume") == ["step_20"]
    expected, resumed = all_tensors(tmp_path / "straight"), all_tensors(tmp_path / "resumed")
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(resumed[key], expected[key]), key


def test_keep_checkpoints_below_one_is_refused(artifact, task_data, tmp_path, capsys):
    from wemoe.cli.tta import main as wemoe_tta

    with pytest.raises(SystemExit):
        wemoe_tta([str(artifact), write_yaml(task_data, tmp_path / "data.yaml"), "--output", str(tmp_path / "out"),
                   "--keep-checkpoints", "0"])  # fmt: skip
    assert "--keep-checkpoints must keep at least the newest checkpoint" in capsys.readouterr().err


def test_the_t5_only_objective_is_refused_for_an_image_model_before_loading(artifact, task_data, tmp_path, capsys):
    from wemoe.cli.tta import main as wemoe_tta

    with pytest.raises(SystemExit):
        wemoe_tta([str(artifact), write_yaml(task_data, tmp_path / "data.yaml"), "--output", str(tmp_path / "out"),
                   "--objective", "label-words-and-rest"])  # fmt: skip
    assert "--objective label-words-and-rest is not available for CLIP models" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
