"""The reference implementation's settings, as options: its router initialisation (`router.init: reference`), its
batch-mean adaptation routing (`wemoe-tta --adaptation-routing batch`) and the authors' cosine learning-rate schedule
(`--lr-schedule cosine`). Their numerical equality with the reference is in `test_reference_equivalence.py`; this
file checks the options themselves: what they change, what they record, and what they refuse."""

import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModel

from wemoe import merge_clip
from wemoe.adaptation import check_adaptation_routing
from wemoe.cli.tta import main as tta_main
from wemoe.recipe import MergeRecipe


def run_tta(artifact, task_data, output, *extra) -> dict:
    data = output.parent / "data.yaml"
    data.write_text(yaml.safe_dump(task_data))
    tta_main([str(artifact), str(data), "--output", str(output), "--batch-size", "4", "--checkpointing-steps", "2",
              *extra])  # fmt: skip
    return yaml.safe_load((output / "merge_config.yaml").read_text())["adaptation"]


def routers(model_dir) -> dict[str, torch.Tensor]:
    return {key: value for key, value in load_file(model_dir / "model.safetensors").items() if ".router." in key}


# router.init ---------------------------------------------------------------------------------------------------


def test_reference_init_draws_the_output_layer_and_is_recorded(base, experts, classnames, tokenizer, pixel_values,
                                                               tmp_path):  # fmt: skip
    exact = merge_clip(base, experts, classnames, tokenizer=tokenizer)
    reference = merge_clip(base, experts, classnames, tokenizer=tokenizer, router={"init": "reference"})
    for model, spread in ((exact, 0.0), (reference, 0.01)):
        weight = model.vision_model.encoder.layers[0].mlp.router.fc2.weight
        assert weight.std().item() == pytest.approx(spread, abs=0.003)
        assert torch.equal(model.vision_model.encoder.layers[0].mlp.router.fc2.bias, torch.full((3,), 0.3))
    with torch.no_grad():
        exact_logits, reference_logits = exact(pixel_values).logits, reference(pixel_values).logits
    assert not torch.equal(exact_logits, reference_logits)  # the reference starts near task arithmetic, not at it
    torch.testing.assert_close(reference_logits, exact_logits, rtol=0.05, atol=0.05)
    reference.save_pretrained(tmp_path / "reference")
    assert AutoModel.from_pretrained(tmp_path / "reference", trust_remote_code=True).config.router_init == "reference"


def test_an_unknown_router_init_is_refused_by_the_recipe(recipe):
    with pytest.raises(ValueError, match="router.init"):
        MergeRecipe.model_validate({**recipe, "router": {"init": "normal"}})


# --adaptation-routing batch ------------------------------------------------------------------------------------


def test_batch_adaptation_routing_trains_and_serves_per_sample(artifact, task_data, pixel_values, tmp_path):
    record = run_tta(artifact, task_data, tmp_path / "batch", "--steps", "2", "--adaptation-routing", "batch",
                     "--objective", "label-words")  # fmt: skip
    sample = run_tta(artifact, task_data, tmp_path / "sample", "--steps", "2", "--objective", "label-words")
    assert record["adaptation_routing"] == "batch" and "adaptation_routing" not in sample
    assert "| adaptation routing | batch" in (tmp_path / "batch" / "README.md").read_text()
    # The modes train differently (the entropy's gradient goes through one merged weight per batch)...
    batch_routers, sample_routers = routers(tmp_path / "batch"), routers(tmp_path / "sample")
    assert any(not torch.equal(batch_routers[key], sample_routers[key]) for key in batch_routers)
    # ...and the adapted model routes each sample alone again: its output does not depend on its batch mates.
    model = AutoModel.from_pretrained(tmp_path / "batch", trust_remote_code=True).eval()
    with torch.no_grad():
        together = model(pixel_values).logits
        alone = torch.cat([model(pixel_values[i : i + 1]).logits for i in range(len(pixel_values))])
    torch.testing.assert_close(together, alone)


def test_batch_adaptation_routing_is_refused_where_it_cannot_equal_one_process(base, experts, classnames, tokenizer):
    model = merge_clip(base, experts, classnames, tokenizer=tokenizer)
    check_adaptation_routing(model, "batch", 1)
    with pytest.raises(ValueError, match="on 2 processes each would average its own share"):
        check_adaptation_routing(model, "batch", 2)
    with pytest.raises(ValueError, match="has no routers"):
        check_adaptation_routing(torch.nn.Linear(2, 2), "batch", 1)
    with pytest.raises(ValueError, match="--adaptation-routing must be one of sample, batch"):
        check_adaptation_routing(model, "mean", 1)


# --lr-schedule cosine ------------------------------------------------------------------------------------------


def test_cosine_schedule_changes_the_run_is_recorded_and_resumes_exactly(artifact, task_data, tmp_path):
    cosine = ["--lr", "0.01", "--lr-schedule", "cosine"]
    record = run_tta(artifact, task_data, tmp_path / "cosine", "--steps", "4", *cosine)
    constant = run_tta(artifact, task_data, tmp_path / "constant", "--steps", "4", "--lr", "0.01")
    assert record["lr_schedule"] == "cosine" and "lr_schedule" not in constant
    cosine_routers, constant_routers = routers(tmp_path / "cosine"), routers(tmp_path / "constant")
    assert any(not torch.equal(cosine_routers[key], constant_routers[key]) for key in cosine_routers)

    # What a kill after step 2 leaves (its checkpoint, no artifact), resumed: the schedule's state is in the
    # checkpoint, and the run ends as the straight one.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "cosine.checkpoints", tmp_path / "resumed.checkpoints")
    shutil.rmtree(tmp_path / "resumed.checkpoints" / "step_4")
    run_tta(artifact, task_data, resumed, "--steps", "4", *cosine, "--resume")
    assert routers(resumed).keys() == cosine_routers.keys()
    for key, value in routers(resumed).items():
        torch.testing.assert_close(value, cosine_routers[key], rtol=0, atol=0)
