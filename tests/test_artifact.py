"""Saved artifacts load through trust_remote_code alone, in a process that cannot import this repository."""

import json

import pytest
import safetensors.torch
import torch
from fresh_process import run_in_fresh_process
from reference import randomize_routers

from modeling_wemoe import WEMoEForImageClassification
from modeling_wemoe.modeling_wemoe import WEMoELinear
from wemoe import default_image_processor, merge_clip, save_artifact
from wemoe.toy import build_toy_expert


@pytest.mark.parametrize("variant", ["wemoe", "e-wemoe"])
def test_round_trip_in_a_process_without_this_repository(
    base, experts, classnames, tokenizer, pixel_values, tmp_path, variant
):
    model = merge_clip(base, experts, classnames, tokenizer=tokenizer, variant=variant)
    randomize_routers(model)
    artifact = save_artifact(model, tmp_path / "artifact", default_image_processor(base.config.vision_config))
    config = json.loads((artifact / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForImageClassification"}
    assert {"modeling_wemoe.py", "configuration_wemoe.py", "preprocessor_config.json"} <= {
        p.name for p in artifact.iterdir()
    }

    results = run_in_fresh_process(artifact, pixel_values, tmp_path)

    with torch.no_grad():
        expected = model(pixel_values).logits
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    for auto_class in ("AutoModel", "AutoModelForImageClassification"):
        loaded = results[auto_class]
        assert loaded["missing"] == [] and loaded["unexpected"] == []
        assert loaded["trainable"] == trainable
        torch.testing.assert_close(torch.tensor(loaded["logits"]), expected, atol=1e-6, rtol=0)
    labels = [prediction["label"] for prediction in results["pipeline"]]
    assert len(labels) == 2 and set(labels) <= set(classnames["shapes"])
    assert [prediction["task"] for prediction in results["pipeline_every_task"]] == list(classnames)


def test_a_loaded_artifact_with_stacked_task_vectors_saves_and_loads_through_transformers_and_safetensors(
    base, experts, classnames, tokenizer, pixel_values, tmp_path
):
    # Loading stacks each matrix's task vectors under a copy of W0 (`WEMoELinear.prepare`; transposed for fc2, which
    # goes by input columns); the state dict must still be plain tensors for save_pretrained and for safetensors'
    # save_model/load_model (accelerate's checkpoints), which refuse a tensor that covers only part of its storage
    # or is not contiguous.
    model = merge_clip(base, experts, classnames, tokenizer=tokenizer)
    randomize_routers(model)
    processor = default_image_processor(base.config.vision_config)
    loaded = WEMoEForImageClassification.from_pretrained(save_artifact(model, tmp_path / "first", processor))
    stores = [m.weight_task_vectors for m in loaded.modules() if isinstance(m, WEMoELinear)]
    assert sum(store._stacked is not None for store in stores) == 2 * loaded.config.vision_config.num_hidden_layers
    assert any(not store.values.is_contiguous() for store in stores)
    safetensors.torch.save_model(loaded, tmp_path / "model.safetensors")
    fresh = WEMoEForImageClassification(loaded.config)
    safetensors.torch.load_model(fresh, tmp_path / "model.safetensors")
    reloaded = WEMoEForImageClassification.from_pretrained(save_artifact(loaded, tmp_path / "second", processor))
    with torch.no_grad():
        expected = model(pixel_values).logits
        for copy in (fresh, reloaded):
            torch.testing.assert_close(copy(pixel_values).logits, expected, atol=1e-6, rtol=0)


def test_e_wemoe_artifact_is_at_most_035x_the_dense_one(base, tokenizer, tmp_path):
    # The paper's setting: eight experts.
    experts = {f"task{i}": build_toy_expert(base, seed=100 + i) for i in range(8)}
    classnames = {task: ["circle", "square"] for task in experts}
    processor = default_image_processor(base.config.vision_config)
    sizes = {}
    for variant in ("wemoe", "e-wemoe"):
        model = merge_clip(base, experts, classnames, tokenizer=tokenizer, variant=variant, keep=0.1)
        artifact = save_artifact(model, tmp_path / variant, processor)
        sizes[variant] = (artifact / "model.safetensors").stat().st_size
    assert sizes["e-wemoe"] <= 0.35 * sizes["wemoe"], sizes


def test_failed_save_leaves_no_output_behind(base, experts, classnames, tokenizer, tmp_path):
    model = merge_clip(base, experts, classnames, tokenizer=tokenizer)

    class BrokenProcessor:
        def save_pretrained(self, directory):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_artifact(model, tmp_path / "artifact", BrokenProcessor())
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_to_overwrite_unless_asked(base, experts, classnames, tokenizer, tmp_path):
    model = merge_clip(base, experts, classnames, tokenizer=tokenizer)
    processor = default_image_processor(base.config.vision_config)
    (tmp_path / "artifact").mkdir()
    with pytest.raises(ValueError, match=r"already exists; pass overwrite=True to replace it"):
        save_artifact(model, tmp_path / "artifact", processor)
    save_artifact(model, tmp_path / "artifact", processor, overwrite=True)
    assert (tmp_path / "artifact" / "model.safetensors").exists()
