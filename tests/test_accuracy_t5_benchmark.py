"""The T5 accuracy benchmark's pipeline at CI size (`--tiny`): two real tasks from Debian files written as a tasks
file, a trained tokenizer, span-corruption pre-training and instruction tuning, full fine-tunes saved as ordinary
checkpoints, lambda chosen on validation, then wemoe-convert / wemoe-tta / wemoe-eval for every row, the oracle and
rest-objective rows and the diagnostics. It checks that every stage runs and produces what the next one reads, not the
accuracy.

It needs Debian's `fortunes`, `wordnet-base` and `unicode-data` (`.ci/run` installs them); outside CI a machine
without them skips it."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from test_accuracy_benchmark import check_task_routing_and_recommendation, load_script
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, T5ForConditionalGeneration

from wemoe.backbones.t5 import generated_answers
from wemoe.data import load_data_config, load_task_dataset

benchmark = load_script("accuracy_t5")
NEEDED = [benchmark.WORDNET_NOUNS, Path("/usr/share/unicode/emoji/emoji-test.txt")]
missing = [str(path) for path in NEEDED if not path.exists()]
if not any(directory.is_dir() for directory in benchmark.FORTUNE_DIRS):
    missing.append(str(benchmark.FORTUNE_DIRS[0]))
if missing and os.environ.get("CI") != "true":
    pytest.skip(
        f"Debian's fortunes / wordnet-base / unicode-data are not installed ({missing})", allow_module_level=True
    )


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


def test_tiny_benchmark_runs_every_row_and_diagnostic_end_to_end(tmp_path):
    cache, results_dir = tmp_path / "cache", tmp_path / "results"
    run = benchmark.main(["--tiny", "--cache", str(cache), "--results", str(results_dir)])
    results, names = run["results"], benchmark.TINY_TASKS

    rows = ["pre-trained", "individual fine-tunes", *benchmark.methods(run["lambda"]["lambda"]),
            *benchmark.ORACLE_ROWS]
    assert list(results) == rows
    for method, result in results.items():
        assert set(result["scores"]) == {*names, "average"}, method
        assert all(0.0 <= score <= 1.0 for score in result["scores"].values()), method
    # Lambda was chosen among 0.1 ... 1.0 on validation; every expert was checked on validation.
    assert sorted(map(float, run["lambda"]["validation_averages"])) == benchmark.LAMBDAS
    assert set(run["experts"]) == set(names) and all(0 < e["majority"] <= 1 for e in run["experts"].values())
    # The tasks file names three splits per task, with the label words as ClassLabel names.
    tasks = benchmark.load_validated(benchmark.TasksFile, cache / "tasks.yaml", "tasks file")
    assert benchmark.class_names("wordnet_nouns", tasks.tasks["wordnet_nouns"])[0] == "animal"
    # Full fine-tunes are ordinary T5 checkpoints that moved.
    base = T5ForConditionalGeneration.from_pretrained(cache / "checkpoints" / "base")
    expert = T5ForConditionalGeneration.from_pretrained(cache / "checkpoints" / "full" / "emoji_groups")
    assert any((a != b).any() for a, b in zip(base.parameters(), expert.parameters(), strict=True))
    # The label words are single tokens, so the first decoding step chooses the answer.
    tokenizer = AutoTokenizer.from_pretrained(cache / "checkpoints" / "base")
    for name in names:
        for word in benchmark.T5_TASKS[name][0]:
            assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1, word
    # The paper's rows were adapted at its rate by entropy, the task-routing rows by task routing at the settings
    # chosen on validation (the per-prompt rows with the decoder routed per prompt); static rows were not adapted.
    record = (cache / "models" / "wemoe_tta" / "merge_config.yaml").read_text()
    assert "objective: label-words" in record and "lr: 0.0001" in record
    check_task_routing_and_recommendation(benchmark, cache, results_dir, results, "accuracy_t5")
    per_prompt_row = benchmark.method_slug("WEMoE, task routing, decoder routed per prompt")
    record = (cache / "models" / f"{per_prompt_row}_tta" / "merge_config.yaml").read_text()
    assert "decoder_routing: prompt" in record and "objective: task-routing" in record
    assert not (cache / "models" / "ties_tta").exists()
    # The diagnostics: routing per encoder layer before and after, curves, and the plots.
    report = run["diagnostics"]
    assert len(report["WEMoE"]["routing_accuracy_before"]["emoji_groups"]) == benchmark.TINY.layers
    # Routed per prompt, the decoder's layers route each sample as a whole too: they follow the encoder's.
    per_prompt = report["WEMoE, task routing, decoder routed per prompt"]["routing_accuracy_after"]["emoji_groups"]
    assert len(per_prompt) == 2 * benchmark.TINY.layers
    assert report["WEMoE"]["curve"][0]["step"] == 0 and report["WEMoE"]["curve"][-1]["step"] == benchmark.TINY.tta_steps
    for stem in ("adaptation", "task_vector_norms", "routing_wemoe"):
        assert (results_dir / f"accuracy_t5_{stem}.png").is_file(), stem
    table = (results_dir / "accuracy_t5.md").read_text()
    assert all(method in table for method in results)
    assert json.loads((results_dir / "accuracy_t5.json").read_text()).keys() == results.keys()

    # A sample's answer does not depend on its batch (batched generation with the KV cache, padding excluded).
    model = AutoModelForSeq2SeqLM.from_pretrained(cache / "models" / "wemoe_tta", trust_remote_code=True).eval()
    spec = load_data_config(cache / "data.yaml").tasks["emoji_groups"]
    dataset = load_task_dataset("emoji_groups", spec, input_kind="text")
    alone = generated_answers(model, tokenizer, dataset, spec, batch_size=1, max_new_tokens=4)
    assert generated_answers(model, tokenizer, dataset, spec, batch_size=5, max_new_tokens=4) == alone

    # Neither pre-training nor instruction tuning sees a test text.
    instruction = benchmark.load_instruction_tasks()
    held_out = benchmark.texts_in_test_splits(tasks)
    assert set(dataset["text"]) <= held_out
    assert held_out.isdisjoint(benchmark.pretraining_texts(tasks, instruction, 10**9, seed=0))
    examples = benchmark.instruction_examples(instruction, held_out, 10**6, seed=0)
    assert all(instruction[name].texts[i] not in held_out for name, indices in examples.items() for i in indices)
    # The instruction tasks share no label word with the benchmark's.
    benchmark_words = {word for words, _ in benchmark.T5_TASKS.values() for word in words}
    assert all(benchmark_words.isdisjoint(task.label_words) for task in instruction.values())

    # A second run reuses every cached stage and gives the same table.
    again = benchmark.main(["--tiny", "--cache", str(cache), "--results", str(results_dir)])
    assert {m: r["scores"] for m, r in again["results"].items()} == {m: r["scores"] for m, r in results.items()}
