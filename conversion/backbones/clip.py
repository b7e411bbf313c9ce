"""The CLIP family: a CLIP vision tower's experts, one zero-shot head per task built from the base's text tower.

Experts are `CLIPVisionModel`s or `CLIPModel`s, in either key layout (`vision_model.` prefix or none), full
fine-tunes or PEFT LoRA adapters. Only the vision tower is merged; its MLPs (`fc1`, `fc2`) are the experts. The
visual projection, the logit scale and the text tower are the base's, as in the paper.
"""

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    CLIPConfig,
    CLIPModel,
    CLIPProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.image_processing_utils import BaseImageProcessor
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.utils import is_torchvision_available

from modeling_wemoe import WEMoEConfig, WEMoEForImageClassification
from modeling_wemoe.modeling_wemoe import TASK_RECORD

from ..artifact import load_artifact_model, write_artifact
from ..backbone import Backbone, register_backbone
from ..checkpoints import (
    ModelSource,
    check_same_architecture,
    load_base_model,
    load_tokenizer,
    naming_load_errors,
)
from ..data import check_tasks_known, pixel_values_of
from ..results import EvaluationResults, class_names_of, classification_accuracy
from ..streams import StreamOutput, TaskStream, routed_layers

logger = logging.getLogger(__name__)

VISION_TOWER_ROOTS = ("embeddings", "pre_layrnorm", "encoder", "post_layernorm")
PROCESSOR_FILE = "preprocessor_config.json"

# A few of CLIP's ImageNet prompt templates; tasks may bring their own.
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a good photo of a {}.",
    "a close-up photo of a {}.",
)


@torch.no_grad()
def zero_shot_head(
    clip: CLIPModel,
    tokenizer: PreTrainedTokenizerBase,
    classnames: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
) -> torch.Tensor:
    """`(num_classes, projection_dim)` class embeddings: each class's prompts embedded by the text tower,
    L2-normalised, averaged over templates and normalised again."""
    texts = [template.format(name) for name in classnames for template in templates]
    inputs = tokenizer(
        texts,
        padding=True,
        truncation=True,
        max_length=clip.config.text_config.max_position_embeddings,
        return_tensors="pt",
    ).to(clip.device)
    embeddings = clip.get_text_features(**inputs).pooler_output
    embeddings = F.normalize(embeddings, dim=-1).view(len(classnames), len(templates), -1)
    head = F.normalize(embeddings.mean(dim=1), dim=-1)
    check_distinct_classes(head, classnames)
    return head


def check_distinct_classes(head: torch.Tensor, classnames: Sequence[str]) -> None:
    """Two classes with the same embedding can never be told apart: a tokenizer that reads their names alike (one
    with no vocabulary reads every name alike) would give a head whose logits are all equal."""
    similarity = head @ head.t()
    similarity.fill_diagonal_(-1.0)
    first, second = divmod(int(similarity.argmax()), len(classnames))
    if len(classnames) > 1 and similarity[first, second] > 1 - 1e-6:
        raise ValueError(
            f"Classes {classnames[first]!r} and {classnames[second]!r} get the same zero-shot embedding: the "
            "tokenizer reads their prompts alike, so the head could never tell them apart. Check the base model's "
            "tokenizer and the class names."
        )


def zero_shot_heads(
    clip: CLIPModel,
    tokenizer: PreTrainedTokenizerBase,
    classnames: Mapping[str, Sequence[str]],
    templates: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, torch.Tensor]:
    """Each task's head, with the task's own templates where given and CLIP's photo prompts otherwise."""
    templates = templates or {}
    heads = {}
    for task, names in tqdm(classnames.items(), desc="Building zero-shot heads", unit="task"):
        try:
            heads[task] = zero_shot_head(clip, tokenizer, names, templates.get(task, DEFAULT_TEMPLATES))
        except ValueError as error:
            raise ValueError(f"Task {task!r}: {error}") from None
    return heads


class ZeroShotCLIP(torch.nn.Module):
    """A plain `CLIPModel` as a per-task classifier: heads from its own text tower and the tasks' class names."""

    def __init__(
        self,
        clip: CLIPModel,
        tokenizer: PreTrainedTokenizerBase,
        classnames: Mapping[str, Sequence[str]],
        templates: Mapping[str, Sequence[str]] | None = None,
    ):
        super().__init__()
        self.clip = clip
        self.heads = zero_shot_heads(clip, tokenizer, classnames, templates)

    def forward(self, pixel_values: torch.Tensor, task: str) -> ImageClassifierOutput:
        image_embeds = F.normalize(self.clip.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)
        logits = self.clip.logit_scale.exp() * image_embeds @ self.heads[task].t()
        return ImageClassifierOutput(logits=logits)


def default_image_processor(vision_config: CLIPVisionConfig) -> BaseImageProcessor:
    """CLIP's preprocessing (resize, center crop, CLIP mean/std) at the tower's image size, on torchvision when it is
    installed and on PIL otherwise (naming the backend avoids transformers' fallback warning)."""
    if is_torchvision_available():
        from transformers import CLIPImageProcessor
    else:
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    size = vision_config.image_size
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def warn_on_ignored_expert_parts(clip: CLIPModel, expert: ModelSource, task: str) -> None:
    # Heads and projection come from the base model, as in the paper; say so when an expert changed them.
    if not isinstance(expert, CLIPModel):
        return
    if not torch.equal(expert.visual_projection.weight, clip.visual_projection.weight):
        logger.warning("Expert %r has a fine-tuned visual_projection; the base model's is used.", task)
    text_parts = ("text_model", "text_projection")
    expert_text = {k: v for k, v in expert.state_dict().items() if k.startswith(text_parts)}
    base_text = {k: v for k, v in clip.state_dict().items() if k.startswith(text_parts)}
    if any(not torch.equal(tensor, base_text[key]) for key, tensor in expert_text.items()):
        logger.warning("Expert %r has a fine-tuned text tower; the base model's builds the heads.", task)


class ImageTaskStream(TaskStream):
    """Images through the artifact's image processor; the entropy of the task's class distribution."""

    def __init__(self, dataset, spec, image_processor, batch_size: int, task: str):
        super().__init__(dataset, spec.image_column, batch_size, task)
        self.image_processor = image_processor
        self.corruption = spec.corruption

    def encode(self, values: list, rows: list[int]) -> dict[str, torch.Tensor]:
        return {"pixel_values": pixel_values_of(values, rows, self.image_processor, self.task, self.corruption)}

    def outputs(self, model, inputs: dict[str, torch.Tensor], routing: bool = False) -> StreamOutput:
        extra = {"output_routing_weights": True} if routing else {}
        output = model(**inputs, task=self.task, **extra)
        return StreamOutput(output.logits, routed_layers(getattr(output, "routing_weights", None)))


def check_merged_from(model: WEMoEForImageClassification, base: CLIPModel, base_source: ModelSource) -> None:
    """A head built with another base's text tower would live in another embedding space. A WEMoE artifact keeps its
    base's visual projection as it was, so that tells whether `base` is the one it was merged from."""
    projection = model.visual_projection.weight
    if not torch.equal(base.visual_projection.weight.to(projection.dtype), projection):
        raise ValueError(
            f"The base model {str(base_source)!r} is not the one this artifact was merged from: its visual projection "
            "differs from the artifact's, so its text tower would build heads for another embedding space. Give the "
            "artifact's base model (its merge_config.yaml's base_model)."
        )


def config_with_task(config: PreTrainedConfig, task: str, labels: list[str]) -> WEMoEConfig:
    """An artifact's config (as saved by any release) read by this release's `WEMoEConfig`, with one more task, which
    has no expert: the experts stay the tasks that had one."""
    fields = {key: value for key, value in config.to_dict().items() if key not in ("id2label", "label2id")}
    fields |= {
        "tasks": [*config.tasks, task],
        "task_labels": {**config.task_labels, task: list(labels)},
        "expert_tasks": getattr(config, "expert_tasks", None) or list(config.tasks),
    }
    return WEMoEConfig.from_dict(fields)


def vision_tower_key(checkpoint_key: str) -> str | None:
    """The vision-tower key of a checkpoint key in either CLIP layout, or None for anything else (text tower,
    projections, logit scale, and the non-persistent `position_ids` buffers older checkpoints carry)."""
    key = checkpoint_key.removeprefix("vision_model.")
    if key.split(".")[0] not in VISION_TOWER_ROOTS or key.endswith("position_ids"):
        return None
    return key


@register_backbone
class CLIPBackbone(Backbone):
    architecture = "clip"
    display_name = "CLIP"
    plain_model_types = ("clip", "clip_vision_model")
    partial_model_types = ("clip_vision_model",)
    model_class = WEMoEForImageClassification
    expert_linears = ("mlp.fc1", "mlp.fc2")
    input_kind = "image"
    pipeline_tag = "image-classification"
    labels_name = "classes"
    labels_required = True
    templates_allowed = True
    needs_tokenizer = True
    serves_tasks_without_experts = True
    # Fields that decide tensor shapes or the forward computation of a CLIP vision tower.
    architecture_fields = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_channels",
        "image_size",
        "patch_size",
        "hidden_act",
        "layer_norm_eps",
    )
    card_summary = (
        "A multi-task CLIP image classifier: {n} fine-tuned CLIP vision towers merged into one model, with one "
        "zero-shot head per task built from the base model's text tower."
    )

    def key_of(self, checkpoint_key: str) -> str | None:
        return vision_tower_key(checkpoint_key)

    def config_of(self, config: PreTrainedConfig) -> CLIPVisionConfig | None:
        if isinstance(config, CLIPConfig):
            return config.vision_config
        return config if isinstance(config, CLIPVisionConfig) else None

    def model_tensors(self, model: PreTrainedModel):
        if not isinstance(model, (CLIPModel, CLIPVisionModel)):
            return None
        tower = model.vision_model if isinstance(model, CLIPModel) else model
        return tower.state_dict(), tower.config

    def load_base(self, source: ModelSource) -> CLIPModel:
        """The base `CLIPModel`: its text tower builds the zero-shot heads."""
        return load_base_model(source, CLIPModel, "vision and text towers")

    def base_tensors(self, base: CLIPModel) -> Mapping[str, torch.Tensor]:
        return base.vision_model.state_dict()

    def wemoe_config_fields(self, base: CLIPModel) -> dict:
        return {"vision_config": base.config.vision_config.to_dict(), "projection_dim": base.config.projection_dim}

    def merge_target(self, model: WEMoEForImageClassification) -> torch.nn.Module:
        return model.vision_model

    @torch.no_grad()
    def finish(self, model, base, experts, expert_tensors, task_labels, tokenizer=None, templates=None) -> None:
        for task, source in experts.items():
            warn_on_ignored_expert_parts(base, source, task)
        model.visual_projection.weight.copy_(base.visual_projection.weight)
        model.logit_scale.copy_(base.logit_scale)
        heads = zero_shot_heads(base, tokenizer, {task: task_labels[task] for task in model.config.tasks}, templates)
        model.classifier.weight.copy_(torch.cat(list(heads.values())))

    @torch.no_grad()
    def with_task_without_expert(self, model, base, task, labels, templates) -> WEMoEForImageClassification:
        """A model of this release's code with `model`'s tensors and one more head row block, built as conversion
        builds every head; the routers keep their outputs (one per expert)."""
        clip = self.load_base(base)
        check_merged_from(model, clip, base)
        head = zero_shot_heads(clip, load_tokenizer(base), {task: labels}, {task: templates} if templates else None)
        config = config_with_task(model.config, task, labels)
        with torch.random.fork_rng(devices=[]):  # every tensor is overwritten below; the caller's RNG untouched
            extended = self.model_class(config).to(model.dtype)
        state = model.state_dict()
        state["classifier.weight"] = torch.cat([state["classifier.weight"], head[task].to(model.dtype)])
        state[TASK_RECORD] = extended.expected_task_record()
        extended.load_state_dict(state, strict=True)
        extended.freeze_all_but_routers()
        return extended.eval()

    def load_processor(self, source: ModelSource, config: PreTrainedConfig | None = None) -> BaseImageProcessor:
        """The model's own image processor when it has one, else CLIP's default at the tower's image size."""
        if isinstance(source, PreTrainedModel):
            return default_image_processor(self.config_of(source.config))
        try:
            with naming_load_errors(source, "The model"):
                return AutoImageProcessor.from_pretrained(source)
        except OSError as error:
            if (Path(source) / PROCESSOR_FILE).is_file():  # there, but unreadable: not the same as absent
                raise ValueError(f"{str(Path(source) / PROCESSOR_FILE)!r} cannot be read ({error}).") from None
            logger.warning("No image processor found with %s; using CLIP's default preprocessing.", source)
        config = config or CLIPConfig.from_pretrained(source)
        return default_image_processor(self.config_of(config) or config.vision_config)

    def static_processor(self, source: ModelSource, tokenizer=None) -> CLIPProcessor:
        return CLIPProcessor(image_processor=self.load_processor(source), tokenizer=tokenizer)

    def static_model(self, base: CLIPModel, merged, experts, expert_tensors, task_labels) -> CLIPModel:
        """A plain `CLIPModel`: the base with its vision tower replaced by the merge (text tower and projections stay
        the base's, which builds zero-shot heads as for WEMoE)."""
        base.vision_model.load_state_dict(merged)
        return base.eval()

    def write_static(self, static, directory, processor, *, extra_files, max_shard_size, dtype) -> None:
        write_artifact(static.to(dtype), directory, processor, extra_files=extra_files, max_shard_size=max_shard_size)

    def adamerging_classifier(self, base, task_labels, experts, expert_tensors, tokenizer=None, templates=None):
        return ZeroShotCLIP(base, tokenizer, task_labels, templates), "clip.vision_model."

    def task_stream(self, dataset, spec, processor, batch_size, task, labels) -> ImageTaskStream:
        return ImageTaskStream(dataset, spec, processor, batch_size, task)

    def evaluate(
        self, model_dir, datasets, data_config, batch_size, max_new_tokens, *, device, base=None
    ) -> EvaluationResults:
        """Accuracy of a WEMoE artifact, or of a plain `CLIPModel` zero-shot with the datasets' class names (a fine-tune
        saved as a bare `CLIPVisionModel` in its `base`, whose text tower builds the heads)."""
        model, class_names, image_processor = self.classifier_for(model_dir, datasets, data_config, device, base)
        device = next(model.parameters()).device

        def logits_of(task: str):
            corruption = data_config.tasks[task].corruption
            return lambda values, rows: model(
                pixel_values_of(values, rows, image_processor, task, corruption).to(device), task=task
            ).logits

        scores, num_samples = {}, {}
        for task, dataset in datasets.items():
            scores[task], num_samples[task] = classification_accuracy(
                task, dataset, data_config.tasks[task], class_names[task], logits_of(task), batch_size, "image"
            )
        return EvaluationResults(scores, dict.fromkeys(scores, "accuracy"), self.pipeline_tag, num_samples)

    def classifier_for(
        self, model_dir: str, datasets: Mapping, data_config, device: torch.device, base: str | None = None
    ) -> tuple[torch.nn.Module, dict[str, list[str]], BaseImageProcessor]:
        """The model to score, on `device`, each task's class names and the image processor: a WEMoE artifact as it
        is, or a plain CLIPModel (a bare vision tower in its `base`) with zero-shot heads from the datasets' ClassLabel
        names."""
        model = load_artifact_model(model_dir)
        if not isinstance(model, (CLIPModel, CLIPVisionModel)):
            check_tasks_known(list(datasets), list(model.config.tasks))
            return model.to(device), model.config.task_labels, self.load_processor(model_dir)
        class_names = {}
        for task, dataset in datasets.items():
            names = class_names_of(dataset, data_config.tasks[task])
            if names is None:
                raise ValueError(f"Task {task!r}: a plain CLIP model needs a ClassLabel label column for class names.")
            class_names[task] = names
        if isinstance(model, CLIPVisionModel):
            model, text_source, image_processor = self.tower_in_base(model, model_dir, base)
        else:
            text_source, image_processor = model_dir, self.load_processor(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(text_source)
        return ZeroShotCLIP(model.to(device), tokenizer, class_names), class_names, image_processor

    def tower_in_base(
        self, tower: CLIPVisionModel, model_dir: str, base: str | None
    ) -> tuple[CLIPModel, str, BaseImageProcessor]:
        """A fine-tuned vision tower saved alone (no text tower, no tokenizer), put in the CLIPModel it was fine-tuned
        from: `base`, else the base its config.json names (`_name_or_path`, which transformers 4 saved). Returns the
        model, the base (whose tokenizer reads the prompts) and the image processor (the tower's own, else the
        base's)."""
        named_by = "--base"
        if base is None:
            base, named_by = PreTrainedConfig.get_config_dict(model_dir)[0].get("_name_or_path"), "its config.json"
        if not base:
            raise ValueError(
                f"{model_dir!r} is a CLIPVisionModel (config.json: model_type 'clip_vision_model'): a vision tower "
                "without the text tower and tokenizer that build zero-shot heads, and its config.json names no base "
                "model (_name_or_path). Pass --base with the CLIP model it was fine-tuned from, e.g. "
                "--base openai/clip-vit-base-patch32."
            )
        logger.info("Scoring the vision tower %s in the base %s (named by %s)", model_dir, base, named_by)
        try:
            clip = self.load_base(base)
        except ValueError as error:
            raise ValueError(f"{model_dir!r} is scored in the base model that {named_by} names: {error}") from None
        check_same_architecture(clip.config.vision_config, tower.config, model_dir, self)
        clip.vision_model.load_state_dict(tower.state_dict())
        try:
            image_processor = AutoImageProcessor.from_pretrained(model_dir)
        except OSError:
            image_processor = self.load_processor(base)
        return clip, base, image_processor

    def card_usage(self, repo_id: str, task: str) -> str:
        return f"""```python
from transformers import AutoModel, pipeline

model = AutoModel.from_pretrained("{repo_id}", trust_remote_code=True)
logits = model(pixel_values, task="{task}").logits  # that task's classes only

classify = pipeline("image-classification", model="{repo_id}", trust_remote_code=True)
classify("image.jpg", task="{task}")  # that task's classes; without task, every task's best class
```"""
