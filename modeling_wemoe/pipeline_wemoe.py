"""The `text2text-generation` pipeline for WEMoE T5 artifacts.

transformers 5 removed that task; an artifact names this class in `config.custom_pipelines`, so
`pipeline("text2text-generation", model=DIR, trust_remote_code=True)("sst2 sentence: ...")` works again.
Shipped inside every artifact: imports only torch and transformers.
"""

from typing import Any

from transformers import GenerationConfig, Pipeline


class WEMoEText2TextGenerationPipeline(Pipeline):
    """Generate a text answer for each input text: `[{"generated_text": ...}]` per input.

    Generation parameters (`max_new_tokens`, `num_beams`, ...) can be given at construction or per call.

    Example:

    ```python
    >>> from transformers import pipeline
    >>> generator = pipeline("text2text-generation", model="path/to/wemoe-t5", trust_remote_code=True)
    >>> generator("sst2 sentence: a gorgeous, witty, seductive movie.")
    [{'generated_text': 'positive'}]
    ```
    """

    _load_tokenizer = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_processor = False
    _pipeline_calls_generate = True
    _default_generation_config = GenerationConfig(max_new_tokens=32)

    def _sanitize_parameters(self, truncation: bool | None = None, **generate_kwargs):
        preprocess_params = {} if truncation is None else {"truncation": truncation}
        return preprocess_params, generate_kwargs, {}

    def preprocess(self, text: str, truncation: bool = False) -> dict[str, Any]:
        if not isinstance(text, str):
            raise ValueError(f"text2text-generation takes a string (or a list of strings), got {type(text).__name__}.")
        return self.tokenizer(text, truncation=truncation, return_tensors="pt")

    def _forward(self, model_inputs: dict[str, Any], **generate_kwargs) -> dict[str, Any]:
        generate_kwargs = self._prepare_generate_kwargs(generate_kwargs)
        return {"output_ids": self.model.generate(**model_inputs, **generate_kwargs)}

    def postprocess(self, model_outputs: dict[str, Any]) -> list[dict[str, str]]:
        texts = self.tokenizer.batch_decode(model_outputs["output_ids"], skip_special_tokens=True)
        return [{"generated_text": text.strip()} for text in texts]
