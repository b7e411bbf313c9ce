"""wemoe-eval and wemoe-tta as a user runs them: the results table and JSON, the device they run on, a fine-tune saved
as a bare CLIPVisionModel scored over its base, and how many TTA checkpoints stay on disk."""

import json

import pytest
import yaml

from conversion.cli.evaluate import main as wemoe_eval
from conversion.evaluation import EvaluationResults


def write_yaml(content: dict, path) -> str:
    path.write_text(yaml.safe_dump(content))
    return str(path)


def test_eval_prints_a_table_with_metric_and_samples_and_writes_them_as_json(artifact, task_data, tmp_path, capsys):
    output = tmp_path / "results.json"
    wemoe_eval([str(artifact), write_yaml(task_data, tmp_path / "data.yaml"), "--output", str(output)])

    results = json.loads(output.read_text())
    assert set(results) == {*task_data["tasks"], "average"}
    for task in task_data["tasks"]:
        assert results[task].keys() == {"metric", "score", "num_samples"}
        assert results[task]["metric"] == "accuracy" and results[task]["num_samples"] == 20
        assert 0 <= results[task]["score"] <= 1
    scores = [results[task]["score"] for task in task_data["tasks"]]
    assert results["average"] == {"metric": "accuracy", "score": pytest.approx(sum(scores) / 3), "num_samples": 60}

    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["task", "metric", "score", "samples"]
    shapes = next(line for line in lines if line.startswith("shapes "))
    assert shapes.split() == ["shapes", "accuracy", f"{100 * results['shapes']['score']:.2f}%", "20"]


def test_spearman_is_shown_as_a_correlation_and_an_average_of_unlike_metrics_as_a_mean():
    from conversion.cli.evaluate import results_table

    results = EvaluationResults(
        {"sst2": 0.875, "stsb": -0.25},
        {"sst2": "exact_match", "stsb": "spearmanr"},
        "text2text-generation",
        {"sst2": 8, "stsb": 12},
    )
    rows = {line.split()[0]: line.split()[1:] for line in results_table(results).splitlines()}
    assert rows["sst2"] == ["exact", "match", "87.50%", "8"]
    assert rows["stsb"] == ["spearman", "-0.2500", "12"]
    assert rows["average"] == ["mean", "+0.3125", "20"]
    assert "in [-1, 1]" in results_table(results)
    assert results.to_json()["stsb"] == {"metric": "spearmanr", "score": -0.25, "num_samples": 12}


def test_results_json_of_either_layout_reads_as_scores():
    from conversion.evaluation import scores_from_json

    old = {"shapes": 0.5, "average": 0.5}
    new = {"shapes": {"metric": "accuracy", "score": 0.5, "num_samples": 4}, "average": {"score": 0.5}}
    assert scores_from_json(old) == scores_from_json(new) == old
