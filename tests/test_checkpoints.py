"""Experts read from disk: full fine-tunes in every layout and format, and PEFT LoRA adapters."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import CLIPVisionModel

from wemoe import merge_clip
from wemoe.backbones.clip import vision_tower_key
from wemoe.checkpoints import CheckpointTensors


@pytest.mark.parametrize(
    ("checkpoint_key", "tower_key"),
    [
        ("vision_model.encoder.layers.0.mlp.fc1.weight", "encoder.layers.0.mlp.fc1.weight"),
        ("encoder.layers.0.mlp.fc1.weight", "encoder.layers.0.mlp.fc1.weight"),
        ("vision_model.embeddings.position_ids", None),
        ("text_model.encoder.layers.0.mlp.fc1.weight", None),
        ("visual_projection.weight", None),
        ("logit_scale", None),
    ],
)
def test_vision_tower_key(checkpoint_key, tower_key):
    assert vision_tower_key(checkpoint_key) == tower_key


@pytest.mark.parametrize("serialization", ["safetensors", "bin", "sharded"])
def test_checkpoint_formats_read_the_same_tensors(experts, tmp_path, serialization):
    expert = experts["shapes"]
    if serialization == "bin":
        expert.config.save_pretrained(tmp_path)
        torch.save(expert.state_dict(), tmp_path / "pytorch_model.bin")
    else:
        expert.save_pretrained(tmp_path, max_shard_size="20KB" if serialization == "sharded" else "5GB")
    if serialization == "sharded":
        assert (tmp_path / "model.safetensors.index.json").exists()
    tensors = CheckpointTensors(tmp_path, "Expert 'shapes'", vision_tower_key, "CLIP backbone")
    state = expert.state_dict()
    assert set(tensors) == set(state)
    for key, tensor in state.items():
        assert tensors.shapes[key] == tensor.shape
        assert torch.equal(tensors[key], tensor)


def lora_expert(base, rslora: bool) -> tuple:
    """A LoRA fine-tune of the base vision tower (random B, so it changes the model) and its merged dense twin."""
    tower = CLIPVisionModel(base.config.vision_config).eval()
    tower.load_state_dict(base.vision_model.state_dict())
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "fc1", "fc2"],
        rank_pattern={"fc2": 2},
        alpha_pattern={"v_proj": 3},
        use_rslora=rslora,
        init_lora_weights=False,
    )
    peft_model = get_peft_model(copy.deepcopy(tower), config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.2)
    dense = copy.deepcopy(peft_model).merge_and_unload()
    return peft_model, dense


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_lora_expert_equals_its_dense_fine_tune(base, experts, classnames, tokenizer, pixel_values, tmp_path, rslora):
    peft_model, dense = lora_expert(base, rslora)
    peft_model.save_pretrained(tmp_path / "adapter")
    with_adapter = merge_clip(base, {**experts, "colors": str(tmp_path / "adapter")}, classnames, tokenizer=tokenizer)
    with_dense = merge_clip(base, {**experts, "colors": dense}, classnames, tokenizer=tokenizer)
    dense_state = with_dense.state_dict()
    for name, tensor in with_adapter.state_dict().items():
        if "router" not in name:  # routers start at random hidden weights; at init they do not change the output
            torch.testing.assert_close(tensor, dense_state[name], atol=1e-5, rtol=0, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(
            with_adapter(pixel_values).logits, with_dense(pixel_values).logits, atol=1e-5, rtol=0
        )


def test_dora_adapter_is_rejected(base, experts, classnames, tokenizer, tmp_path):
    tower = CLIPVisionModel(base.config.vision_config)
    tower.load_state_dict(base.vision_model.state_dict())
    get_peft_model(tower, LoraConfig(r=2, target_modules=["fc1"], use_dora=True)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"Expert 'colors': adapter .* sets use_dora: DoRA .* is not supported"):
        merge_clip(base, {**experts, "colors": str(tmp_path)}, classnames, tokenizer=tokenizer)
