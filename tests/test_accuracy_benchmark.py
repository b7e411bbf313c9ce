"""The accuracy benchmark's pipeline at CI size (`--tiny`): real and procedural task data, pre-training, fine-tunes
saved as ordinary checkpoints, then wemoe-convert / wemoe-tta / wemoe-eval for every method, the table and the
plots. It checks that every stage runs and produces what the next one reads, not the accuracy."""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import CLIPModel

pytest.importorskip("sklearn")
pytest.importorskip("skimage")
pytest.importorskip("matplotlib")

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def load_script(name: str):
    """A benchmark script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_task_routing_and_recommendation(benchmark, cache: Path, results_dir: Path, results: dict, name: str):
    """A benchmark's task-routing rows adapted by task routing at the learning rate and steps chosen on validation for
    their router normalization, and `recommended.json` naming, under the benchmark's `name`, the merged row with the
    best validation average."""
    for row, normalization in (("WEMoE, task routing", "none"), ("WEMoE, task routing, softmax routing", "softmax")):
        slug = benchmark.method_slug(row)
        choice = json.loads((cache / "eval" / f"{slug}_adaptation_on_validation.json").read_text())
        assert set(choice["candidates"]) == {"0.001@1", "0.001@2"}  # the tiny grid, every candidate scored
        written = yaml.safe_load((cache / "models" / f"{slug}_tta" / "merge_config.yaml").read_text())
        assert written["router"].get("normalization", "none") == normalization
        record = written["adaptation"]
        assert (record["objective"], record["lr"], record["steps"]) == ("task-routing", choice["lr"], choice["steps"])
    recommended = json.loads((results_dir / "recommended.json").read_text())[name]
    assert recommended["row"] in results and "oracle" not in recommended["row"]
    assert recommended["validation_average"] == max(recommended["validation_averages"].values())
    assert recommended["test_average"] == results[recommended["row"]]["scores"]["average"]


def pretraining_packages_missing() -> list[str]:
    benchmark = load_script("accuracy")
    paths = {benchmark.EMOJI_FONT: "fonts-noto-color-emoji", benchmark.CLIPART: "tuxpaint-stamps-default"}
    return [package for path, package in paths.items() if not path.exists()]


def test_tiny_benchmark_runs_every_method_end_to_end(tmp_path):
    if pretraining_packages_missing() and not os.environ.get("CI"):  # CI installs them (.ci/run): never skipped there
        pytest.skip(f"apt-get install -y {' '.join(pretraining_packages_missing())} (pre-training images)")
    benchmark = load_script("accuracy")
    cache, results_dir = tmp_path / "cache", tmp_path / "results"
    run = benchmark.main(["--tiny", "--cache", str(cache), "--results", str(results_dir)])
    results, regime = run["results"], run["regime"]

    rows = list(benchmark.methods(regime["task_arithmetic"]["lambda"]))
    assert list(results) == ["pre-trained (zero-shot)", "individual fine-tunes", *rows, *benchmark.ORACLE_ROWS]
    assert regime["task_arithmetic"]["lambda"] in benchmark.LAMBDAS  # chosen on validation
    assert set(regime["zero_shot"]) == set(benchmark.TINY_TASKS) | {"average"}
    for method, result in results.items():
        scores = result["scores"]
        assert set(scores) == set(benchmark.TINY_TASKS) | {"average"}, method
        assert all(0.0 <= score <= 1.0 for score in scores.values()), method
    # Fine-tunes are ordinary CLIPModel checkpoints whose vision tower moved and whose text tower did not.
    base = CLIPModel.from_pretrained(cache / "checkpoints" / "base")
    mnist = CLIPModel.from_pretrained(cache / "checkpoints" / "mnist")
    assert any(
        (a != b).any() for a, b in zip(base.vision_model.parameters(), mnist.vision_model.parameters(), strict=True)
    )
    assert all((a == b).all() for a, b in zip(base.text_model.parameters(), mnist.text_model.parameters(), strict=True))
    # WEMoE rows were adapted (a tta output beside each converted model); static rows were not.
    assert (cache / "models" / "wemoe_tta" / "config.json").is_file()
    check_task_routing_and_recommendation(benchmark, cache, results_dir, results, "accuracy")
    assert not (cache / "models" / "task_arithmetic__lambda_0_3_tta").exists()
    # The "other weights pre-trained" row keeps what it does not upscale as the base has it; the other row merges it.
    base_weights = base.vision_model.state_dict()
    rows = {f"WEMoE, task routing{benchmark.PRETRAINED_REST}": True, f"WEMoE, task routing{benchmark.ATTENTION}": False}
    for row, kept in rows.items():
        converted = load_file(cache / "models" / benchmark.method_slug(row) / "model.safetensors")
        for name in ("embeddings.patch_embedding.weight", "post_layernorm.weight", "pre_layrnorm.bias"):
            assert torch.equal(converted[f"vision_model.{name}"], base_weights[name]) is kept, (row, name)
    table = (results_dir / "accuracy.md").read_text()
    assert all(method in table for method in results)
    assert json.loads((results_dir / "accuracy.json").read_text()).keys() == results.keys()
    diagnostics = json.loads((results_dir / "accuracy_diagnostics.json").read_text())
    assert len(diagnostics["WEMoE"]["routing_accuracy_after"]["mnist"]) == 4  # one per layer
    assert [point["step"] for point in diagnostics["WEMoE"]["curve"]][0] == 0
    for plot in ("accuracy_routing_wemoe.png", "accuracy_adaptation.png", "accuracy_task_vector_norms.png"):
        assert (results_dir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A second run, from the tasks file the first one wrote (`--tasks FILE`), reuses every cached stage.
    again = benchmark.main(["--tiny", "--cache", str(cache), "--results", str(results_dir), "--tasks",
                            str(cache / "tasks.yaml")])  # fmt: skip
    assert {m: r["scores"] for m, r in again["results"].items()} == {m: r["scores"] for m, r in results.items()}


def test_pretraining_captions_never_name_an_evaluated_class():
    if pretraining_packages_missing() and not os.environ.get("CI"):
        pytest.skip(f"apt-get install -y {' '.join(pretraining_packages_missing())} (pre-training images)")
    benchmark = load_script("accuracy")
    classes = ["face", "circle", "t-shirt", "ankle boot"]
    pairs = benchmark.pretraining_pairs(classes, cap=None, seed=0)
    words = {word for _, name in pairs for word in name.split()}
    assert not words & {"face", "circle", "t", "shirt", "ankle", "boot"}
    assert len(pairs) > 1000  # emoji and clipart both read
    assert {"grinning face", "cat face"}.isdisjoint(name for _, name in pairs)
