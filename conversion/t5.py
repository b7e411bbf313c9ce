"""Building a WEMoE / E-WEMoE T5 (or Flan-T5) text-to-text model from a base T5 and fine-tuned experts (models in
memory, checkpoint directories, PEFT LoRA adapters or Hub ids; expert tensors streamed one at a time).

Keys are `T5ForConditionalGeneration`'s. The encoder's and decoder's `embed_tokens` are the `shared` embedding and
are not read separately. `lm_head.weight` is its own tensor only in an untied model (Flan-T5, T5 v1.1): the base
decides, and an expert that disagrees is an error rather than a silently dropped or invented head.
"""

import logging
from collections.abc import Mapping, Sequence

import torch
from transformers import PreTrainedConfig, PreTrainedModel, T5Config, T5ForConditionalGeneration

from modeling_wemoe import WEMoEConfig, WEMoEForConditionalGeneration

from .adamerging import train_layer_wise_merge
from .build import (
    check_experts_given,
    check_variant,
    fill_backbone,
    log_reconstruction_errors,
    open_experts,
    resolve_static_merge,
    static_merge_tensors,
    wemoe_options,
)
from .checkpoints import Backbone, InMemoryTensors, ModelSource, load_base_model
from .tta import load_task_datasets, task_streams

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


def t5_key(checkpoint_key: str) -> str | None:
    """The merge key of a T5 checkpoint key, or None for the stacks' copies of the shared embedding and unused
    tensors."""
    if checkpoint_key.endswith("embed_tokens.weight") or checkpoint_key in UNUSED_KEYS:
        return None
    return checkpoint_key


def lm_head_is_tied(model: PreTrainedModel) -> bool:
    return model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def t5_tensors(model: PreTrainedModel) -> tuple[dict[str, torch.Tensor], T5Config] | None:
    """An in-memory T5's tensors by merge key, `lm_head.weight` only when it is not the shared embedding."""
    if not isinstance(model, T5ForConditionalGeneration):
        return None
    tied = lm_head_is_tied(model)
    state = {
        key: tensor
        for key, tensor in model.state_dict().items()
        if t5_key(key) is not None and not (tied and key == LM_HEAD)
    }
    return state, model.config


def t5_config_of(config: PreTrainedConfig) -> T5Config | None:
    return config if isinstance(config, T5Config) else None


T5 = Backbone(
    name="T5",
    key_of=t5_key,
    config_of=t5_config_of,
    model_tensors=t5_tensors,
    architecture_fields=T5_ARCHITECTURE_FIELDS,
    tensor_hints={
        LM_HEAD: "The base model and this expert disagree on tying lm_head to the shared embedding: one has its own "
        "lm_head.weight (Flan-T5, T5 v1.1), the other reuses `shared` (original T5). Merge experts fine-tuned from "
        "the same base checkpoint."
    },
)


def load_t5_model(source: ModelSource) -> T5ForConditionalGeneration:
    return load_base_model(source, T5ForConditionalGeneration, "encoder-decoder with its LM head")


def check_label_words(experts: Mapping[str, object], label_words: Mapping[str, Sequence[str]] | None) -> None:
    if label_words is None:
        return
    unknown = sorted(set(label_words) - set(experts))
    if unknown:
        raise ValueError(f"`label_words` names tasks without an expert: {unknown}; experts: {sorted(experts)}.")
    empty = [task for task, words in label_words.items() if not words]
    if empty:
        raise ValueError(f"`label_words` has an empty list for task(s) {empty}.")


def merge_t5(
    base: ModelSource,
    experts: Mapping[str, ModelSource],
    *,
    label_words: Mapping[str, Sequence[str]] | None = None,
    variant: str = "wemoe",
    keep: float = 0.1,
    expert_format: str | None = None,
    rank: int | None = None,
    init_lambda: float = 0.3,
    scaling: float = 0.3,
    router_hidden_layers: int = 2,
    router_top_k: int | None = None,
    granularity: str = "sample",
    static_merge: Mapping | None = None,
) -> WEMoEForConditionalGeneration:
    """Merge fine-tuned T5 / Flan-T5 models into one WEMoE (or E-WEMoE) text-to-text model.

    Args:
        base: the pre-trained `T5ForConditionalGeneration`, or its local directory / Hub id.
        experts: task name -> fine-tuned `T5ForConditionalGeneration` in memory, or a directory / Hub id holding a
            full fine-tune (safetensors or `.bin`) or a PEFT LoRA adapter; in expert order.
        label_words: task name -> the words the task answers with (e.g. `["negative", "positive"]`); test-time
            adaptation then restricts its entropy to them. Tasks left out adapt on the whole vocabulary.
        variant, keep, expert_format, rank, init_lambda, scaling, static_merge, router_hidden_layers, router_top_k:
            as for `merge_clip`.
        granularity: encoder routing, `"sample"` (one vector per prompt, padding excluded) or `"token"`; the decoder
            always routes per token.

    Returns:
        A `WEMoEForConditionalGeneration` in eval mode whose only trainable parameters are the routers; at init it
        equals task arithmetic with coefficient `init_lambda` on the feed-forward blocks.

    Example:

    ```python
    >>> from conversion import merge_t5
    >>> model = merge_t5(
    ...     "google/flan-t5-base",
    ...     {"sst2": "tanganke/flan-t5-base_glue-sst2", "qqp": "tanganke/flan-t5-base_glue-qqp"},
    ...     label_words={"sst2": ["negative", "positive"], "qqp": ["not_duplicate", "duplicate"]},
    ...     variant="e-wemoe",
    ... )
    ```
    """
    check_variant(variant)
    check_experts_given(experts)
    check_label_words(experts, label_words)
    static_merge = resolve_static_merge(static_merge, scaling)
    t5 = load_t5_model(base)
    base_state, _ = t5_tensors(t5)
    base_tensors = InMemoryTensors(base_state, "The base model")
    expert_tensors = open_experts(base_tensors, t5.config, experts, T5)

    config = WEMoEConfig(
        text_config=t5.config.to_dict(),
        tie_word_embeddings=LM_HEAD not in base_tensors,
        tasks=list(experts),
        task_labels={task: list(words) for task, words in label_words.items()} if label_words else None,
        init_lambda=init_lambda,
        router_hidden_layers=router_hidden_layers,
        router_top_k=router_top_k,
        routing_granularity=granularity,
        **wemoe_options(variant, expert_format, keep, rank, static_merge),
    )
    model = WEMoEForConditionalGeneration(config)
    logger.info("Merging %d T5 experts into a %s model (%s).", len(experts), variant, ", ".join(experts))
    reconstruction_errors = fill_backbone(model, base_tensors, expert_tensors, config)
    log_reconstruction_errors(reconstruction_errors, rank)
    model.generation_config = t5.generation_config
    model.freeze_all_but_routers()
    return model.eval()


def merge_static_t5(
    base: ModelSource,
    experts: Mapping[str, ModelSource],
    static_merge: Mapping,
    *,
    label_words: Mapping[str, Sequence[str]] | None = None,
    data=None,
    tokenizer=None,
) -> T5ForConditionalGeneration:
    """A plain `T5ForConditionalGeneration` whose every tensor is a static merge of the experts': the baseline WEMoE
    is compared with. `static_merge` as for `merge_static_clip`; AdaMerging trains on the unlabeled prompts `data`
    names (through `tokenizer`), with the entropy restricted to each task's `label_words` where given."""
    check_experts_given(experts)
    check_label_words(experts, label_words)
    t5 = load_t5_model(base)
    base_state, _ = t5_tensors(t5)
    base_tensors = InMemoryTensors(base_state, "The base model")
    expert_tensors = open_experts(base_tensors, t5.config, experts, T5)
    logger.info("Merging %d T5 experts by %s (%s).", len(experts), static_merge["method"], ", ".join(experts))
    if static_merge["method"] == "adamerging":
        if data is None or tokenizer is None:
            raise ValueError("static_merge adamerging needs `data` (unlabeled task prompts) and the `tokenizer`.")
        batch_size = static_merge.get("batch_size", 16)
        datasets = load_task_datasets(data, list(experts), is_text=True)
        streams = task_streams(datasets, tokenizer, batch_size, is_text=True, label_words=label_words)
        merged = train_layer_wise_merge(t5, "", base_tensors, expert_tensors, streams, static_merge)
    else:
        merged = static_merge_tensors(base_tensors, expert_tensors, static_merge)
    result = t5.load_state_dict(merged, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"Merged tensors the base does not have: {result.unexpected_keys}.")
    return t5.eval()
