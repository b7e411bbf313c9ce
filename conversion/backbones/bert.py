"""The BERT family: text classifiers fine-tuned from one BERT-style encoder, each task keeping its own head.

Experts are `BertForSequenceClassification` checkpoints (either key layout: `bert.`-prefixed or bare encoder keys;
safetensors or `.bin`) or PEFT LoRA adapters with the classifier in `modules_to_save`. The embeddings and every
encoder layer are merged; each layer's `intermediate.dense` and `output.dense` are the experts. Every task keeps its
expert's pooler and classifier (its head), as in the E-WEMoE paper's classifier merging; its labels come from the
expert's `id2label`, or from the recipe's `classnames`.
"""

import copy
import logging
from collections.abc import Mapping

import torch
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import SequenceClassifierOutput

from modeling_wemoe.modeling_wemoe_bert import WEMoEBertHead, WEMoEForSequenceClassification

from ..artifact import is_artifact, load_artifact_model, write_artifact
from ..backbone import Backbone, register_backbone
from ..checkpoints import (
    CheckpointTensors,
    ModelSource,
    TensorSource,
    check_finite,
    load_base_model,
    load_tokenizer,
)
from ..data import check_tasks_known
from ..results import EvaluationResults, class_names_of, classification_accuracy, task_model_dirs
from ..streams import StreamOutput, TaskStream, routed_layers

logger = logging.getLogger(__name__)

ENCODER_ROOTS = ("embeddings", "encoder")
HEAD_ROOTS = ("pooler", "classifier")
# Non-persistent buffers that older checkpoints carry.
BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")


def encoder_key(checkpoint_key: str) -> str | None:
    """The merge key of a BERT checkpoint key in either layout (`bert.`-prefixed or not), or None for the pooler,
    the classifier and buffers."""
    key = checkpoint_key.removeprefix("bert.")
    if key.split(".")[0] not in ENCODER_ROOTS or key in BUFFERS:
        return None
    return key


def head_key(checkpoint_key: str) -> str | None:
    """The head key (`pooler.dense.weight`, `classifier.bias`, ...) of a checkpoint key, or None."""
    key = checkpoint_key.removeprefix("bert.")
    return key if key.split(".")[0] in HEAD_ROOTS else None


class TextClassificationStream(TaskStream):
    """Texts (`prefix + text`) through the tokenizer; the entropy of the task's class distribution."""

    def __init__(self, dataset, spec, tokenizer, batch_size: int, task: str):
        super().__init__(dataset, spec.text_column, batch_size, task)
        self.tokenizer = tokenizer
        self.prefix = spec.prefix

    def encode(self, values: list, rows: list[int]) -> dict[str, torch.Tensor]:
        texts = [self.prefix + str(value) for value in values]
        return dict(self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt"))

    def outputs(self, model, inputs: dict[str, torch.Tensor], routing: bool = False) -> StreamOutput:
        extra = {"output_routing_weights": True} if routing else {}
        output = model(**inputs, task=self.task, **extra)
        routing_weights = getattr(output, "routing_weights", None)
        return StreamOutput(output.logits, routed_layers(routing_weights, inputs.get("attention_mask")))


class MultiHeadBert(nn.Module):
    """A BERT encoder with one head per task, `(**inputs, task=...) -> .logits`: the classifier layer-wise
    AdaMerging trains its coefficients through (the merged tensors are under `bert.`)."""

    def __init__(self, bert: BertModel, heads: Mapping[str, Mapping[str, torch.Tensor]], task_labels):
        super().__init__()
        self.bert = bert.requires_grad_(False)
        self.tasks = list(heads)
        self.heads = nn.ModuleList(
            [head_module(bert.config, heads[task], len(task_labels[task])) for task in self.tasks]
        )

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, task: str | None = None):
        hidden = self.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
        return SequenceClassifierOutput(logits=self.heads[self.tasks.index(task)](hidden))


@torch.no_grad()
def head_module(text_config: PreTrainedConfig, head: Mapping[str, torch.Tensor], num_labels: int) -> WEMoEBertHead:
    module = WEMoEBertHead(text_config, num_labels).eval()
    module.load_state_dict(head)
    return module.requires_grad_(False)


def read_lora_head(directory, owner: str, base_pooler: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LoRA expert's head: its classifier from `modules_to_save`, its pooler from there too or else the base's."""
    from peft.utils import load_peft_weights

    head = {}
    for saved_key, tensor in load_peft_weights(str(directory)).items():
        key = head_key(saved_key.removeprefix("base_model.model."))
        if key is None:
            continue
        if ".lora_" in key:
            raise ValueError(f"{owner}: LoRA on {key!r}; train the pooler and classifier fully (`modules_to_save`).")
        head[key] = tensor
    if "classifier.weight" not in head:
        raise ValueError(
            f"{owner}: adapter {str(directory)!r} has no classifier; save it with the classifier in "
            "`modules_to_save` (task_type SEQ_CLS does)."
        )
    return {**dict(base_pooler), **head}


def expert_head(
    source: ModelSource, tensors: TensorSource, task: str, base_pooler: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """One expert's pooler and classifier tensors, by head key, checked for NaN/inf."""
    owner = f"Expert {task!r}"
    if isinstance(source, PreTrainedModel):
        if not isinstance(source, BertForSequenceClassification):
            raise TypeError(f"{owner} must be a BertForSequenceClassification (it brings its head).")
        state = {f"bert.{key}": value for key, value in source.bert.state_dict().items()}
        state.update({f"classifier.{key}": value for key, value in source.classifier.state_dict().items()})
        head = {head_key(key): value for key, value in state.items() if head_key(key) is not None}
    elif isinstance(tensors, CheckpointTensors):
        reader = CheckpointTensors(tensors.directory, owner, head_key, "BERT pooler or classifier")
        head = {key: reader[key] for key in reader.shapes}
    else:
        head = read_lora_head(tensors.directory, owner, base_pooler)
    missing = sorted({"pooler.dense.weight", "pooler.dense.bias", "classifier.weight", "classifier.bias"} - set(head))
    if missing:
        raise ValueError(f"{owner} has no {missing}: a BERT expert brings its own pooler and classifier.")
    for key, tensor in head.items():
        check_finite(key, tensor, owner)
    return head


def expert_labels(config: PreTrainedConfig | None) -> list[str] | None:
    """An expert's class names from its `id2label`, in index order."""
    id2label = getattr(config, "id2label", None) or {}
    return [id2label[index] for index in sorted(id2label)] if id2label else None


@register_backbone
class BertBackbone(Backbone):
    architecture = "bert"
    display_name = "BERT"
    plain_model_types = ("bert",)
    model_class = WEMoEForSequenceClassification
    expert_linears = ("intermediate.dense", "output.dense")
    input_kind = "text"
    pipeline_tag = "text-classification"
    labels_name = "classes"
    labels_required = False  # each expert's id2label names its classes
    # Fields that decide tensor shapes or the forward computation of a BERT encoder.
    architecture_fields = (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "hidden_act",
        "max_position_embeddings",
        "type_vocab_size",
        "layer_norm_eps",
    )
    card_summary = (
        "A multi-task text classifier: {n} BERT-style classifiers fine-tuned from one encoder, merged into one model "
        "in which every task keeps its own head (pooler and classifier)."
    )

    def key_of(self, checkpoint_key: str) -> str | None:
        return encoder_key(checkpoint_key)

    def config_of(self, config: PreTrainedConfig) -> BertConfig | None:
        return config if isinstance(config, BertConfig) else None

    def model_tensors(self, model: PreTrainedModel):
        if isinstance(model, BertForSequenceClassification):
            encoder = model.bert
        elif isinstance(model, BertModel):
            encoder = model
        else:
            return None
        state = {encoder_key(key): value for key, value in encoder.state_dict().items() if encoder_key(key)}
        return state, model.config

    def load_base(self, source: ModelSource) -> BertModel:
        return load_base_model(source, BertModel, "BERT encoder with its pooler")

    def base_tensors(self, base: BertModel) -> Mapping[str, torch.Tensor]:
        return self.model_tensors(base)[0]

    def wemoe_config_fields(self, base: BertModel) -> dict:
        text_config = base.config.to_dict()
        for field in ("id2label", "label2id", "num_labels", "architectures"):
            text_config.pop(field, None)  # the artifact's labels are its tasks'
        return {"text_config": text_config}

    def merge_target(self, model: WEMoEForSequenceClassification) -> nn.Module:
        return model.bert

    def task_labels(self, classnames, experts, expert_configs, tasks=None) -> dict[str, list[str]]:
        """The recipe's class names where given (checked against the expert's), else the expert's `id2label`."""
        labels = super().task_labels(classnames, experts, expert_configs, tasks) or {}
        for task in experts:
            from_expert = expert_labels(expert_configs.get(task))
            if task not in labels and from_expert is None:
                raise ValueError(
                    f"Task {task!r}: its expert names no classes (a LoRA adapter has no id2label); give `classnames`."
                )
            if task in labels and from_expert is not None and len(from_expert) != len(labels[task]):
                raise ValueError(
                    f"Task {task!r}: `classnames` lists {len(labels[task])} classes, its expert's id2label "
                    f"{len(from_expert)} ({from_expert})."
                )
            labels.setdefault(task, from_expert)
        return {task: labels[task] for task in experts}

    def heads(self, base: BertModel, experts, expert_tensors, task_labels) -> dict[str, dict[str, torch.Tensor]]:
        """Every task's head tensors, each classifier checked to have one row per class."""
        base_pooler = {f"pooler.{key}": value for key, value in base.pooler.state_dict().items()}
        heads = {}
        for task, source in experts.items():
            head = expert_head(source, expert_tensors[task], task, base_pooler)
            rows = head["classifier.weight"].shape[0]
            if rows != len(task_labels[task]):
                raise ValueError(
                    f"Expert {task!r}: its classifier has {rows} outputs, but the task has {len(task_labels[task])} "
                    f"classes {task_labels[task]}."
                )
            heads[task] = head
        return heads

    @torch.no_grad()
    def finish(self, model, base, experts, expert_tensors, task_labels, tokenizer=None, templates=None) -> None:
        heads = self.heads(base, experts, expert_tensors, task_labels)
        for index, task in enumerate(model.config.tasks):
            model.heads[index].load_state_dict({key: value.float() for key, value in heads[task].items()})

    def load_processor(self, source: ModelSource, config: PreTrainedConfig | None = None):
        if isinstance(source, PreTrainedModel):
            raise ValueError("A BERT base in memory has no tokenizer to save with the artifact; give its directory.")
        return load_tokenizer(source, trust_remote_code=is_artifact(config))

    def static_model(self, base, merged, experts, expert_tensors, task_labels) -> dict[str, PreTrainedModel]:
        """One plain `BertForSequenceClassification` per task: the merged encoder and that task's own head."""
        heads = self.heads(base, experts, expert_tensors, task_labels)
        models = {}
        for task, head in heads.items():
            config = copy.deepcopy(base.config)
            config.id2label = dict(enumerate(task_labels[task]))
            config.label2id = {label: index for index, label in config.id2label.items()}
            model = BertForSequenceClassification(config).eval()
            state = {f"bert.{key}": value for key, value in merged.items()}
            state.update({f"bert.{key}" if key.startswith("pooler") else key: value for key, value in head.items()})
            result = model.load_state_dict(state, strict=False)
            if result.missing_keys or result.unexpected_keys:
                raise RuntimeError(f"Static merge of task {task!r}: {result}.")
            models[task] = model
        return models

    def write_static(self, static, directory, processor, *, extra_files, max_shard_size, dtype) -> None:
        """A directory per task (`DIR/<task>`), each an ordinary classifier checkpoint with the tokenizer."""
        for task, model in static.items():
            task_dir = directory / task
            task_dir.mkdir()
            write_artifact(model.to(dtype), task_dir, processor, max_shard_size=max_shard_size)
        for name, text in extra_files.items():
            (directory / name).write_text(text)

    def adamerging_classifier(self, base, task_labels, experts, expert_tensors, tokenizer=None, templates=None):
        return MultiHeadBert(base, self.heads(base, experts, expert_tensors, task_labels), task_labels), "bert."

    def task_stream(self, dataset, spec, processor, batch_size, task, labels) -> TextClassificationStream:
        return TextClassificationStream(dataset, spec, processor, batch_size, task)

    def evaluate(
        self, model_dir, datasets, data_config, batch_size, max_new_tokens, *, device, base=None
    ) -> EvaluationResults:
        """Accuracy of a WEMoE artifact, a plain fine-tuned classifier, or a directory of per-task classifiers (the
        static baselines)."""
        per_task = task_model_dirs(model_dir)
        missing = sorted(set(datasets) - set(per_task)) if per_task else []
        if missing:
            raise ValueError(f"{str(model_dir)!r} has no model for task(s) {missing}; it has {sorted(per_task)}.")
        loaded = {}
        scores, num_samples = {}, {}
        for task, dataset in datasets.items():
            spec = data_config.tasks[task]
            directory = str(per_task[task]) if per_task else model_dir
            if directory not in loaded:
                model = load_artifact_model(directory, AutoModelForSequenceClassification).to(device)
                tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=is_artifact(model.config))
                loaded[directory] = model, tokenizer
            model, tokenizer = loaded[directory]
            extra = {"task": task} if is_artifact(model.config) else {}

            def logits_of(values, rows, model=model, tokenizer=tokenizer, spec=spec, extra=extra):
                texts = [spec.prefix + str(value) for value in values]
                inputs = tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(model.device)
                return model(**inputs, **extra).logits

            class_names = self.class_names(model, task, dataset, spec)
            scores[task], num_samples[task] = classification_accuracy(
                task, dataset, spec, class_names, logits_of, batch_size, "text"
            )
        return EvaluationResults(scores, dict.fromkeys(scores, "accuracy"), self.pipeline_tag, num_samples)

    def class_names(self, model, task: str, dataset, spec) -> list[str]:
        if is_artifact(model.config):
            check_tasks_known([task], list(model.config.tasks))
            return list(model.config.task_labels[task])
        return expert_labels(model.config) or class_names_of(dataset, spec)

    def card_usage(self, repo_id: str, task: str) -> str:
        return f"""```python
from transformers import AutoModel, AutoTokenizer, pipeline

model = AutoModel.from_pretrained("{repo_id}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{repo_id}", trust_remote_code=True)
logits = model(**tokenizer(["some text"], return_tensors="pt"), task="{task}").logits  # that task's classes

classify = pipeline("text-classification", model="{repo_id}", trust_remote_code=True)
classify("some text", task="{task}")
```"""


__all__ = ["BertBackbone"]
