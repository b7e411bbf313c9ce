"""The accuracy benchmark's pipeline at CI size (`--tiny`): real and procedural task data, pre-training, fine-tunes
saved as ordinary checkpoints, then wemoe-convert / wemoe-tta / wemoe-eval for every method, the table and the
plots. It checks that every stage runs and produces what the next one reads, not the accuracy."""

import importlib.util
import json
from pathlib import Path

import pytest
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


def test_tiny_benchmark_runs_every_method_end_to_end(tmp_path):
    benchmark = load_script("accuracy")
    cache, results_dir = tmp_path / "cache", tmp_path / "results"
    results = benchmark.main(["--tiny", "--cache", str(cache), "--results", str(results_dir)])

    assert list(results) == list(benchmark.METHODS)
    for method, result in results.items():
        scores = result["scores"]
        assert set(scores) == set(benchmark.TASKS) | {"average"}, method
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
    assert not (cache / "models" / "task_arithmetic_tta").exists()
    table = (results_dir / "accuracy.md").read_text()
    assert all(method in table for method in benchmark.METHODS)
    assert json.loads((results_dir / "accuracy.json").read_text()).keys() == results.keys()
    for plot in ("routing_weights.png", "task_vector_norms.png"):
        assert (results_dir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A second run reuses every cached stage and gives the same table.
    again = benchmark.main(["--tiny", "--cache", str(cache), "--results", str(results_dir)])
    assert {m: r["scores"] for m, r in again.items()} == {m: r["scores"] for m, r in results.items()}
