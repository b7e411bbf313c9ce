"""The `text-classification` pipeline for multi-task WEMoE text classifiers, which must be told the task.

An artifact names this class in `config.custom_pipelines`, so
`pipeline("text-classification", model=DIR, trust_remote_code=True)(text, task="sst2")` classifies with that task's
head. Shipped inside the artifacts of text classifiers: imports only torch and transformers.
"""

from typing import Any

from .pipeline_wemoe_classification import WEMoEClassificationPipeline


class WEMoETextClassificationPipeline(WEMoEClassificationPipeline):
    """Classify each input text for one task, or for every task.

    With `task`, the result of a text is that task's `top_k` classes (default: all), `[{"label", "score"}, ...]`,
    best first, with scores summing to 1 over the task's classes. Without `task`, it is every task's `top_k` best
    classes (default: 1), `[{"task", "label", "score"}, ...]` in task order, each score the softmax over that task's
    classes alone.

    Example:

    ```python
    >>> from transformers import pipeline
    >>> classify = pipeline("text-classification", model="path/to/wemoe-bert", trust_remote_code=True)
    >>> classify("a gorgeous, witty, seductive movie.", task="sst2")
    [{'label': 'positive', 'score': 0.97}, {'label': 'negative', 'score': 0.03}]
    >>> classify("a gorgeous, witty, seductive movie.")
    [{'task': 'sst2', 'label': 'positive', 'score': 0.97}, {'task': 'topics', 'label': 'film', 'score': 0.88}]
    ```
    """

    _load_tokenizer = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_processor = False

    def _sanitize_parameters(self, task: str | None = None, top_k: int | None = None, truncation: bool | None = None):
        return self._classification_parameters(task, top_k, truncation=truncation)

    def preprocess(self, text: str, truncation: bool = True) -> dict[str, Any]:
        if not isinstance(text, str):
            raise ValueError(f"text-classification takes a string (or a list of strings), got {type(text).__name__}.")
        return self.tokenizer(text, truncation=truncation, return_tensors="pt")
