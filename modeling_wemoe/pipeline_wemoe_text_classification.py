"""The `text-classification` pipeline for multi-task WEMoE text classifiers, which must be told the task.

An artifact names this class in `config.custom_pipelines`, so
`pipeline("text-classification", model=DIR, trust_remote_code=True)(text, task="sst2")` classifies with that task's
head. Shipped inside the artifacts of text classifiers: imports only torch and transformers.
"""

from typing import Any

import torch
from transformers import Pipeline


class WEMoETextClassificationPipeline(Pipeline):
    """Classify each input text for one task, or for every task.

    With `task`, the result of a text is that task's `top_k` classes (default: all), `[{"label", "score"}, ...]`,
    best first, with scores summing to 1 over the task's classes. Without `task`, it is every task's best class,
    `[{"task", "label", "score"}, ...]` in task order, each score the softmax over that task's classes alone.

    Example:

    ```python
    >>> from transformers import pipeline
    >>> classify = pipeline("text-classification", model="path/to/wemoe-bert", trust_remote_code=True)
    >>> classify("a gorgeous, witty, seductive movie.", task="sst2")
    [{'label': 'positive', 'score': 0.97}, {'label': 'negative', 'score': 0.03}]
    ```
    """

    _load_tokenizer = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_processor = False

    def _sanitize_parameters(self, task: str | None = None, top_k: int | None = None, truncation: bool | None = None):
        preprocess_params = {} if truncation is None else {"truncation": truncation}
        if task is not None and task not in self.model.config.tasks:
            raise ValueError(f"Unknown task {task!r}: this model has tasks {list(self.model.config.tasks)}.")
        return preprocess_params, {"task": task}, {"task": task, "top_k": top_k}

    def preprocess(self, text: str, truncation: bool = True) -> dict[str, Any]:
        if not isinstance(text, str):
            raise ValueError(f"text-classification takes a string (or a list of strings), got {type(text).__name__}.")
        return self.tokenizer(text, truncation=truncation, return_tensors="pt")

    def _forward(self, model_inputs: dict[str, Any], task: str | None = None) -> dict[str, Any]:
        return {"logits": self.model(**model_inputs, task=task).logits}

    def postprocess(self, model_outputs: dict[str, Any], task: str | None = None, top_k: int | None = None) -> list:
        logits = model_outputs["logits"][0].float()
        config = self.model.config
        if task is not None:
            scores = torch.softmax(logits, dim=-1)
            ranked = scores.argsort(descending=True)[:top_k].tolist()
            return [{"label": config.task_labels[task][i], "score": float(scores[i])} for i in ranked]
        results, start = [], 0
        for name in config.tasks:
            labels = config.task_labels[name]
            scores = torch.softmax(logits[start : start + len(labels)], dim=-1)
            best = int(scores.argmax())
            results.append({"task": name, "label": labels[best], "score": float(scores[best])})
            start += len(labels)
        return results
