"""What evaluation produces and how a family scores a classifier: the results type every family returns, the label
checks, and accuracy over a labeled dataset. Families (`wemoe.backbones`) score with these; `wemoe.evaluation`
runs them and records the scores."""

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .data import TaskData

logger = logging.getLogger(__name__)


class EvaluationResults(dict):
    """Score per task and `"average"`; `metrics` names each task's metric, `task_type` the Hub task, `num_samples`
    how many samples each score counts."""

    def __init__(
        self, scores: Mapping[str, float], metrics: Mapping[str, str], task_type: str, num_samples: Mapping[str, int]
    ):
        super().__init__(scores)
        self["average"] = sum(scores.values()) / len(scores)
        self.metrics = dict(metrics)
        self.task_type = task_type
        self.num_samples = dict(num_samples)

    def average_metric(self) -> str:
        """The tasks' metric when they share one; `"mean"` of unlike scores (e.g. accuracy and Spearman) otherwise."""
        metrics = set(self.metrics.values())
        return metrics.pop() if len(metrics) == 1 else "mean"

    def to_json(self) -> dict[str, dict]:
        """Per task and for the average: `{metric, score, num_samples}`, scores in their metric's own unit (fractions
        for accuracy and exact match, a correlation in [-1, 1] for Spearman)."""
        entries = {
            task: {"metric": self.metrics[task], "score": self[task], "num_samples": self.num_samples[task]}
            for task in self.metrics
        }
        entries["average"] = {
            "metric": self.average_metric(),
            "score": self["average"],
            "num_samples": sum(self.num_samples.values()),
        }
        return entries


def scores_from_json(results: Mapping[str, Any]) -> dict[str, float]:
    """Score per task (and `"average"`) of a `wemoe-eval --output` file, in the `{metric, score, num_samples}` layout
    or in the plain `task: score` one of earlier releases (cached results stay readable)."""
    return {task: entry["score"] if isinstance(entry, Mapping) else entry for task, entry in results.items()}


def class_names_of(dataset, spec: TaskData) -> list[str] | None:
    from datasets import ClassLabel

    feature = dataset.features[spec.label_column]
    return list(feature.names) if isinstance(feature, ClassLabel) else None


def check_label_names(task: str, dataset_names: list[str] | None, model_names: list[str]) -> None:
    """Integer labels only mean the same classes when the dataset's ClassLabel names match the model's head."""
    if dataset_names is not None and dataset_names != model_names:
        raise ValueError(
            f"Task {task!r}: the dataset's classes {dataset_names} differ from the model's {model_names}; "
            "labels would be compared against the wrong classes."
        )


def class_indices(task: str, labels: list, class_names: list[str]) -> tuple[torch.Tensor, int]:
    """The labels as class indices, and how many are -1 (the Hub's "no label"), which are left out of the score.
    Class names are accepted for indices; anything else outside the classes is an error."""
    if labels and all(isinstance(label, str) for label in labels):
        unknown = sorted({label for label in labels if label not in class_names})
        if unknown:
            raise ValueError(f"Task {task!r}: labels {unknown[:5]} are not among the classes {class_names}.")
        labels = [class_names.index(label) for label in labels]
    if not all(isinstance(label, int) and not isinstance(label, bool) for label in labels):
        kinds = sorted({type(label).__name__ for label in labels})
        raise ValueError(f"Task {task!r}: labels must be class indices or class names, got {kinds}.")
    indices = torch.tensor(labels, dtype=torch.long)
    out_of_range = indices[(indices < -1) | (indices >= len(class_names))].unique().tolist()
    if out_of_range:
        raise ValueError(
            f"Task {task!r}: labels {out_of_range[:5]} are outside the task's {len(class_names)} classes "
            f"(0-{len(class_names) - 1}, or -1 for unlabelled)."
        )
    return indices, int((indices == -1).sum())


@torch.no_grad()
def classification_accuracy(
    task: str,
    dataset,
    spec: TaskData,
    class_names: list[str],
    logits_of: Callable[[list, list[int]], torch.Tensor],
    batch_size: int,
    input_kind: str,
) -> tuple[float, int]:
    """Accuracy of a classifier on one task, and the number of samples it counts: `logits_of(values, rows)` gives the
    logits over the task's classes for a batch of the input column's values (`input_kind`: which column). Unlabelled
    samples (-1) are left out; broken (NaN) logits are an error."""
    check_label_names(task, class_names_of(dataset, spec), class_names)
    labels, unlabelled = class_indices(task, dataset[spec.label_column], class_names)
    if unlabelled == len(dataset):
        raise ValueError(f"Task {task!r}: every sample is unlabelled (-1); there is nothing to score.")
    if unlabelled:
        logger.warning("%s: %d unlabelled samples (label -1) left out of the accuracy.", task, unlabelled)
    column = spec.input_column(input_kind)
    predictions = []
    for start in tqdm(range(0, len(dataset), batch_size), desc=f"Evaluating {task}", unit="batch", leave=False):
        rows = list(range(start, min(start + batch_size, len(dataset))))
        logits = logits_of(dataset[rows][column], rows)
        if not torch.isfinite(logits).all():
            raise ValueError(
                f"Task {task!r}: the model gives NaN or infinite logits (rows {rows[0]}-{rows[-1]}); its weights are "
                "broken, and its accuracy would mean nothing."
            )
        predictions.append(logits.argmax(dim=-1).cpu())
    labelled = labels != -1
    accuracy = int((torch.cat(predictions)[labelled] == labels[labelled]).sum()) / int(labelled.sum())
    logger.info("%s: accuracy %.4f on %d samples", task, accuracy, int(labelled.sum()))
    return accuracy, int(labelled.sum())


def task_model_dirs(model_dir: str | os.PathLike) -> dict[str, Path]:
    """The per-task model directories of a static baseline whose tasks keep their own heads (one plain model per
    task, `MODEL_DIR/<task>/config.json`); empty for a single model."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir() or (model_dir / "config.json").is_file():
        return {}
    return {path.parent.name: path.parent for path in sorted(model_dir.glob("*/config.json"))}
