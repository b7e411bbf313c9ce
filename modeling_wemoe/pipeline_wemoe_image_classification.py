"""The `image-classification` pipeline for multi-task WEMoE image classifiers (CLIP), which can be told the task.

transformers' own image-classification pipeline knows nothing of tasks: it cannot pass `task=` to the model, and it
ranks every task's classes with one softmax. An artifact names this class in `config.custom_pipelines`, so
`pipeline("image-classification", model=DIR, trust_remote_code=True)(image, task="eurosat")` classifies with that
task's head. Shipped inside the artifacts of image classifiers: imports only transformers.
"""

from typing import Any

from transformers.image_utils import is_pil_image, load_image

from .pipeline_wemoe_classification import WEMoEClassificationPipeline


class WEMoEImageClassificationPipeline(WEMoEClassificationPipeline):
    """Classify each input image (a PIL image, a local path, a URL, or an array the image processor takes) for one
    task, or for every task.

    With `task`, the result of an image is that task's `top_k` classes (default: all), `[{"label", "score"}, ...]`,
    best first, with scores summing to 1 over the task's classes (the model is given `task` and scores only those).
    Without `task`, it is every task's `top_k` best classes (default: 1), `[{"task", "label", "score"}, ...]` in task
    order, each score the softmax over that task's classes alone. A list of images gives a list of such results.
    `timeout` bounds the download of an image URL.

    Example:

    ```python
    >>> from transformers import pipeline
    >>> classify = pipeline("image-classification", model="path/to/wemoe-clip", trust_remote_code=True)
    >>> classify("satellite.png", task="eurosat", top_k=2)
    [{'label': 'forest', 'score': 0.91}, {'label': 'pasture', 'score': 0.05}]
    >>> classify("satellite.png")
    [{'task': 'eurosat', 'label': 'forest', 'score': 0.91}, {'task': 'gtsrb', 'label': 'stop', 'score': 0.12}]
    ```
    """

    _load_tokenizer = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_processor = False

    def _sanitize_parameters(self, task: str | None = None, top_k: int | None = None, timeout: float | None = None):
        return self._classification_parameters(task, top_k, timeout=timeout)

    def preprocess(self, image: Any, timeout: float | None = None) -> dict[str, Any]:
        if isinstance(image, str) or is_pil_image(image):  # a path, URL or base64 string, or PIL: read as RGB
            image = load_image(image, timeout=timeout)
        return self.image_processor(images=image, return_tensors="pt").to(self.dtype)
