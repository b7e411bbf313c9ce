"""`upscale`: which module groups become weight-ensembled experts (the MLPs, the paper's choice; attention; both).

Routing one-hot to a task's expert must give exactly that expert's upscaled modules with the static merge for the
rest, in every family; artifacts keep the choice through save and load (config, card, dry run); bad values are
refused before anything is built. Task arithmetic at init, per-sample independence and the KV cache are checked in
each family's own tests (`test_merge_clip.py`, `test_bert.py`, `test_t5.py`), parametrized over `upscale`."""

import copy
import re

import pytest
import torch
import yaml
from huggingface_hub.errors import StrictDataclassError
from reference import randomize_routers, task_arithmetic_tower, vision_tower
from reference_t5 import task_arithmetic_t5
from toy_bert import TASK_LABELS, build_toy_bert_base, build_toy_bert_expert, toy_bert_tokenizer
from toy_t5 import build_toy_t5_base, build_toy_t5_expert, toy_t5_tokenizer
from transformers import AutoModel

from modeling_wemoe import WEMoEConfig
from modeling_wemoe.modeling_wemoe import WEMoELinear
from wemoe import convert, merge_bert, merge_clip, merge_t5
from wemoe.convert import plan_conversion
from wemoe.recipe import RecipeError, load_recipe

SCALING = 0.3
BOTH = ["mlp", "attention"]
# The upscaled linears of each family, by parameter name.
UPSCALED = {
    "clip": {"mlp": r"\.mlp\.fc[12]\.", "attention": r"\.self_attn\.(q|k|v|out)_proj\."},
    "t5": {"mlp": r"\.DenseReluDense\.", "attention": r"\.(SelfAttention|EncDecAttention)\.[qkvo]\.weight$"},
    "bert": {"mlp": r"\.layer\.\d+\.(intermediate|output)\.dense\.",
             "attention": r"\.attention\.(self\.(query|key|value)|output\.dense)\."},
}  # fmt: skip


def set_one_hot_routing(model, expert: int) -> None:
    """Every router (depth 0: one learned vector) gives weight 1 to `expert`, 0 to the others."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                assert name.endswith("router.weight"), name
                parameter.copy_(torch.nn.functional.one_hot(torch.tensor(expert), parameter.numel()).float())


@torch.no_grad()
def with_expert_modules(merged: torch.nn.Module, expert_state: dict, family: str, groups: list[str]) -> torch.nn.Module:
    """`merged` (a plain model, task arithmetic everywhere) with the expert's tensors in the upscaled groups."""
    model = copy.deepcopy(merged)
    pattern = re.compile("|".join(UPSCALED[family][group] for group in groups))
    replaced = 0
    for key, parameter in model.named_parameters():
        if pattern.search("." + key):
            parameter.copy_(expert_state[key])
            replaced += 1
    assert replaced, "the reference must take some of the expert's tensors"
    return model


def count_upscaled(model) -> int:
    # By name: a model loaded with trust_remote_code has the artifact's own copy of the class.
    return sum(type(module).__name__ == WEMoELinear.__name__ for module in model.modules())


@pytest.mark.parametrize("groups", [BOTH, ["attention"]], ids=["mlp+attention", "attention"])
def test_clip_one_hot_routing_gives_the_expert_s_upscaled_modules(
    base, experts, classnames, tokenizer, pixel_values, groups
):
    model = merge_clip(base, experts, classnames, tokenizer=tokenizer, upscale=groups, router={"hidden_layers": 0})
    layers = base.config.vision_config.num_hidden_layers
    assert count_upscaled(model) == layers * (2 * ("mlp" in groups) + 4 * ("attention" in groups))
    merged = task_arithmetic_tower(base, experts, scaling=SCALING)
    for index, task in enumerate(classnames):
        set_one_hot_routing(model, index)
        expected = with_expert_modules(merged, vision_tower(experts[task]).state_dict(), "clip", groups)
        with torch.no_grad():
            hidden = model(pixel_values, output_hidden_states=True).hidden_states[-1]
            torch.testing.assert_close(hidden, expected(pixel_values).last_hidden_state, atol=1e-5, rtol=0)


@pytest.mark.parametrize("decoder_routing", ["token", "prompt"])
def test_t5_one_hot_routing_gives_the_expert_s_self_and_cross_attention_and_feed_forward(decoder_routing):
    base = build_toy_t5_base(num_decoder_layers=2)
    experts = {task: build_toy_t5_expert(base, seed=i + 1) for i, task in enumerate(["sst2", "topic", "nli"])}
    router = {"hidden_layers": 0, "decoder_routing": decoder_routing}
    model = merge_t5(base, experts, upscale=BOTH, router=router)
    encoder, decoder = base.config.num_layers, base.config.num_decoder_layers
    assert count_upscaled(model) == encoder * (3 + 4) + decoder * (3 + 8)  # gated feed-forward; self (+ cross)
    tokenizer = toy_t5_tokenizer()
    inputs = tokenizer(["sst2 sentence : a good movie", "the ball"], return_tensors="pt", padding=True)
    decoder_input_ids = torch.tensor([[0, 5, 7], [0, 9, 11]])
    merged = task_arithmetic_t5(base, experts, scaling=SCALING)
    for index, expert in enumerate(experts.values()):
        set_one_hot_routing(model, index)
        expected = with_expert_modules(merged, expert.state_dict(), "t5", BOTH)
        with torch.no_grad():
            logits = model(**inputs, decoder_input_ids=decoder_input_ids).logits
            torch.testing.assert_close(logits, expected(**inputs, decoder_input_ids=decoder_input_ids).logits)
            generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)  # the KV cache's path too
            assert torch.equal(generated, expected.generate(**inputs, max_new_tokens=4, do_sample=False))


def test_bert_one_hot_routing_gives_the_expert_s_attention_and_feed_forward():
    base = build_toy_bert_base(seed=0)
    experts = {task: build_toy_bert_expert(base, task, seed=i + 1) for i, task in enumerate(TASK_LABELS)}
    model = merge_bert(base, experts, upscale=BOTH, router={"hidden_layers": 0})
    batch = toy_bert_tokenizer()(["a good movie", "the ball was lost"], return_tensors="pt", padding=True)
    for index, (task, expert) in enumerate(experts.items()):
        set_one_hot_routing(model, index)
        merged = copy.deepcopy(expert)  # the task's own head, every encoder tensor task arithmetic
        with torch.no_grad():
            for key, parameter in merged.bert.named_parameters():
                if not key.startswith("pooler."):
                    stacked = torch.stack([e.bert.state_dict()[key] - base.state_dict()[key] for e in experts.values()])
                    parameter.copy_(base.state_dict()[key] + SCALING * stacked.sum(0))
            merged.bert = with_expert_modules(merged.bert, expert.bert.state_dict(), "bert", BOTH)
            torch.testing.assert_close(model(**batch, task=task).logits, merged(**batch).logits, atol=1e-5, rtol=0)


def test_the_choice_survives_save_load_and_shows_in_card_and_plan(
    saved_checkpoints, classnames, pixel_values, tmp_path
):
    recipe = {
        "base_model": saved_checkpoints["base"],
        "variant": "e-wemoe",
        "keep": 0.5,
        "upscale": BOTH,
        "tasks": [{"name": t, "model": saved_checkpoints[t], "classnames": n} for t, n in classnames.items()],
    }
    assert "attention" in str(plan_conversion(recipe))
    artifact = convert(recipe, tmp_path / "upscaled")
    config = yaml.safe_load((artifact / "merge_config.yaml").read_text())
    assert config["upscale"] == BOTH
    assert WEMoEConfig.from_pretrained(artifact).upscale == BOTH
    card = " ".join((artifact / "README.md").read_text().split())
    assert "norms and embeddings are merged once" in card and "every MLP and attention block is" in card
    loaded = AutoModel.from_pretrained(artifact, trust_remote_code=True)
    assert count_upscaled(loaded) == 6 * base_layers(loaded)
    randomize_routers(loaded)
    loaded.save_pretrained(tmp_path / "saved")
    again = AutoModel.from_pretrained(tmp_path / "saved", trust_remote_code=True)
    assert again.config.upscale == BOTH
    with torch.no_grad():
        torch.testing.assert_close(again(pixel_values).logits, loaded(pixel_values).logits, atol=0, rtol=0)


def base_layers(model) -> int:
    return model.config.vision_config.num_hidden_layers


@pytest.mark.parametrize(
    "upscale, message",
    [
        (["feed_forward"], "upscale.0: Input should be 'mlp' or 'attention'"),
        ([], "upscale: List should have at least 1 item"),
        (["mlp", "mlp"], "each module group at most once"),
        ("attention", "upscale: Input should be a valid list"),
    ],
)
def test_bad_upscale_values_are_refused_by_the_recipe(saved_checkpoints, classnames, upscale, message):
    recipe = {
        "base_model": saved_checkpoints["base"],
        "upscale": upscale,
        "tasks": [{"name": t, "model": saved_checkpoints[t], "classnames": n} for t, n in classnames.items()],
    }
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe(recipe)
    with pytest.raises(RecipeError, match="variant: static merges every tensor once"):
        load_recipe({**recipe, "upscale": ["attention"], "variant": "static"})


@pytest.mark.parametrize("upscale", [["ffn"], [], ["attention", "attention"]])
def test_bad_upscale_values_are_refused_by_the_config(upscale):
    with pytest.raises(
        StrictDataclassError, match=r"`upscale` must list one or more of \['mlp', 'attention'\], each once"
    ):
        WEMoEConfig(text_config={"model_type": "t5"}, tasks=["a"], upscale=upscale)
