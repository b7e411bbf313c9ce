"""Test-time adaptation: entropy goes down, only routers change, resume is exact, bad data is named."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModel

from wemoe.adaptation import load_task_streams
from wemoe.backbones import backbone_for_config
from wemoe.cli.tta import main
from wemoe.data import batch_indices
from wemoe.streams import entropy_loss


def write_yaml(content: dict, path) -> str:
    path.write_text(yaml.safe_dump(content))
    return str(path)


def run_tta(artifact, data_yaml, output, *extra) -> None:
    main([str(artifact), data_yaml, "--output", str(output), "--batch-size", "4", "--lr", "1e-3", *extra])


@torch.no_grad()
def streams_entropy(model, streams, steps: int = 5) -> float:
    """Mean entropy of `model` over the first `steps` fixed batches of every task stream."""
    losses = [
        entropy_loss(stream.logits(model, stream.batch(0, i, step, 0, 1)))
        for i, stream in enumerate(streams.values())
        for step in range(steps)
    ]
    return float(torch.stack(losses).mean())


def mean_entropy(model_dir, task_data) -> float:
    """Mean entropy over a few fixed batches of every task (images or prompts, as the artifact takes)."""
    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True)
    processor = backbone_for_config(model.config).load_processor(model_dir)
    return streams_entropy(model, load_task_streams(task_data, model, processor, 4, 1))


def all_tensors(model_dir) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def test_twenty_steps_lower_entropy_and_change_only_routers(artifact, task_data, tmp_path):
    data_yaml = write_yaml(task_data, tmp_path / "data.yaml")
    run_tta(artifact, data_yaml, tmp_path / "adapted", "--steps", "20", "--objective", "label-words")

    before, after = all_tensors(artifact), all_tensors(tmp_path / "adapted")
    assert before.keys() == after.keys()
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed and all(".router." in key for key in changed)
    assert {key for key in before if ".router.fc2." in key} <= changed
    assert mean_entropy(tmp_path / "adapted", task_data) < mean_entropy(artifact, task_data)
    card = (tmp_path / "adapted" / "README.md").read_text()
    assert "| steps | 20 |" in card and "| learning rate | 0.001 |" in card and "| shapes |" in card
    assert "| objective | label-words |" in card
    assert AutoModel.from_pretrained(tmp_path / "adapted", trust_remote_code=True).config.tasks == [
        "shapes",
        "colors",
        "scenes",
    ]


def test_resume_after_a_kill_ends_with_the_same_routers(artifact, task_data, tmp_path):
    data_yaml = write_yaml(task_data, tmp_path / "data.yaml")
    straight = tmp_path / "straight"
    run_tta(artifact, data_yaml, straight, "--steps", "20", "--checkpointing-steps", "5")
    checkpoints = tmp_path / "straight.checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_10", "step_15", "step_20", "step_5"]
    router_checkpoint = load_file(checkpoints / "step_5" / "model.safetensors")
    assert router_checkpoint and all(".router." in key for key in router_checkpoint)

    # What a kill after step 10 leaves on disk: checkpoints up to step 10, no artifact.
    shutil.copytree(checkpoints, tmp_path / "killed.checkpoints")
    for late in ("step_15", "step_20"):
        shutil.rmtree(tmp_path / "killed.checkpoints" / late)
    run_tta(artifact, data_yaml, tmp_path / "killed", "--steps", "20", "--checkpointing-steps", "5", "--resume")

    expected, resumed = all_tensors(straight), all_tensors(tmp_path / "killed")
    routers = [key for key in expected if ".router." in key]
    assert routers
    for key in expected:
        assert torch.equal(resumed[key], expected[key]), key


def test_batches_cycle_through_every_sample_each_epoch():
    first_epoch = [i for step in range(5) for i in batch_indices(20, 4, seed=3, task_index=1, step=step)]
    assert sorted(first_epoch) == list(range(20))
    assert batch_indices(20, 4, 3, 1, step=5) != batch_indices(20, 4, 3, 1, step=0)  # reshuffled next epoch
    assert batch_indices(20, 4, 3, 1, step=7) == batch_indices(20, 4, 3, 1, step=7)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda d, tmp: d["tasks"].update(cars=dict(d["tasks"]["shapes"])),
            r"task\(s\) \['cars'\] that the model does not have",
        ),
        (
            lambda d, tmp: d["tasks"]["shapes"].update(image_column="img"),
            r"Task 'shapes': .* has no column 'img'; columns: \['image', 'label'\]",
        ),
        (
            lambda d, tmp: d["tasks"]["colors"].update(data_files=empty_dataset(tmp)),
            r"Task 'colors': dataset 'parquet' split 'train' is empty",
        ),
        (lambda d, tmp: d["tasks"]["shapes"].update(colour=1), r"tasks.shapes.colour: Extra inputs are not permitted"),
    ],
    ids=["unknown-task", "missing-image-column", "empty-dataset", "unknown-key"],
)
def test_bad_data_is_reported_by_name(artifact, task_data, tmp_path, capsys, change, message):
    data = yaml.safe_load(yaml.safe_dump(task_data))
    change(data, tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_tta(artifact, write_yaml(data, tmp_path / "data.yaml"), tmp_path / "out", "--steps", "1")
    assert exit_info.value.code == 1
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def empty_dataset(tmp_path) -> str:
    from datasets import ClassLabel, Dataset, Features, Image

    features = Features({"image": Image(), "label": ClassLabel(names=["red"])})
    Dataset.from_dict({"image": [], "label": []}, features=features).to_parquet(tmp_path / "empty.parquet")
    return str(tmp_path / "empty.parquet")


def final_loss(log: str, name: str = "entropy") -> tuple[int, float]:
    """The process count and last-step loss (`name`: "entropy", "task-routing loss") that a `wemoe-tta` run logs when
    it ends."""
    found = re.findall(rf"on (\d+) process\(es\); mean {name} at the last step ([-0-9.e]+)", log)
    assert len(found) == 1, log[-3000:]
    return int(found[0][0]), float(found[0][1])


@pytest.mark.parametrize(
    ("objective", "loss"),
    [("label-words", "entropy"), ("task-routing", "task-routing loss")],
    ids=["entropy", "task-routing"],
)
def test_two_processes_give_the_routers_of_one_with_the_same_global_batch(
    artifact, task_data, tmp_path, caplog, objective, loss
):
    """Two real processes (torchrun, gloo on CPU) each take half of every global batch; their averaged gradients
    and losses must equal one process's on the whole batch, for the paper's entropy and for task routing (whose
    gradients reach the routers only through the routing weights). `accelerate launch --cpu --num_processes 2` would
    start a single process on CPU, so the run itself asserts its world size (tests/tta_in_process_group.py)."""
    data_yaml = write_yaml(task_data, tmp_path / "data.yaml")
    arguments = [str(artifact), data_yaml, "--steps", "6", "--batch-size", "4", "--lr", "1e-3"]
    arguments += ["--objective", objective]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    script = Path(__file__).with_name("tta_in_process_group.py")
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "true",
        "EXPECTED_WORLD_SIZE": "2",
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "PYTHONPATH": str(Path(__file__).parents[1]),
    }
    completed = subprocess.run(
        [*launch, str(script), *arguments, "--output", str(tmp_path / "ddp")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert sorted(re.findall(r"process (\d) of 2 done", completed.stdout)) == ["0", "1"], completed.stdout
    assert completed.stdout.count("Wrote ") == 1, completed.stdout  # by the main process only
    with caplog.at_level("INFO", logger="wemoe.adaptation"):
        main([*arguments, "--output", str(tmp_path / "single")])

    assert final_loss(completed.stderr, loss)[0] == 2 and final_loss(caplog.text, loss)[0] == 1
    assert final_loss(completed.stderr, loss)[1] == pytest.approx(final_loss(caplog.text, loss)[1], abs=1e-5)
    ddp, single, start = all_tensors(tmp_path / "ddp"), all_tensors(tmp_path / "single"), all_tensors(artifact)
    routers = [key for key in single if ".router." in key]
    assert max((single[k] - start[k]).abs().max() for k in routers) > 1e-3  # the routers did move
    # Each process merges its half of the batch, and the gradients are summed across processes: the last bits of
    # fp32 differ (a matmul's rounding depends on its row count), and Adam's normalisation lifts that to ~1e-6
    # after six steps. A gradient that did not reach the routers, or came from the wrong samples, differs by the
    # routers' movement (over 1e-3, asserted above).
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], atol=1e-5, rtol=0, msg=key)
