"""`wemoe-convert` with `architecture: t5`: checkpoints on disk (a full fine-tune and a LoRA adapter) to an artifact."""

import copy
import subprocess

import pytest
import torch
from huggingface_hub import ModelCard
from peft import LoraConfig, get_peft_model
from test_convert import console_script
from test_t5 import PROMPTS, build_family
from toy_t5 import toy_t5_tokenizer
from transformers import AutoModelForSeq2SeqLM

from wemoe import convert, merge_t5
from wemoe.recipe import RecipeError


@pytest.fixture(scope="module")
def t5_checkpoints(tmp_path_factory):
    """A Flan-style base with its tokenizer, two full fine-tunes and one LoRA adapter, saved as directories."""
    base, experts = build_family(gated=True, tied=False)
    root = tmp_path_factory.mktemp("t5_checkpoints")
    base.save_pretrained(root / "base")
    toy_t5_tokenizer().save_pretrained(root / "base")
    paths = {"base": str(root / "base")}
    for task in ("sst2", "topic"):
        experts[task].save_pretrained(root / task)
        paths[task] = str(root / task)
    adapter = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=2, target_modules=["wi_0", "wo"], init_lora_weights=False)
    )
    adapter.save_pretrained(root / "nli")
    paths["nli"] = str(root / "nli")
    return paths


def t5_recipe(paths: dict) -> dict:
    return {
        "base_model": paths["base"],
        "architecture": "t5",
        "variant": "e-wemoe",
        "keep": 0.5,
        "tasks": [
            {"name": "sst2", "model": paths["sst2"], "classnames": ["negative", "positive"]},
            {"name": "topic", "model": paths["topic"]},
            {"name": "nli", "model": paths["nli"], "classnames": ["entailment", "neutral", "contradiction"]},
        ],
    }


def test_convert_writes_a_t5_artifact_equal_to_merge_t5(t5_checkpoints, tmp_path):
    recipe = t5_recipe(t5_checkpoints)
    artifact = convert(recipe, tmp_path / "t5_artifact")  # apart from CLIP artifacts: see test_t5_tta
    loaded = AutoModelForSeq2SeqLM.from_pretrained(artifact, trust_remote_code=True)
    in_memory = merge_t5(
        t5_checkpoints["base"],
        {task: t5_checkpoints[task] for task in ("sst2", "topic", "nli")},
        variant="e-wemoe",
        keep=0.5,
        classnames={"sst2": ["negative", "positive"], "nli": ["entailment", "neutral", "contradiction"]},
    )
    assert loaded.config.task_labels == in_memory.config.task_labels
    inputs = toy_t5_tokenizer()(PROMPTS, return_tensors="pt", padding=True)
    decoder_input_ids = torch.zeros(len(PROMPTS), 1, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(**inputs, decoder_input_ids=decoder_input_ids).logits,
            in_memory(**inputs, decoder_input_ids=decoder_input_ids).logits,
            atol=1e-6,
            rtol=0,
        )
    card = ModelCard.load(artifact / "README.md")
    assert card.data.pipeline_tag == "text2text-generation" and "t5" in card.data.tags
    assert "| sst2 | negative, positive |" in card.text and "| topic | - |" in card.text
    assert (artifact / "tokenizer.json").is_file() and (artifact / "pipeline_wemoe.py").is_file()


def test_cli_converts_a_t5_recipe(t5_checkpoints, tmp_path):
    import yaml

    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(t5_recipe(t5_checkpoints)))
    completed = subprocess.run(
        [*console_script(), str(tmp_path / "recipe.yaml"), str(tmp_path / "out")], capture_output=True, text=True
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r["tasks"][0].update(templates=["a {}"]), r"tasks.0 \(sst2\): `templates` build CLIP zero-shot"),
        (lambda r: r.update(architecture="gpt2"), r"architecture: Value error, unknown architecture 'gpt2'"),
        (
            lambda r: r.update(architecture="clip"),
            r"tasks.1 \(topic\): a CLIP task needs `classnames` or a `dataset`",
        ),
    ],
    ids=["templates", "architecture", "clip-needs-classes"],
)
def test_recipe_errors_name_the_task(t5_checkpoints, tmp_path, change, message):
    recipe = t5_recipe(t5_checkpoints)
    change(recipe)
    with pytest.raises(RecipeError, match=message):
        convert(recipe, tmp_path / "never")
    assert not (tmp_path / "never").exists()
