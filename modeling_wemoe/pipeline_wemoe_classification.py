"""What the text- and image-classification pipelines of multi-task WEMoE classifiers share: the `task` and `top_k`
arguments, the forward with `task=`, and scores normalised within each task.

A multi-task classifier's logits span every task's classes; one softmax over all of them would mix unrelated tasks
("colors: blue" ranked against "shapes: square"). Shipped inside the artifacts of classifiers, next to the pipeline
that uses it: imports only torch and transformers.
"""

from typing import Any

import torch
from transformers import Pipeline


class WEMoEClassificationPipeline(Pipeline):
    """Base of the WEMoE classification pipelines: a subclass defines `preprocess` and a `_sanitize_parameters` that
    passes its own preprocessing options to `_classification_parameters`. The output format is documented on the
    subclasses (`WEMoETextClassificationPipeline`, `WEMoEImageClassificationPipeline`)."""

    def _classification_parameters(
        self, task: str | None, top_k: int | None, **preprocess_params
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        tasks = list(self.model.config.tasks)
        if task is not None and task not in tasks:
            raise ValueError(f"Unknown task {task!r}: this model has tasks {tasks}.")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"`top_k` must be a positive int, got {top_k!r}.")
        preprocess_params = {name: value for name, value in preprocess_params.items() if value is not None}
        return preprocess_params, {"task": task}, {"task": task, "top_k": top_k}

    def _forward(self, model_inputs: dict[str, Any], task: str | None = None) -> dict[str, Any]:
        return {"logits": self.model(**model_inputs, task=task).logits}

    def postprocess(
        self, model_outputs: dict[str, Any], task: str | None = None, top_k: int | None = None
    ) -> list[dict[str, Any]]:
        logits = model_outputs["logits"][0].float()
        config = self.model.config
        if task is not None:
            return ranked_labels(logits, config.task_labels[task], top_k)
        results = []
        for name, (start, end) in config.task_label_offsets.items():
            best = ranked_labels(logits[start:end], config.task_labels[name], top_k or 1)
            results.extend({"task": name, **prediction} for prediction in best)
        return results


def ranked_labels(logits: torch.Tensor, labels: list[str], top_k: int | None) -> list[dict[str, Any]]:
    """The `top_k` best of one task's classes (all for `None`), best first, scored by the softmax over them."""
    scores = torch.softmax(logits, dim=-1)
    return [{"label": labels[i], "score": float(scores[i])} for i in scores.argsort(descending=True)[:top_k].tolist()]


__all__ = ["WEMoEClassificationPipeline"]
