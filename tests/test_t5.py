"""merge_t5 and WEMoEForConditionalGeneration against plain-T5 references: task arithmetic at init, exact
per-sample (encoder) and per-token (decoder) routing, padding and batch invariance, generation with the cache."""

import json

import pytest
import torch
from fresh_process import T5_FRESH_PROCESS_SCRIPT, run_in_fresh_process
from reference import randomize_routers
from reference_t5 import per_sample_reference_logits, task_arithmetic_t5
from toy_t5 import build_toy_t5_base, build_toy_t5_expert, toy_t5_tokenizer

from wemoe import merge_t5, save_artifact

TASKS = ("sst2", "topic", "nli")
PROMPTS = [
    "sst2 sentence: a really good movie , i loved it !",
    "topic question: the team lost the match",
    "nli premise: the cell is an atom . hypothesis: it is not",
    "sst2 sentence: boring",
]


def build_family(gated: bool, tied: bool):
    base = build_toy_t5_base(seed=0, gated=gated, tied=tied)
    return base, {task: build_toy_t5_expert(base, seed=i + 1) for i, task in enumerate(TASKS)}


@pytest.fixture(scope="module", params=[(True, False), (False, True)], ids=["flan-gated-untied", "t5-relu-tied"])
def family(request):
    return build_family(*request.param)


@pytest.fixture(scope="module")
def tokenizer():
    return toy_t5_tokenizer()


@pytest.fixture(scope="module")
def batch(tokenizer):
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    decoder_input_ids = torch.tensor([[0, 5, 7, 9], [0, 11, 13, 1], [0, 20, 21, 22], [0, 30, 1, 0]])
    return inputs["input_ids"], inputs["attention_mask"], decoder_input_ids


@pytest.mark.parametrize(
    "options",
    [
        {"variant": "wemoe"},
        {"variant": "wemoe", "router": {"hidden_layers": 1, "granularity": "token"}},
        {"variant": "e-wemoe", "keep": 1.0},
        {"variant": "wemoe", "upscale": ["mlp", "attention"]},
        {"variant": "e-wemoe", "keep": 1.0, "upscale": ["attention"], "router": {"decoder_routing": "prompt"}},
    ],
    ids=["wemoe", "depth1-token", "e-wemoe-keep-all", "mlp+attention", "e-wemoe-attention-prompt"],
)
def test_fresh_merge_equals_task_arithmetic(family, batch, options):
    base, experts = family
    input_ids, attention_mask, decoder_input_ids = batch
    options = {**options, "router": {**options.get("router", {}), "init_lambda": 0.25}}
    model = merge_t5(base, experts, static_merge={"method": "task_arithmetic", "scaling": 0.25}, **options)
    reference = task_arithmetic_t5(base, experts, scaling=0.25)
    with torch.no_grad():
        output = model(input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids)
        expected = reference(input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids)
    real = attention_mask.bool()
    torch.testing.assert_close(
        output.encoder_last_hidden_state[real], expected.encoder_last_hidden_state[real], atol=1e-5, rtol=0
    )
    torch.testing.assert_close(output.logits, expected.logits, atol=1e-5, rtol=0)


def test_lm_head_tying_follows_the_base(family):
    base, experts = family
    model = merge_t5(base, experts)
    base_tied = base.lm_head.weight.data_ptr() == base.shared.weight.data_ptr()
    assert model.config.tie_word_embeddings == base_tied
    assert (model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr()) == base_tied
    assert model.config.text_config.scale_decoder_outputs == base.config.scale_decoder_outputs


@pytest.mark.parametrize(
    "options", [{"variant": "wemoe"}, {"variant": "e-wemoe", "keep": 1.0}], ids=["wemoe", "e-wemoe"]
)
def test_routing_matches_a_reference_that_merges_feed_forward_weights_per_sample_and_token(family, batch, options):
    base, experts = family
    input_ids, attention_mask, decoder_input_ids = batch
    model = merge_t5(base, experts, **options)
    randomize_routers(model)
    with torch.no_grad():
        output = model(
            input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids, output_routing_weights=True
        )
    encoder_routing = torch.stack(output.encoder_routing_weights)  # (layers, batch, experts)
    assert encoder_routing.std(dim=1).amax(dim=-1).min() > 1e-2, "routing must differ between samples"
    assert output.decoder_routing_weights[0].shape == (*decoder_input_ids.shape, len(TASKS))
    expected = per_sample_reference_logits(model, base, experts, input_ids, decoder_input_ids)
    torch.testing.assert_close(output.logits, expected, atol=1e-5, rtol=0)


def alone_and_padded_in_a_batch(model, tokenizer, atol: float = 1e-5):
    """The inputs and outputs (routing weights included) for the last prompt alone, and for it padded in a batch of
    all the prompts; the logits must agree (a padding or batch-mate leak moves them by about 3)."""
    alone = tokenizer(PROMPTS[3:], return_tensors="pt")
    padded = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert padded["attention_mask"][3].sum() < padded["attention_mask"].shape[1], "the sample must be padded"
    decoder_input_ids = torch.tensor([[0, 5, 7]])
    with torch.no_grad():
        single = model(**alone, decoder_input_ids=decoder_input_ids, output_routing_weights=True)
        in_batch = model(**padded, decoder_input_ids=decoder_input_ids.expand(4, -1), output_routing_weights=True)
    torch.testing.assert_close(in_batch.logits[3], single.logits[0], atol=atol, rtol=0)
    return (alone, single), (padded, in_batch)


def test_padding_and_batch_mates_do_not_change_a_sample(family, tokenizer):
    base, experts = family
    model = merge_t5(base, experts)
    randomize_routers(model)
    (_, single), (_, in_batch) = alone_and_padded_in_a_batch(model, tokenizer)
    for batched, solo in zip(in_batch.encoder_routing_weights, single.encoder_routing_weights, strict=True):
        torch.testing.assert_close(batched[3], solo[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "options",
    [{"variant": "wemoe"}, {"variant": "e-wemoe"}, {"variant": "wemoe", "upscale": ["mlp", "attention"]}],
    ids=["wemoe", "e-wemoe", "mlp+attention"],
)
def test_generate_is_the_same_with_and_without_the_cache_and_alone_or_batched(family, tokenizer, options):
    base, experts = family
    model = merge_t5(base, experts, **options)
    randomize_routers(model, std=1.0)
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    options = {"max_new_tokens": 8, "do_sample": False, "min_new_tokens": 8}
    with_cache = model.generate(**inputs, use_cache=True, **options)
    without_cache = model.generate(**inputs, use_cache=False, **options)
    assert torch.equal(with_cache, without_cache)
    assert len(set(map(tuple, with_cache.tolist()))) > 1, "outputs must differ for the comparison to mean anything"
    for i, prompt in enumerate(PROMPTS):
        alone = model.generate(**tokenizer([prompt], return_tensors="pt"), **options)
        assert torch.equal(alone[0], with_cache[i])


def test_beam_search_runs_and_agrees_with_and_without_the_cache(family, tokenizer):
    base, experts = family
    model = merge_t5(base, experts)
    randomize_routers(model, std=0.3)
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    options = {"max_new_tokens": 6, "num_beams": 3, "num_return_sequences": 2, "do_sample": False}
    with_cache = model.generate(**inputs, **options)
    assert with_cache.shape[0] == 2 * len(PROMPTS)
    assert torch.equal(with_cache, model.generate(**inputs, use_cache=False, **options))


@pytest.mark.filterwarnings("error::FutureWarning", "error::DeprecationWarning")
def test_generation_warns_of_nothing_deprecated(family, tokenizer):
    """The shipped code must not lean on anything transformers has deprecated: it would break on removal."""
    base, experts = family
    model = merge_t5(base, experts, variant="e-wemoe")
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    model.generate(**inputs, max_new_tokens=4, do_sample=False)
    model.generate(**inputs, max_new_tokens=4, num_beams=2, do_sample=False)


def test_labels_give_a_loss_and_gradients_reach_only_the_routers(family, batch):
    base, experts = family
    input_ids, attention_mask, decoder_input_ids = batch
    model = merge_t5(base, experts, variant="e-wemoe")
    labels = decoder_input_ids.clone()
    labels[labels == 0] = -100
    loss = model(input_ids, attention_mask=attention_mask, labels=labels).loss
    loss.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(name.startswith("router.") for name in with_grad)
    assert {name for name, p in model.named_parameters() if p.requires_grad} == with_grad


@pytest.mark.parametrize(
    ("gated", "tied", "variant"),
    [(True, False, "wemoe"), (True, False, "e-wemoe"), (False, True, "wemoe")],
    ids=["flan-wemoe", "flan-e-wemoe", "t5-tied-wemoe"],
)
def test_round_trip_and_text2text_pipeline_in_a_process_without_this_repository(
    tokenizer, tmp_path, gated, tied, variant
):
    base, experts = build_family(gated=gated, tied=tied)
    model = merge_t5(base, experts, variant=variant)
    randomize_routers(model, std=1.0)
    artifact = save_artifact(model, tmp_path / "artifact", tokenizer)
    config = json.loads((artifact / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForSeq2SeqLM"}
    assert "text2text-generation" in config["custom_pipelines"]
    assert {"modeling_wemoe.py", "configuration_wemoe.py", "pipeline_wemoe.py", "tokenizer.json"} <= {
        p.name for p in artifact.iterdir()
    }
    decoder_input_ids = torch.tensor([[0, 5, 7], [0, 11, 13], [0, 20, 21], [0, 30, 1]])
    inputs = {"prompts": PROMPTS, "decoder_input_ids": decoder_input_ids}

    results = run_in_fresh_process(artifact, inputs, tmp_path, T5_FRESH_PROCESS_SCRIPT)

    encoded = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**encoded, decoder_input_ids=decoder_input_ids).logits
    generated = model.generate(**encoded, max_new_tokens=5, num_beams=2)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    for auto_class in ("AutoModel", "AutoModelForSeq2SeqLM"):
        loaded = results[auto_class]
        assert loaded["missing"] == [] and loaded["unexpected"] == []
        assert loaded["trainable"] == trainable
        torch.testing.assert_close(torch.tensor(loaded["logits"]), expected, atol=1e-6, rtol=0)
        assert loaded["generated"] == generated.tolist()
    expected_text = tokenizer.decode(generated[0], skip_special_tokens=True).strip()
    assert results["pipeline"] == [{"generated_text": expected_text}] and expected_text
