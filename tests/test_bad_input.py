"""Bad input stops the merge (or the forward) with an error that says what and where."""

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from wemoe import merge_clip
from wemoe.toy import build_toy_base, build_toy_expert


def test_expert_with_a_different_hidden_size(base, experts, classnames, tokenizer):
    wide = build_toy_expert(build_toy_base(seed=1, hidden_size=64), seed=5)
    with pytest.raises(ValueError, match=r"Expert 'colors' does not share .*hidden_size: base 32, expert 64"):
        merge_clip(base, {**experts, "colors": wide}, classnames, tokenizer=tokenizer)


def test_expert_checkpoint_missing_a_tensor(base, experts, classnames, tokenizer, tmp_path):
    experts["shapes"].save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    removed = next(key for key in weights if key.endswith("layers.1.mlp.fc2.weight"))
    del weights[removed]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"Expert 'shapes' checkpoint '{tmp_path}' is missing tensors .*fc2.weight"):
        merge_clip(base, {**experts, "shapes": str(tmp_path)}, classnames, tokenizer=tokenizer)


def test_expert_with_nan(base, experts, classnames, tokenizer):
    broken = copy.deepcopy(experts["colors"])
    with torch.no_grad():
        broken.encoder.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    with pytest.raises(
        ValueError, match=r"Expert 'colors': tensor 'encoder.layers.0.self_attn.q_proj.weight' contains NaN"
    ):
        merge_clip(base, {**experts, "colors": broken}, classnames, tokenizer=tokenizer)


def test_unknown_task_at_forward(base, experts, classnames, tokenizer, pixel_values):
    model = merge_clip(base, experts, classnames, tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"Unknown task 'cars': this model has tasks \['shapes', 'colors', 'scenes'\]"):
        model(pixel_values, task="cars")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda e, c: ({**e, "cars": e["shapes"]}, c), r"must name the same tasks: experts \['cars'"),
        (lambda e, c: (e, {**c, "colors": []}), r"empty class list for task\(s\) \['colors'\]"),
        (lambda e, c: ({}, {}), "`experts` is empty"),
    ],
    ids=["task-without-classnames", "empty-classnames", "no-experts"],
)
def test_task_lists_that_do_not_match(base, experts, classnames, tokenizer, change, message):
    bad_experts, bad_classnames = change(experts, classnames)
    with pytest.raises(ValueError, match=message):
        merge_clip(base, bad_experts, bad_classnames, tokenizer=tokenizer)


def test_unknown_variant_and_missing_tokenizer(base, experts, classnames, tokenizer):
    with pytest.raises(ValueError, match=r"Invalid merge options:\n  variant: Input should be 'wemoe', 'e-wemoe'"):
        merge_clip(base, experts, classnames, tokenizer=tokenizer, variant="moe")
    with pytest.raises(ValueError, match="`tokenizer` is required when `base` is a model in memory"):
        merge_clip(base, experts, classnames)


def test_expert_of_the_wrong_type(base, experts, classnames, tokenizer):
    with pytest.raises(TypeError, match=r"Expert 'shapes' must be a CLIP model, a local directory or a Hub id"):
        merge_clip(base, {**experts, "shapes": 3}, classnames, tokenizer=tokenizer)
