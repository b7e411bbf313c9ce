"""`variant: static` for T5: a plain T5ForConditionalGeneration merged by task arithmetic or layer-wise AdaMerging."""

import torch
import yaml
from test_t5 import PROMPTS
from test_t5_convert import t5_checkpoints, t5_recipe  # noqa: F401 (a fixture and the recipe it fills)
from test_t5_tta import text_data  # noqa: F401 (fixture)
from test_tta import streams_entropy
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, T5ForConditionalGeneration

from wemoe import convert
from wemoe.adaptation import task_streams
from wemoe.backbones import get_backbone
from wemoe.data import load_task_datasets


def static_t5_recipe(paths: dict, static_merge: dict) -> dict:
    return t5_recipe(paths) | {"variant": "static", "static_merge": static_merge}


def first_step_logits(model, tokenizer) -> torch.Tensor:
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**inputs, decoder_input_ids=torch.zeros(len(PROMPTS), 1, dtype=torch.long)).logits


def test_task_arithmetic_t5_equals_a_wemoe_t5_before_adaptation(t5_checkpoints, tmp_path):  # noqa: F811
    static = convert(
        static_t5_recipe(t5_checkpoints, {"method": "task_arithmetic", "scaling": 0.3}), tmp_path / "t5_static"
    )
    wemoe = convert(t5_recipe(t5_checkpoints) | {"variant": "wemoe"}, tmp_path / "t5_wemoe_init")
    tokenizer = AutoTokenizer.from_pretrained(static)
    plain = AutoModelForSeq2SeqLM.from_pretrained(static)
    assert type(plain) is T5ForConditionalGeneration
    torch.testing.assert_close(
        first_step_logits(plain, tokenizer),
        first_step_logits(AutoModelForSeq2SeqLM.from_pretrained(wemoe, trust_remote_code=True), tokenizer),
        atol=1e-5,
        rtol=0,
    )


def test_adamerging_t5_lowers_the_first_token_entropy(t5_checkpoints, text_data, tmp_path):  # noqa: F811
    data_yaml = tmp_path / "data.yaml"
    data_yaml.write_text(yaml.safe_dump(text_data))
    options = {"method": "adamerging", "data": str(data_yaml), "steps": 15, "lr": 0.05, "batch_size": 4}
    adamerged = convert(static_t5_recipe(t5_checkpoints, options), tmp_path / "t5_adamerging")
    ta = convert(static_t5_recipe(t5_checkpoints, {"method": "task_arithmetic", "scaling": 0.3}), tmp_path / "t5_ta")
    tokenizer = AutoTokenizer.from_pretrained(ta)
    label_words = {"sst2": ["negative", "positive"], "nli": ["entailment", "neutral", "contradiction"]}
    datasets = load_task_datasets(text_data, ["sst2", "topic", "nli"], "text")
    streams = task_streams(get_backbone("t5"), datasets, tokenizer, 4, label_words)

    def mean_entropy(model_dir) -> float:
        return streams_entropy(AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval(), streams, steps=3)

    assert mean_entropy(adamerged) < mean_entropy(ta)
