"""The T5 family: T5 / Flan-T5 text-to-text experts, every feed-forward block of the encoder and decoder an expert
(`wi`/`wo`, or gated `wi_0`/`wi_1`/`wo`); every other tensor merged statically.

Keys are `T5ForConditionalGeneration`'s. The encoder's and decoder's `embed_tokens` are the `shared` embedding and
are not read separately. `lm_head.weight` is its own tensor only in an untied model (Flan-T5, T5 v1.1): the base
decides, and an expert that disagrees is an error rather than a silently dropped or invented head.
"""

import logging
from collections.abc import Mapping

import torch
from tqdm.auto import tqdm
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedConfig,
    PreTrainedModel,
    T5Config,
    T5ForConditionalGeneration,
)

from modeling_wemoe import WEMoEForConditionalGeneration

from ..artifact import is_artifact, load_artifact_model, write_artifact
from ..backbone import Backbone, register_backbone
from ..checkpoints import ModelSource, load_base_model, load_tokenizer
from ..data import TaskData, check_tasks_known
from ..results import EvaluationResults, check_label_names, class_names_of
from ..streams import LABEL_WORDS, TASK_ROUTING, StreamOutput, TaskStream, label_words_and_rest, routed_layers

logger = logging.getLogger(__name__)

# Fields that decide tensor shapes or the forward computation of a T5 model.
T5_ARCHITECTURE_FIELDS = (
    "vocab_size",
    "d_model",
    "d_kv",
    "d_ff",
    "num_layers",
    "num_decoder_layers",
    "num_heads",
    "relative_attention_num_buckets",
    "relative_attention_max_distance",
    "feed_forward_proj",
    "layer_norm_epsilon",
    "scale_decoder_outputs",
)
LM_HEAD = "lm_head.weight"
# Older checkpoints carry this unused tensor; T5ForConditionalGeneration ignores it too.
UNUSED_KEYS = {"decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"}


def lm_head_is_tied(model: PreTrainedModel) -> bool:
    # The same parameter, not equal data pointers: a base on the meta device (a dry run) has none.
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


def label_token_ids(tokenizer, task: str, label_words: list[str]) -> list[int]:
    """The first token of each label word: what the first decoding step must choose between."""
    first_tokens = [tokenizer(word, add_special_tokens=False)["input_ids"][:1] for word in label_words]
    if any(not tokens for tokens in first_tokens):
        raise ValueError(f"Task {task!r}: a label word in {label_words} tokenizes to nothing.")
    ids = [tokens[0] for tokens in first_tokens]
    if len(set(ids)) != len(ids):
        raise ValueError(
            f"Task {task!r}: label words {label_words} do not differ in their first token ({ids}); the first "
            "decoding step cannot tell them apart."
        )
    return ids


class TextTaskStream(TaskStream):
    """Prompts (`prefix + text`) through the tokenizer; the entropy of the first decoded token, over the task's
    label words when it has them (the paper's objective), else over the vocabulary. With the objective
    `"label-words-and-rest"`, over the label words plus one bin for every other token (`label_words_and_rest`)."""

    def __init__(
        self,
        dataset,
        spec: TaskData,
        tokenizer,
        batch_size: int,
        task: str,
        label_words: list | None,
        objective: str = LABEL_WORDS,
    ):
        super().__init__(dataset, spec.text_column, batch_size, task)
        if objective != LABEL_WORDS and not label_words:
            raise ValueError(
                f"Task {task!r}: the adaptation objective {objective!r} needs the task's label words (`classnames` "
                "in the recipe), and the artifact records none."
            )
        self.tokenizer = tokenizer
        self.prefix = spec.prefix
        self.label_ids = label_token_ids(tokenizer, task, label_words) if label_words else None
        self.objective = objective

    def encode(self, values: list, rows: list[int]) -> dict[str, torch.Tensor]:
        prompts = [self.prefix + str(value) for value in values]
        encoded = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def outputs(self, model, inputs: dict[str, torch.Tensor], routing: bool = False) -> StreamOutput:
        """The first decoding step's logits; the routing weights of the encoder's layers (over the prompt's real
        tokens) and of the decoder's at that step."""
        # A WEMoE config keeps T5's fields in `text_config`; a plain T5's are its own.
        start = (getattr(model.config, "text_config", None) or model.config).decoder_start_token_id
        decoder_input_ids = torch.full((inputs["input_ids"].shape[0], 1), start, device=inputs["input_ids"].device)
        extra = {"output_routing_weights": True} if routing else {}
        output = model(**inputs, decoder_input_ids=decoder_input_ids, use_cache=False, **extra)
        layers = routed_layers(getattr(output, "encoder_routing_weights", None), inputs["attention_mask"])
        layers += routed_layers(getattr(output, "decoder_routing_weights", None))
        return StreamOutput(self.objective_logits(output.logits[:, 0]), layers)

    def objective_logits(self, logits: torch.Tensor) -> torch.Tensor:
        if self.label_ids is None:
            return logits
        if self.objective == LABEL_WORDS:
            return logits[:, self.label_ids]
        return label_words_and_rest(logits, self.label_ids)


@register_backbone
class T5Backbone(Backbone):
    architecture = "t5"
    display_name = "T5"
    plain_model_types = ("t5",)
    model_class = WEMoEForConditionalGeneration
    expert_linears = ("DenseReluDense.wi", "DenseReluDense.wi_0", "DenseReluDense.wi_1", "DenseReluDense.wo")
    input_kind = "text"
    pipeline_tag = "text2text-generation"
    labels_name = "label words"
    labels_required = False
    has_decoder = True
    architecture_fields = T5_ARCHITECTURE_FIELDS
    tensor_hints = {
        LM_HEAD: "The base model and this expert disagree on tying lm_head to the shared embedding: one has its own "
        "lm_head.weight (Flan-T5, T5 v1.1), the other reuses `shared` (original T5). Merge experts fine-tuned from "
        "the same base checkpoint."
    }
    objectives = (LABEL_WORDS, "label-words-and-rest", TASK_ROUTING)
    card_summary = (
        "A multi-task T5 text-to-text model: {n} fine-tuned T5 models merged into one. The encoder routes each prompt "
        "as a whole (its real tokens averaged), the decoder every token or once per prompt (see the router below)."
    )

    def key_of(self, checkpoint_key: str) -> str | None:
        """None for the stacks' copies of the shared embedding and for unused tensors."""
        if checkpoint_key.endswith("embed_tokens.weight") or checkpoint_key in UNUSED_KEYS:
            return None
        return checkpoint_key

    def config_of(self, config: PreTrainedConfig) -> T5Config | None:
        return config if isinstance(config, T5Config) else None

    def model_tensors(self, model: PreTrainedModel):
        """An in-memory T5's tensors by merge key, `lm_head.weight` only when it is not the shared embedding."""
        if not isinstance(model, T5ForConditionalGeneration):
            return None
        tied = lm_head_is_tied(model)
        state = {
            key: tensor
            for key, tensor in model.state_dict().items()
            if self.key_of(key) is not None and not (tied and key == LM_HEAD)
        }
        return state, model.config

    def load_base(self, source: ModelSource) -> T5ForConditionalGeneration:
        return load_base_model(source, T5ForConditionalGeneration, "encoder-decoder with its LM head")

    def base_tensors(self, base: T5ForConditionalGeneration) -> Mapping[str, torch.Tensor]:
        return self.model_tensors(base)[0]

    def wemoe_config_fields(self, base: T5ForConditionalGeneration) -> dict:
        # The base decides whether lm_head is the shared embedding (original T5) or its own tensor (Flan-T5).
        return {"text_config": base.config.to_dict(), "tie_word_embeddings": lm_head_is_tied(base)}

    def merge_target(self, model: WEMoEForConditionalGeneration) -> torch.nn.Module:
        return model

    def finish(self, model, base, experts, expert_tensors, task_labels, tokenizer=None, templates=None) -> None:
        model.generation_config = base.generation_config

    def load_processor(self, source: ModelSource, config: PreTrainedConfig | None = None):
        if isinstance(source, PreTrainedModel):
            raise ValueError("A T5 base in memory has no tokenizer to save with the artifact; give its directory.")
        return load_tokenizer(source, trust_remote_code=is_artifact(config))

    def static_model(self, base: T5ForConditionalGeneration, merged, experts, expert_tensors, task_labels):
        """A plain `T5ForConditionalGeneration` whose every tensor is the merge."""
        result = base.load_state_dict(merged, strict=False)
        if result.unexpected_keys:
            raise RuntimeError(f"Merged tensors the base does not have: {result.unexpected_keys}.")
        return base.eval()

    def write_static(self, static, directory, processor, *, extra_files, max_shard_size, dtype) -> None:
        write_artifact(static.to(dtype), directory, processor, extra_files=extra_files, max_shard_size=max_shard_size)

    def adamerging_classifier(self, base, task_labels, experts, expert_tensors, tokenizer=None, templates=None):
        return base, ""

    def task_stream(
        self, dataset, spec, processor, batch_size, task, labels, objective: str = LABEL_WORDS
    ) -> TextTaskStream:
        return TextTaskStream(dataset, spec, processor, batch_size, task, labels, objective)

    def evaluate(
        self, model_dir, datasets, data_config, batch_size, max_new_tokens, *, device, base=None
    ) -> EvaluationResults:
        return evaluate_text(model_dir, datasets, data_config, batch_size, max_new_tokens, device)

    def card_usage(self, repo_id: str, task: str) -> str:
        return f"""```python
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, pipeline

model = AutoModelForSeq2SeqLM.from_pretrained("{repo_id}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{repo_id}", trust_remote_code=True)
generator = pipeline("text2text-generation", model="{repo_id}", trust_remote_code=True)
generator("{task} sentence: ...")
```"""


@torch.no_grad()
def generated_answers(model, tokenizer, dataset, spec: TaskData, batch_size: int, max_new_tokens: int) -> list[str]:
    """The model's greedy answer to every prompt, in dataset order."""
    device = next(model.parameters()).device
    answers = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="Generating", unit="batch", leave=False):
        prompts = [spec.prefix + str(text) for text in dataset[start : start + batch_size][spec.text_column]]
        inputs = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(device)
        output_ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        answers.extend(answer.strip() for answer in tokenizer.batch_decode(output_ids, skip_special_tokens=True))
    return answers


def is_regression(dataset, spec: TaskData) -> bool:
    from datasets import Value

    feature = dataset.features[spec.label_column]
    return isinstance(feature, Value) and feature.dtype.startswith("float")


def parse_number(answer: str) -> float:
    try:
        return float(answer)
    except ValueError:
        return 0.0


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks from 0, tied values sharing the mean of their ranks (as Spearman's correlation needs)."""
    ranks = torch.empty_like(values)
    ranks[values.argsort()] = torch.arange(len(values), dtype=values.dtype)
    _, groups = values.unique(return_inverse=True)
    rank_sums = torch.zeros(int(groups.max()) + 1, dtype=values.dtype).index_add_(0, groups, ranks)
    return (rank_sums / groups.bincount().to(values.dtype))[groups]


def spearman(answers: list[str], targets: list[float]) -> float:
    """Spearman correlation of the answers read as numbers with the targets; 0 when either side is constant (the
    correlation is undefined there, and a model that always gives the same score has no ranking skill)."""
    predicted = average_ranks(torch.tensor([parse_number(a) for a in answers], dtype=torch.float64))
    expected = average_ranks(torch.tensor(targets, dtype=torch.float64))
    predicted, expected = predicted - predicted.mean(), expected - expected.mean()
    scale = predicted.norm() * expected.norm()
    return 0.0 if scale == 0 else float(predicted @ expected / scale)


def text_targets(dataset, spec: TaskData) -> list[str]:
    names = class_names_of(dataset, spec)
    labels = dataset[spec.label_column]
    return [names[label] for label in labels] if names is not None else [str(label).strip() for label in labels]


def evaluate_text(
    model_dir: str, datasets: Mapping, data_config, batch_size: int, max_new_tokens: int, device: torch.device
):
    model = load_artifact_model(model_dir, AutoModelForSeq2SeqLM).to(device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)  # a tokenizer may name no class
    model_tasks = getattr(model.config, "tasks", None)
    if model_tasks is not None:
        check_tasks_known(list(datasets), list(model_tasks))
    label_words = getattr(model.config, "task_labels", None) or {}
    scores, metrics = {}, {}
    for task, dataset in datasets.items():
        spec = data_config.tasks[task]
        if task in label_words:
            check_label_names(task, class_names_of(dataset, spec), list(label_words[task]))
        answers = generated_answers(model, tokenizer, dataset, spec, batch_size, max_new_tokens)
        if is_regression(dataset, spec):
            metrics[task], scores[task] = "spearmanr", spearman(answers, dataset[spec.label_column])
        else:
            targets = text_targets(dataset, spec)
            metrics[task] = "exact_match"
            scores[task] = sum(a == t for a, t in zip(answers, targets, strict=True)) / len(dataset)
        logger.info("%s: %s %.4f on %d samples", task, metrics[task], scores[task], len(dataset))
    num_samples = {task: len(dataset) for task, dataset in datasets.items()}
    return EvaluationResults(scores, metrics, "text2text-generation", num_samples)
