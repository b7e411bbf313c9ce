"""The T5 decoder routed once per prompt (`decoder_routing="prompt"`, an option next to the paper's per-token routing):
cache- and batch-independent generation, exactness against a plain T5 whose decoder feed-forward weights are merged by
hand for each prompt, the option through save/load, the recipe and the CLI, and test-time adaptation of the decoder's
routers."""

import json

import pytest
import torch
import yaml
from huggingface_hub.errors import StrictDataclassError
from reference import randomize_routers
from reference_t5 import task_arithmetic_t5, task_vector
from safetensors.torch import load_file
from test_t5 import PROMPTS, TASKS, alone_and_padded_in_a_batch, build_family
from test_t5_convert import t5_checkpoints, t5_recipe  # noqa: F401 (t5_checkpoints: a fixture)
from toy_t5 import toy_t5_tokenizer
from transformers import AutoModelForSeq2SeqLM

from modeling_wemoe import WEMoEConfig
from wemoe import convert, merge_clip, merge_t5, save_artifact
from wemoe.cli.tta import main as tta_main
from wemoe.recipe import RecipeError, load_recipe

VARIANTS = {"wemoe": {"variant": "wemoe"}, "e-wemoe": {"variant": "e-wemoe", "keep": 1.0}}
PROMPT_ROUTING = {"decoder_routing": "prompt"}


@pytest.fixture(scope="module")
def family():
    return build_family(gated=True, tied=False)


@pytest.fixture(scope="module")
def tokenizer():
    return toy_t5_tokenizer()


def prompt_routed(family, variant: str = "wemoe", std: float = 1.0):
    base, experts = family
    model = merge_t5(base, experts, router=PROMPT_ROUTING, **VARIANTS[variant])
    randomize_routers(model, std=std)
    return model


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize(
    "options",
    [
        {"do_sample": False},
        {"do_sample": False, "num_beams": 3, "num_return_sequences": 2},
        {"do_sample": True, "top_k": 0},
    ],
    ids=["greedy", "beam-search", "sampling"],
)
def test_generation_is_the_same_with_and_without_the_cache(family, tokenizer, variant, options):
    model = prompt_routed(family, variant)
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    options = {"max_new_tokens": 8, "min_new_tokens": 8, **options}
    torch.manual_seed(0)
    with_cache = model.generate(**inputs, use_cache=True, **options)
    torch.manual_seed(0)
    without_cache = model.generate(**inputs, use_cache=False, **options)
    assert torch.equal(with_cache, without_cache)
    assert len(set(map(tuple, with_cache.tolist()))) > 1, "outputs must differ for the comparison to mean anything"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_sample_does_not_depend_on_its_batch_mates_or_padding(family, tokenizer, variant):
    model = prompt_routed(family, variant)
    # E-WEMoE under torch 2.6 (the lowest supported) differs by up to 2.3e-5 between the two batch sizes (logits and
    # routing weights), fp32 rounding in the kernels a batch size selects; a leak from padding or batch mates moves
    # the logits by about 3.
    (alone, single), (padded, in_batch) = alone_and_padded_in_a_batch(model, tokenizer, atol=1e-4)
    routing = torch.stack(in_batch.decoder_routing_weights)  # (layers, batch, experts): one vector per prompt
    assert routing.shape == (3, len(PROMPTS), len(TASKS))
    assert routing.std(dim=1).amax(dim=-1).min() > 1e-2, "routing must differ between prompts"
    torch.testing.assert_close(routing[:, 3], torch.stack(single.decoder_routing_weights)[:, 0], atol=1e-4, rtol=0)
    options = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False}
    assert torch.equal(model.generate(**padded, **options)[3], model.generate(**alone, **options)[0])


def hand_merged_decoder(model, base, experts, pooled: torch.Tensor):
    """A plain task-arithmetic T5 whose decoder feed-forward weights are W0 + sum_i r_i tau_i, r the layer's router (or
    the shared one) applied to the prompt's pooled encoder output `pooled` `(d_model,)`."""
    plain = task_arithmetic_t5(base, experts, model.config.static_merge["scaling"])
    for index, block in enumerate(plain.decoder.block):
        wemoe_layer = model.decoder.block[index].layer[-1]
        router = wemoe_layer.router if wemoe_layer.router is not None else model.router
        routing = router(pooled)
        prefix = f"decoder.block.{index}.layer.2.DenseReluDense"
        for name, parameter in block.layer[2].DenseReluDense.named_parameters():
            key = f"{prefix}.{name}"
            tau = torch.stack([task_vector(base, expert, key) for expert in experts.values()])
            parameter.copy_(base.state_dict()[key] + torch.einsum("e,e...->...", routing, tau))
    return plain


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_the_decoder_equals_a_plain_t5_merged_by_hand_for_each_prompt(family, tokenizer, variant):
    base, experts = family
    model = prompt_routed(family, variant, std=0.5)
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    decoder_input_ids = torch.tensor([[0, 5, 7, 9], [0, 11, 13, 1], [0, 20, 21, 22], [0, 30, 1, 0]])
    output = model(**inputs, decoder_input_ids=decoder_input_ids)
    encoded = output.encoder_last_hidden_state
    for sample, mask in enumerate(inputs["attention_mask"]):
        real = encoded[sample, mask.bool()]  # the prompt's real tokens, unpadded
        plain = hand_merged_decoder(model, base, experts, real.mean(dim=0))
        expected = plain(encoder_outputs=(real[None],), decoder_input_ids=decoder_input_ids[sample : sample + 1])
        torch.testing.assert_close(output.logits[sample], expected.logits[0], atol=1e-5, rtol=0)


def test_the_option_survives_save_and_load(family, tokenizer, tmp_path):
    model = prompt_routed(family, "e-wemoe")
    artifact = save_artifact(model, tmp_path / "t5_prompt_artifact", tokenizer)
    assert json.loads((artifact / "config.json").read_text())["decoder_routing"] == "prompt"
    loaded = AutoModelForSeq2SeqLM.from_pretrained(artifact, trust_remote_code=True)
    assert loaded.config.decoder_routing == "prompt"
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    decoder_input_ids = torch.tensor([[0, 5, 7]] * len(PROMPTS))
    with torch.no_grad():
        expected = model(**inputs, decoder_input_ids=decoder_input_ids, output_routing_weights=True)
        got = loaded(**inputs, decoder_input_ids=decoder_input_ids, output_routing_weights=True)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-6, rtol=0)
    assert got.decoder_routing_weights[0].shape == (len(PROMPTS), len(TASKS))


def test_a_bad_value_is_an_error_naming_the_field(family):
    with pytest.raises(StrictDataclassError, match="decoder_routing"):
        WEMoEConfig(text_config={"d_model": 16}, tasks=["sst2"], decoder_routing="step")
    with pytest.raises(StrictDataclassError, match="`decoder_routing='prompt'` .* needs an encoder-decoder backbone"):
        WEMoEConfig(text_config={"model_type": "bert"}, tasks=["sst2"], decoder_routing="prompt")
    task = {"name": "sst2", "model": "org/sst2", "classnames": ["negative", "positive"]}
    recipe = {"base_model": "org/t5", "architecture": "t5", "tasks": [task]}
    with pytest.raises(RecipeError, match=r"router\.decoder_routing: .*'token' or 'prompt'"):
        load_recipe({**recipe, "router": {"decoder_routing": "step"}})
    with pytest.raises(RecipeError, match=r"router\.decoder_routing: 'prompt' routes a decoder .* CLIP model has no"):
        load_recipe({**recipe, "architecture": "clip", "router": PROMPT_ROUTING})
    with pytest.raises(ValueError, match=r"router\.decoder_routing: 'prompt' .* CLIP model has no decoder"):
        merge_clip("org/clip", {"sst2": "org/sst2"}, {"sst2": ["negative", "positive"]}, router=PROMPT_ROUTING)


def test_convert_cli_recipe_sets_the_option(t5_checkpoints, tmp_path):  # noqa: F811 (a fixture)
    recipe = {**t5_recipe(t5_checkpoints), "router": PROMPT_ROUTING}
    artifact = convert(recipe, tmp_path / "t5_prompt_converted")
    assert json.loads((artifact / "config.json").read_text())["decoder_routing"] == "prompt"
    assert yaml.safe_load((artifact / "merge_config.yaml").read_text())["router"]["decoder_routing"] == "prompt"
    assert "the decoder once per prompt" in (artifact / "README.md").read_text()
    model = AutoModelForSeq2SeqLM.from_pretrained(artifact, trust_remote_code=True)
    inputs = toy_t5_tokenizer()(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        output = model(**inputs, decoder_input_ids=torch.zeros(len(PROMPTS), 2, dtype=torch.long),
                       output_routing_weights=True)  # fmt: skip
    assert output.decoder_routing_weights[0].shape == (len(PROMPTS), 3)


def test_tta_trains_the_decoder_routers_through_the_pooled_prompt(family, tokenizer, tmp_path):
    base, experts = family
    model = merge_t5(base, experts, classnames={"sst2": ["negative", "positive"]}, router=PROMPT_ROUTING)
    artifact = save_artifact(model, tmp_path / "t5_prompt_tta", tokenizer)
    sentences = ["a good movie", "a bad film", "i loved it", "boring and dull"]
    data = {"tasks": {task: {"path": "json", "data_files": str(tmp_path / "texts.json"), "split": "train",
                             "text_column": "text", "prefix": f"{task} sentence: "} for task in TASKS}}  # fmt: skip
    (tmp_path / "texts.json").write_text("\n".join(json.dumps({"text": s, "label": 0}) for s in sentences))
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(data))
    output = tmp_path / "t5_prompt_adapted"
    tta_main([str(artifact), str(tmp_path / "data.yaml"), "--output", str(output), "--batch-size", "4", "--lr", "1e-2",
              "--steps", "3"])  # fmt: skip
    before, after = load_file(artifact / "model.safetensors"), load_file(output / "model.safetensors")
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert all(".router." in key for key in changed)
    for index in range(len(model.decoder.block)):
        assert any(key.startswith(f"decoder.block.{index}.layer.2.router.") for key in changed), index
