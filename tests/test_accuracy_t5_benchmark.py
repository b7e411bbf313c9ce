"""The T5 accuracy benchmark's pipeline at CI size (`--tiny`): the real corpora, a trained tokenizer, span-corruption
pre-training, full and LoRA fine-tunes saved as ordinary checkpoints and adapters, then wemoe-convert / wemoe-tta /
wemoe-eval for every method and the table. It checks that every stage runs and produces what the next one reads, not
the accuracy.

It needs Debian's `fortunes` and `wordnet-base` (`.ci/run` installs them) and PyPI for the VADER sdist; outside CI a
machine without the Debian packages skips it."""

import json
import os

import numpy as np
import pytest
from test_accuracy_benchmark import load_script
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, T5ForConditionalGeneration

from wemoe.backbones.t5 import generated_answers
from wemoe.data import load_data_config, load_task_dataset

benchmark = load_script("accuracy_t5")
missing = [str(path) for path in (benchmark.WORDNET_NOUNS,) if not path.exists()]
if not any(directory.is_dir() for directory in benchmark.FORTUNE_DIRS):
    missing.append(str(benchmark.FORTUNE_DIRS[0]))
if missing and os.environ.get("CI") != "true":
    pytest.skip(f"Debian's fortunes / wordnet-base are not installed ({missing})", allow_module_level=True)


def test_span_corruption_hides_spans_behind_sentinels_and_the_target_restores_them():
    ids, sentinels = list(range(100, 148)), list(range(3, 35))
    inputs, targets = benchmark.span_corruption(ids, sentinels, np.random.default_rng(0))
    assert inputs[-1] == targets[-1] == 1  # </s>
    used = [token for token in inputs if token in sentinels]
    assert used == sentinels[: len(used)] and [t for t in targets if t in sentinels] == used
    # Putting each hidden span back in place of its sentinel gives the original tokens.
    spans, current = {}, None
    for token in targets[:-1]:
        current = token if token in sentinels else current
        spans.setdefault(current, []).extend([] if token in sentinels else [token])
    restored = [piece for token in inputs[:-1] for piece in (spans[token] if token in sentinels else [token])]
    assert restored == ids
    assert 0.1 <= sum(len(span) for span in spans.values()) / len(ids) <= 0.2


def test_tiny_benchmark_runs_every_method_end_to_end(tmp_path):
    cache, results_dir = tmp_path / "cache", tmp_path / "results"
    results = benchmark.main(["--tiny", "--cache", str(cache), "--results", str(results_dir)])

    assert list(results) == benchmark.SCORED_AS_THEY_ARE + list(benchmark.METHODS)
    for method, result in results.items():
        assert set(result["scores"]) == set(benchmark.TASKS) | {"average"}, method
        assert all(0.0 <= score <= 1.0 for score in result["scores"].values()), method
    # Full fine-tunes are ordinary T5 checkpoints that moved; LoRA fine-tunes are PEFT adapters over the base.
    base = T5ForConditionalGeneration.from_pretrained(cache / "checkpoints" / "base")
    movies = T5ForConditionalGeneration.from_pretrained(cache / "checkpoints" / "full" / "movies")
    assert any((a != b).any() for a, b in zip(base.parameters(), movies.parameters(), strict=True))
    adapter = json.loads((cache / "checkpoints" / "lora" / "movies" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(cache / "checkpoints" / "base") and adapter["r"] == 16
    # The label words are single tokens, so the first decoding step chooses the answer.
    tokenizer = AutoTokenizer.from_pretrained(cache / "checkpoints" / "base")
    for word in benchmark.WORDNET_CATEGORIES + list(benchmark.FORTUNE_TOPICS.values()):
        assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1, word
    # WEMoE rows were adapted; static rows were not; the LoRA row kept the adapters' low-rank factors.
    assert (cache / "models" / "wemoe_tta" / "config.json").is_file()
    assert not (cache / "models" / "task_arithmetic_tta").exists()
    lora_config = json.loads((cache / "models" / "wemoe__lora_experts__r_16" / "config.json").read_text())
    assert (lora_config["expert_format"], lora_config["rank"]) == ("lowrank", 16)
    table = (results_dir / "accuracy_t5.md").read_text()
    assert all(method in table for method in results)
    assert json.loads((results_dir / "accuracy_t5.json").read_text()).keys() == results.keys()

    # A sample's answer does not depend on its batch (batched generation with the KV cache, padding excluded).
    model = AutoModelForSeq2SeqLM.from_pretrained(cache / "models" / "wemoe_tta", trust_remote_code=True).eval()
    spec = load_data_config(cache / "data.yaml").tasks["fortunes"]
    dataset = load_task_dataset("fortunes", spec, input_kind="text")
    alone = generated_answers(model, tokenizer, dataset, spec, batch_size=1, max_new_tokens=4)
    assert generated_answers(model, tokenizer, dataset, spec, batch_size=5, max_new_tokens=4) == alone

    # Neither pre-training nor instruction tuning sees a test text, whichever task's corpus it comes from.
    tasks, instruction = benchmark.load_tasks(cache / "downloads")
    splits = benchmark.split_tasks(tasks, benchmark.TINY, seed=0)
    held_out = benchmark.texts_in_test_splits(tasks, splits)
    assert set(dataset["text"]) <= held_out
    assert held_out.isdisjoint(benchmark.pretraining_texts({**tasks, **instruction}, splits, 10**9, seed=0))
    examples = benchmark.instruction_examples(instruction, held_out, 10**6, seed=0)
    assert all(instruction[name].texts[i] not in held_out for name, indices in examples.items() for i in indices)
    # The instruction tasks share no label word with the benchmark's.
    benchmark_words = {word for task in tasks.values() for word in task.label_words}
    assert all(benchmark_words.isdisjoint(task.label_words) for task in instruction.values())

    # A second run reuses every cached stage and gives the same table.
    again = benchmark.main(["--tiny", "--cache", str(cache), "--results", str(results_dir)])
    assert {m: r["scores"] for m, r in again.items()} == {m: r["scores"] for m, r in results.items()}
