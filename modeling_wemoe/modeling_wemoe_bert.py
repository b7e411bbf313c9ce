"""WEMoE for BERT-style text classifiers: the encoder's feed-forward blocks are WEMoE blocks, and every task keeps
its own fine-tuned pooler and classifier (the E-WEMoE paper's per-task heads).

The encoder keeps `BertModel`'s parameter names (`embeddings.*`, `encoder.layer.{i}.*`) under `bert.`; each layer's
`intermediate.dense` and `output.dense` are weight-ensembled under one routing vector per sample, computed from the
attention block's output (the hidden states entering the feed-forward block) averaged over the sample's real
tokens. Embeddings, attention and the post-LayerNorm residual blocks follow transformers' `BertEmbeddings`,
`BertSelfAttention`, `BertSelfOutput`, `BertIntermediate`, `BertOutput` and `BertPooler` (copied rather than
imported, so that an artifact does not break when transformers changes BERT's internals). Absolute position
embeddings only.

Shipped inside BERT artifacts, next to the shared `modeling_wemoe.py` and `configuration_wemoe.py` and the
`text-classification` pipeline (`pipeline_wemoe_text_classification.py`, `pipeline_wemoe_classification.py`).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import SequenceClassifierOutput

from .configuration_wemoe import WEMoEConfig
from .modeling_wemoe import (
    WEMoEPreTrainedModel,
    WEMoERouter,
    apply_linear,
    attention,
    build_router,
    compute_routing_weights,
    group_linear,
    padding_mask,
    register_wemoe_model,
    returned_attentions,
)
from .pipeline_wemoe_text_classification import WEMoETextClassificationPipeline


class WEMoEBertEmbeddings(nn.Module):
    """Word, learned absolute position and token type embeddings, summed and normalised (follows
    `BertEmbeddings`)."""

    def __init__(self, text_config: PreTrainedConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(
            text_config.vocab_size, text_config.hidden_size, padding_idx=text_config.pad_token_id
        )
        self.position_embeddings = nn.Embedding(text_config.max_position_embeddings, text_config.hidden_size)
        self.token_type_embeddings = nn.Embedding(text_config.type_vocab_size, text_config.hidden_size)
        self.LayerNorm = nn.LayerNorm(text_config.hidden_size, eps=text_config.layer_norm_eps)
        self.dropout = nn.Dropout(text_config.hidden_dropout_prob)
        self.register_buffer(
            "position_ids", torch.arange(text_config.max_position_embeddings).expand((1, -1)), persistent=False
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        seq_length = inputs_embeds.shape[1]
        if position_ids is None:
            position_ids = self.position_ids[:, :seq_length]
        if token_type_ids is None:
            token_type_ids = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        embeddings = inputs_embeds + self.token_type_embeddings(token_type_ids) + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(embeddings))


class WEMoEBertSelfAttention(nn.Module):
    """Multi-head self-attention (follows `BertSelfAttention`); its projections are weight-ensembled when the config
    upscales attention."""

    def __init__(self, config: WEMoEConfig):
        super().__init__()
        text_config = config.text_config
        self.config = config  # read at every call: `set_attn_implementation` may change it after loading
        self.num_attention_heads = text_config.num_attention_heads
        self.attention_head_size = text_config.hidden_size // text_config.num_attention_heads
        all_head_size = self.num_attention_heads * self.attention_head_size
        self.query = group_linear(config, "attention", text_config.hidden_size, all_head_size)
        self.key = group_linear(config, "attention", text_config.hidden_size, all_head_size)
        self.value = group_linear(config, "attention", text_config.hidden_size, all_head_size)
        self.dropout = text_config.attention_probs_dropout_prob

    def forward(
        self, hidden_states: torch.Tensor, bias: torch.Tensor | None, routing_weights: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.attention_head_size)
        query = apply_linear(self.query, hidden_states, routing_weights).view(hidden_shape).transpose(1, 2)
        key = apply_linear(self.key, hidden_states, routing_weights).view(hidden_shape).transpose(1, 2)
        value = apply_linear(self.value, hidden_states, routing_weights).view(hidden_shape).transpose(1, 2)
        output, weights = attention(
            query,
            key,
            value,
            bias,
            scaling=self.attention_head_size**-0.5,
            dropout=self.dropout if self.training else 0.0,
            implementation=self.config._attn_implementation,
        )
        return output.reshape(*input_shape, -1), weights


class WEMoEBertSelfOutput(nn.Module):
    """Projection, dropout and the post-LayerNorm residual of the attention block (follows `BertSelfOutput`)."""

    def __init__(self, config: WEMoEConfig):
        super().__init__()
        text_config = config.text_config
        self.dense = group_linear(config, "attention", text_config.hidden_size, text_config.hidden_size)
        self.LayerNorm = nn.LayerNorm(text_config.hidden_size, eps=text_config.layer_norm_eps)
        self.dropout = nn.Dropout(text_config.hidden_dropout_prob)

    def forward(
        self, hidden_states: torch.Tensor, input_tensor: torch.Tensor, routing_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        projected = apply_linear(self.dense, hidden_states, routing_weights)
        return self.LayerNorm(self.dropout(projected) + input_tensor)


class WEMoEBertAttention(nn.Module):
    def __init__(self, config: WEMoEConfig):
        super().__init__()
        self.self = WEMoEBertSelfAttention(config)
        self.output = WEMoEBertSelfOutput(config)

    def forward(
        self, hidden_states: torch.Tensor, bias: torch.Tensor | None, routing_weights: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        context, weights = self.self(hidden_states, bias, routing_weights)
        return self.output(context, hidden_states, routing_weights), weights


class WEMoEBertIntermediate(nn.Module):
    """The feed-forward block's first linear (weight-ensembled when the MLP is upscaled) and its activation."""

    def __init__(self, config: WEMoEConfig):
        super().__init__()
        text_config = config.text_config
        self.dense = group_linear(config, "mlp", text_config.hidden_size, text_config.intermediate_size)
        self.intermediate_act_fn = ACT2FN[text_config.hidden_act]

    def forward(self, hidden_states: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(apply_linear(self.dense, hidden_states, routing_weights))


class WEMoEBertOutput(nn.Module):
    """The feed-forward block's second linear (weight-ensembled when the MLP is upscaled), with dropout and the
    post-LayerNorm residual."""

    def __init__(self, config: WEMoEConfig):
        super().__init__()
        text_config = config.text_config
        self.dense = group_linear(config, "mlp", text_config.intermediate_size, text_config.hidden_size)
        self.LayerNorm = nn.LayerNorm(text_config.hidden_size, eps=text_config.layer_norm_eps)
        self.dropout = nn.Dropout(text_config.hidden_dropout_prob)

    def forward(
        self, hidden_states: torch.Tensor, input_tensor: torch.Tensor, routing_weights: torch.Tensor
    ) -> torch.Tensor:
        return self.LayerNorm(self.dropout(apply_linear(self.dense, hidden_states, routing_weights)) + input_tensor)


@dataclass
class WEMoEBertLayerOutput:
    hidden_states: torch.Tensor
    routing_weights: torch.Tensor
    attention_weights: torch.Tensor | None


class WEMoEBertLayer(nn.Module):
    """A BERT layer (attention, then a feed-forward block, each with a post-LayerNorm residual) with WEMoE blocks: one
    routing vector per layer, read from the attention block's output (the paper's MLP-only upscaling) or, when
    attention is upscaled, from the layer's input."""

    def __init__(self, config: WEMoEConfig):
        super().__init__()
        self.routes_attention = "attention" in config.upscaled_groups
        self.granularity = config.routing_granularity
        self.top_k = config.router_top_k
        self.attention = WEMoEBertAttention(config)
        self.intermediate = WEMoEBertIntermediate(config)
        self.output = WEMoEBertOutput(config)
        self.router = build_router(config, config.text_config.hidden_size, "per_layer")

    def forward(
        self,
        hidden_states: torch.Tensor,
        bias: torch.Tensor | None,
        token_mask: torch.Tensor | None,
        shared_router: WEMoERouter | None = None,
    ) -> WEMoEBertLayerOutput:
        router = self.router if self.router is not None else shared_router
        routing_weights = None
        if self.routes_attention:
            routing_weights = compute_routing_weights(router, hidden_states, self.granularity, token_mask, self.top_k)
        attention_output, attention_weights = self.attention(hidden_states, bias, routing_weights)
        if routing_weights is None:
            routing_weights = compute_routing_weights(
                router, attention_output, self.granularity, token_mask, self.top_k
            )
        intermediate = self.intermediate(attention_output, routing_weights)
        layer_output = self.output(intermediate, attention_output, routing_weights)
        return WEMoEBertLayerOutput(layer_output, routing_weights, attention_weights)


@dataclass
class WEMoEBertEncoderOutput:
    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...]
    routing_weights: tuple[torch.Tensor, ...]
    attentions: tuple[torch.Tensor | None, ...]


class WEMoEBertEncoder(nn.Module):
    def __init__(self, config: WEMoEConfig):
        super().__init__()
        self.layer = nn.ModuleList([WEMoEBertLayer(config) for _ in range(config.text_config.num_hidden_layers)])

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        shared_router: WEMoERouter | None = None,
    ) -> WEMoEBertEncoderOutput:
        # Routing averages over real tokens only, so a sample's routing never depends on its padding.
        bias = padding_mask(attention_mask, hidden_states.dtype)
        all_hidden_states, all_routing_weights, all_attentions = (hidden_states,), (), ()
        for layer in self.layer:
            output = layer(hidden_states, bias, attention_mask, shared_router)
            hidden_states = output.hidden_states
            all_hidden_states += (hidden_states,)
            all_routing_weights += (output.routing_weights,)
            all_attentions += (output.attention_weights,)
        return WEMoEBertEncoderOutput(hidden_states, all_hidden_states, all_routing_weights, all_attentions)


class WEMoEBertModel(nn.Module):
    """BERT's embeddings and encoder (same parameter names as `BertModel`, without its pooler: each task has its
    own)."""

    def __init__(self, config: WEMoEConfig):
        super().__init__()
        self.embeddings = WEMoEBertEmbeddings(config.text_config)
        self.encoder = WEMoEBertEncoder(config)

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        attention_mask: torch.Tensor | None,
        token_type_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor | None,
        shared_router: WEMoERouter | None = None,
    ) -> WEMoEBertEncoderOutput:
        embeddings = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)
        return self.encoder(embeddings, attention_mask, shared_router=shared_router)


class WEMoEBertPooler(nn.Module):
    """The first token's hidden state through a dense layer and tanh (follows `BertPooler`)."""

    def __init__(self, text_config: PreTrainedConfig):
        super().__init__()
        self.dense = nn.Linear(text_config.hidden_size, text_config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden_states[:, 0]))


class WEMoEBertHead(nn.Module):
    """One task's head, as its fine-tuned `BertForSequenceClassification` has it: pooler, dropout, classifier."""

    def __init__(self, text_config: PreTrainedConfig, num_labels: int):
        super().__init__()
        self.pooler = WEMoEBertPooler(text_config)
        dropout = text_config.classifier_dropout
        self.dropout = nn.Dropout(text_config.hidden_dropout_prob if dropout is None else dropout)
        self.classifier = nn.Linear(text_config.hidden_size, num_labels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.pooler(hidden_states)))


@dataclass
class WEMoESequenceClassifierOutput(SequenceClassifierOutput):
    r"""
    loss (`torch.FloatTensor` of shape `(1,)`, *optional*, returned when `labels` is provided):
        Cross-entropy over the returned logits.
    logits (`torch.FloatTensor` of shape `(batch_size, num_classes)`):
        The logits of `task`'s head, or every task's heads side by side (matching `config.id2label`).
    hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
        The embeddings output and every layer's output, each `(batch_size, seq_len, hidden_size)`.
    attentions (`tuple(torch.FloatTensor)`, *optional*, returned when `output_attentions=True` with eager attention):
        Every layer's attention probabilities, each `(batch_size, num_heads, seq_len, seq_len)`.
    routing_weights (`tuple(torch.FloatTensor)`, *optional*, returned when `output_routing_weights=True`):
        Per layer, the routing weights used: `(batch_size, num_experts)` per sample or
        `(batch_size, seq_len, num_experts)` per token.
    """

    routing_weights: tuple[torch.FloatTensor, ...] | None = None


@register_wemoe_model
class WEMoEForSequenceClassification(WEMoEPreTrainedModel):
    """A BERT encoder with WEMoE feed-forward blocks, everything else merged statically, and one head (pooler and
    classifier) per task taken from that task's fine-tuned model.

    `model(input_ids, attention_mask, task="sst2").logits` are that task's classes; without `task`, every task's
    heads side by side, labelled `"<task>: <class>"` in `config.id2label`.
    """

    backbone = "bert"
    labels_in_tensors = True  # the heads are the tasks' classes, in order
    main_input_name = "input_ids"
    artifact_pipelines = {
        "text-classification": {
            "impl": f"pipeline_wemoe_text_classification.{WEMoETextClassificationPipeline.__name__}",
            "pt": ["AutoModelForSequenceClassification"],
            "type": "text",
        }
    }
    _no_split_modules = ["WEMoEBertLayer"]

    def __init__(self, config: WEMoEConfig):
        super().__init__(config)
        text_config = config.text_config
        position_embedding_type = getattr(text_config, "position_embedding_type", "absolute")
        if position_embedding_type != "absolute":
            raise ValueError(
                f"WEMoEForSequenceClassification supports absolute position embeddings only; text_config has "
                f"position_embedding_type {position_embedding_type!r}."
            )
        unlabelled = [task for task in config.tasks if not (config.task_labels or {}).get(task)]
        if unlabelled:
            raise ValueError(
                f"WEMoEForSequenceClassification needs `task_labels` for every task; missing {unlabelled}."
            )
        self.bert = WEMoEBertModel(config)
        self.heads = nn.ModuleList([WEMoEBertHead(text_config, len(config.task_labels[task])) for task in config.tasks])
        self.router = build_router(config, text_config.hidden_size, "shared")
        self.post_init()
        self.freeze_all_but_routers()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, WEMoEBertEmbeddings):
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))

    def get_input_embeddings(self) -> nn.Embedding:
        return self.bert.embeddings.word_embeddings

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.bert.embeddings.word_embeddings = new_embeddings

    def task_index(self, task: str) -> int:
        if task not in self.config.tasks:
            raise ValueError(f"Unknown task {task!r}: this model has tasks {list(self.config.tasks)}.")
        return self.config.tasks.index(task)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        task: str | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_routing_weights: bool = False,
        return_dict: bool | None = None,
    ) -> WEMoESequenceClassifierOutput | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`):
                Tokenized texts, as the artifact's tokenizer gives them; pad anywhere the attention mask says.
            task (`str`, *optional*):
                Return only this task's classes (its own head). Without it, every task's heads side by side.
            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Class indices within the returned logits; a cross-entropy loss is returned with them.
            output_routing_weights (`bool`, *optional*, defaults to `False`):
                Return every layer's routing weights, for analysis.

        Example:

        ```python
        >>> from transformers import AutoModel, AutoTokenizer
        >>> model = AutoModel.from_pretrained("path/to/wemoe-bert", trust_remote_code=True)
        >>> tokenizer = AutoTokenizer.from_pretrained("path/to/wemoe-bert", trust_remote_code=True)
        >>> inputs = tokenizer(["a gorgeous, witty movie."], return_tensors="pt")
        >>> model(**inputs, task="sst2").logits.softmax(-1)
        ```
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Give exactly one of `input_ids` and `inputs_embeds`.")
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        encoded = self.bert(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, self.router)
        heads = [self.heads[self.task_index(task)]] if task is not None else self.heads
        logits = torch.cat([head(encoded.last_hidden_state) for head in heads], dim=-1)

        loss = F.cross_entropy(logits, labels.to(logits.device)) if labels is not None else None
        output = WEMoESequenceClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=encoded.hidden_states if output_hidden_states else None,
            attentions=returned_attentions(self.config, output_attentions, encoded.attentions),
            routing_weights=encoded.routing_weights if output_routing_weights else None,
        )
        return output if return_dict else output.to_tuple()


WEMoEForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = ["WEMoEBertLayer", "WEMoEForSequenceClassification", "WEMoESequenceClassifierOutput"]
