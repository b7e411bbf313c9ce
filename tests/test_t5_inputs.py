"""merge_t5 from checkpoint directories and LoRA adapters, and bad T5 input stopped with an error that says what and
where."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from test_t5 import TASKS, build_family
from toy_t5 import build_toy_t5_base, build_toy_t5_expert
from transformers import T5ForConditionalGeneration

from wemoe import merge_t5
from wemoe.toy import build_toy_base


@pytest.fixture(scope="module")
def flan():
    return build_family(gated=True, tied=False)


def assert_same_weights(model, other):
    other_state = other.state_dict()
    for name, tensor in model.state_dict().items():
        if "router" not in name:
            torch.testing.assert_close(tensor, other_state[name], atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_checkpoint_directories_give_the_same_model_as_models_in_memory(tmp_path, tied):
    base, experts = build_family(gated=True, tied=tied)
    base.save_pretrained(tmp_path / "base")
    paths = {}
    for task, expert in experts.items():
        expert.save_pretrained(tmp_path / task)
        paths[task] = str(tmp_path / task)
    from_disk = merge_t5(str(tmp_path / "base"), paths)
    assert from_disk.config.tie_word_embeddings == tied
    assert_same_weights(from_disk, merge_t5(base, experts))


@torch.no_grad()
def test_lora_expert_equals_its_dense_fine_tune(flan, tmp_path):
    base, experts = flan
    peft_model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v", "wi_0", "wo"], init_lora_weights=False),
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    dense = peft_model.merge_and_unload()
    with_adapter = merge_t5(base, {**experts, "nli": str(tmp_path / "adapter")})
    with_dense = merge_t5(base, {**experts, "nli": dense})
    assert_same_weights(with_adapter, with_dense)
    q = "encoder.block.0.layer.0.SelfAttention.q.weight"
    assert not torch.equal(dense.state_dict()[q], base.state_dict()[q]), "the adapter must change the weights"


def test_expert_with_a_different_feed_forward_size(flan):
    base, experts = flan
    wide_config = copy.deepcopy(base.config)
    wide_config.d_ff = 128
    with pytest.raises(ValueError, match=r"Expert 'topic' does not share .*d_ff: base 64, expert 128"):
        merge_t5(base, {**experts, "topic": T5ForConditionalGeneration(wide_config)})


def test_gated_and_plain_experts_do_not_mix(flan):
    base, experts = flan
    relu_base = build_toy_t5_base(seed=0, gated=False, tied=False)
    with pytest.raises(ValueError, match=r"Expert 'sst2' does not share .*feed_forward_proj: base 'gated-gelu'"):
        merge_t5(base, {**experts, "sst2": build_toy_t5_expert(relu_base, seed=3)})


def test_expert_checkpoint_missing_a_tensor(flan, tmp_path):
    base, experts = flan
    experts["sst2"].save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["decoder.block.2.layer.2.DenseReluDense.wo.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"Expert 'sst2' checkpoint '{tmp_path}' is missing tensors .*layer.2.Dense"):
        merge_t5(base, {**experts, "sst2": str(tmp_path)})


def test_expert_that_disagrees_on_lm_head_tying(flan, tmp_path):
    base, experts = flan
    tied_expert = build_toy_t5_expert(build_toy_t5_base(seed=0, gated=True, tied=True), seed=4)
    with pytest.raises(ValueError, match=r"Expert 'topic' does not share .*scale_decoder_outputs: base False"):
        merge_t5(base, {**experts, "topic": tied_expert})
    experts["topic"].save_pretrained(tmp_path)  # the same checkpoint with its lm_head dropped, as a tied save has
    weights = load_file(tmp_path / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors .*'lm_head.weight'.* disagree on tying lm_head"):
        merge_t5(base, {**experts, "topic": str(tmp_path)})


def test_expert_with_nan(flan):
    base, experts = flan
    broken = copy.deepcopy(experts["nli"])
    with torch.no_grad():
        broken.encoder.block[1].layer[1].DenseReluDense.wi_1.weight[0, 0] = float("inf")
    with pytest.raises(
        ValueError, match=r"Expert 'nli': tensor 'encoder.block.1.layer.1.DenseReluDense.wi_1.weight' contains NaN"
    ):
        merge_t5(base, {**experts, "nli": broken})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"experts": {}}, r"`experts` is empty"),
        ({"classnames": {"qqp": ["yes"]}}, r"`classnames` names tasks that are not the model's: \['qqp'\]"),
        ({"classnames": {"sst2": []}}, r"`classnames` has an empty class list for task\(s\) \['sst2'\]"),
        ({"variant": "moe"}, r"variant: Input should be 'wemoe', 'e-wemoe' or 'static'"),
    ],
    ids=["no-experts", "unknown-task", "empty-words", "variant"],
)
def test_bad_arguments(flan, change, message):
    base, experts = flan
    arguments = {"experts": experts, **change}
    with pytest.raises(ValueError, match=message):
        merge_t5(base, **arguments)


def test_expert_of_the_wrong_kind(flan):
    base, experts = flan
    with pytest.raises(TypeError, match=r"Expert 'sst2' must be a T5 model, got CLIPModel"):
        merge_t5(base, {**experts, "sst2": build_toy_base()})
    assert set(experts) == set(TASKS)
