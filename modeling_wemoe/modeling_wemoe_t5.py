"""WEMoE for T5 / Flan-T5: a text-to-text model whose encoder and decoder feed-forward blocks are WEMoE blocks.

Parameter names match `T5ForConditionalGeneration`. The layer norm, the attention with its relative position bias
and its KV cache follow transformers' `T5LayerNorm`, `T5Attention`, `T5LayerSelfAttention` and
`T5LayerCrossAttention` (copied rather than imported: transformers 5.24 changed how those layers take the cache, and
an artifact's code must keep working across such changes). Only the public `Cache` / `EncoderDecoderCache` API and
`GenerationMixin` are used. transformers 5.24 renamed the KV cache from `past_key_values` to `cache`: the model takes
either, and returns it under the installed version's name, the one `generate()` reads.

Shipped inside T5 artifacts, next to the shared `modeling_wemoe.py`, `configuration_wemoe.py` and `pipeline_wemoe.py`.
"""

import copy
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from packaging import version
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput
from transformers.utils import ModelOutput

from .configuration_wemoe import WEMoEConfig
from .modeling_wemoe import (
    WEMoEPreTrainedModel,
    WEMoERouter,
    additive_mask,
    apply_linear,
    attention,
    build_router,
    compute_routing_weights,
    group_linear,
    masked_mean,
    padding_mask,
    register_wemoe_model,
    returned_attentions,
)
from .pipeline_wemoe import WEMoEText2TextGenerationPipeline


class WEMoET5LayerNorm(nn.Module):
    """T5's RMS norm: scale only, no mean subtraction, no bias; variance in float32 (follows `T5LayerNorm`)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states


def relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucketing of `memory_position - query_position`: exact buckets for small distances, logarithmic ones up
    to `max_distance`, and one bucket beyond (Mesh TensorFlow's `_relative_position_bucket`)."""
    relative_buckets = 0
    if bidirectional:
        num_buckets //= 2
        relative_buckets += (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    log_ratio = torch.log(relative_position.float() / max_exact) / math.log(max_distance / max_exact)
    relative_position_if_large = max_exact + (log_ratio * (num_buckets - max_exact)).to(torch.long)
    relative_position_if_large = torch.min(
        relative_position_if_large, torch.full_like(relative_position_if_large, num_buckets - 1)
    )
    return relative_buckets + torch.where(is_small, relative_position, relative_position_if_large)


class WEMoET5Attention(nn.Module):
    """T5 attention (follows `T5Attention`): unscaled dot products plus an additive bias that carries the relative
    positions and the masks. Self-attention appends to the KV cache; cross-attention projects the encoder output
    once per generation and reads it from the cache afterwards. With attention upscaled, its projections are
    weight-ensembled: the query and output by the layer's routing weights, the key and value by `source_routing`,
    the routing of what they read (the prompt's, in cross-attention)."""

    def __init__(
        self,
        config: WEMoEConfig,
        text_config: PreTrainedConfig,
        has_relative_attention_bias: bool = False,
        layer_idx: int | None = None,
    ):
        super().__init__()
        self.config = config  # read at every call: `set_attn_implementation` may change it after loading
        self.is_decoder = text_config.is_decoder
        self.has_relative_attention_bias = has_relative_attention_bias
        self.relative_attention_num_buckets = text_config.relative_attention_num_buckets
        self.relative_attention_max_distance = text_config.relative_attention_max_distance
        self.key_value_proj_dim = text_config.d_kv
        self.n_heads = text_config.num_heads
        self.dropout = text_config.dropout_rate
        self.layer_idx = layer_idx
        inner_dim = self.n_heads * self.key_value_proj_dim
        self.q = group_linear(config, "attention", text_config.d_model, inner_dim, bias=False)
        self.k = group_linear(config, "attention", text_config.d_model, inner_dim, bias=False)
        self.v = group_linear(config, "attention", text_config.d_model, inner_dim, bias=False)
        self.o = group_linear(config, "attention", inner_dim, text_config.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(self.relative_attention_num_buckets, self.n_heads)

    def compute_bias(self, query_length: int, key_length: int, past_length: int = 0) -> torch.Tensor:
        """The learned relative position bias `(1, heads, query_length, key_length)`; queries start at `past_length`."""
        device = self.relative_attention_bias.weight.device
        context_position = torch.arange(query_length, dtype=torch.long, device=device)[:, None] + past_length
        memory_position = torch.arange(key_length, dtype=torch.long, device=device)[None, :]
        buckets = relative_position_bucket(
            memory_position - context_position,
            bidirectional=not self.is_decoder,
            num_buckets=self.relative_attention_num_buckets,
            max_distance=self.relative_attention_max_distance,
        )
        return self.relative_attention_bias(buckets).permute([2, 0, 1]).unsqueeze(0)

    def forward(
        self,
        hidden_states: torch.Tensor,
        bias: torch.Tensor | None,
        key_value_states: torch.Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
        routing_weights: torch.Tensor | None = None,
        source_routing: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        query = apply_linear(self.q, hidden_states, routing_weights)
        query = query.view(*input_shape, -1, self.key_value_proj_dim).transpose(1, 2)
        is_cross_attention = key_value_states is not None
        if is_cross_attention and cache is not None and cache.is_updated.get(self.layer_idx):
            cached = cache.cross_attention_cache.layers[self.layer_idx]
            key, value = cached.keys, cached.values
        else:
            source = key_value_states if is_cross_attention else hidden_states
            source_routing = source_routing if is_cross_attention else routing_weights
            kv_shape = (*source.shape[:-1], -1, self.key_value_proj_dim)
            key = apply_linear(self.k, source, source_routing).view(kv_shape).transpose(1, 2)
            value = apply_linear(self.v, source, source_routing).view(kv_shape).transpose(1, 2)
            if cache is not None:
                layer_cache = cache.cross_attention_cache if is_cross_attention else cache.self_attention_cache
                key, value = layer_cache.update(key, value, self.layer_idx)
                if is_cross_attention:
                    cache.is_updated[self.layer_idx] = True
        output, weights = attention(
            query,
            key,
            value,
            bias,
            scaling=1.0,  # T5 folds the scale into its initialisation
            dropout=self.dropout if self.training else 0.0,
            implementation=self.config._attn_implementation,
        )
        return apply_linear(self.o, output.reshape(*input_shape, -1), routing_weights), weights


class WEMoET5LayerSelfAttention(nn.Module):
    """Pre-norm self-attention with a residual connection (follows `T5LayerSelfAttention`)."""

    def __init__(
        self, config: WEMoEConfig, text_config: PreTrainedConfig, has_relative_attention_bias: bool, layer_idx: int
    ):
        super().__init__()
        self.SelfAttention = WEMoET5Attention(config, text_config, has_relative_attention_bias, layer_idx)
        self.layer_norm = WEMoET5LayerNorm(text_config.d_model, eps=text_config.layer_norm_epsilon)
        self.dropout = nn.Dropout(text_config.dropout_rate)

    def forward(
        self,
        hidden_states: torch.Tensor,
        bias: torch.Tensor | None,
        cache: EncoderDecoderCache | None = None,
        routing_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        normed = self.layer_norm(hidden_states)
        attention_output, weights = self.SelfAttention(normed, bias, cache=cache, routing_weights=routing_weights)
        return hidden_states + self.dropout(attention_output), weights


class WEMoET5LayerCrossAttention(nn.Module):
    """Pre-norm attention over the encoder output with a residual connection (follows `T5LayerCrossAttention`)."""

    def __init__(self, config: WEMoEConfig, text_config: PreTrainedConfig, layer_idx: int):
        super().__init__()
        self.EncDecAttention = WEMoET5Attention(config, text_config, False, layer_idx)
        self.layer_norm = WEMoET5LayerNorm(text_config.d_model, eps=text_config.layer_norm_epsilon)
        self.dropout = nn.Dropout(text_config.dropout_rate)

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor,
        bias: torch.Tensor | None,
        cache: EncoderDecoderCache | None = None,
        routing_weights: torch.Tensor | None = None,
        source_routing: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        normed = self.layer_norm(hidden_states)
        attention_output, weights = self.EncDecAttention(
            normed, bias, key_value_states, cache, routing_weights=routing_weights, source_routing=source_routing
        )
        return hidden_states + self.dropout(attention_output), weights


def clamp_inf_for_fp16(hidden_states: torch.Tensor) -> torch.Tensor:
    """T5's guard against fp16 overflow in the residual stream (a no-op in other dtypes)."""
    if hidden_states.dtype != torch.float16:
        return hidden_states
    finfo = torch.finfo(hidden_states.dtype)
    clamp_value = torch.where(torch.isinf(hidden_states).any(), finfo.max - 1000, finfo.max)
    return torch.clamp(hidden_states, min=-clamp_value, max=clamp_value)


class WEMoET5DenseActDense(nn.Module):
    """T5's feed-forward, `wo(act(wi x))` or gated `wo(act(wi_0 x) * wi_1 x)` (Flan-T5, T5 v1.1), with every linear
    weight-ensembled under one routing vector when the MLP is upscaled (the paper). Parameter names match T5's
    `DenseReluDense`."""

    def __init__(self, config: WEMoEConfig, text_config: PreTrainedConfig):
        super().__init__()
        self.is_gated = text_config.is_gated_act
        d_model, d_ff = text_config.d_model, text_config.d_ff
        if self.is_gated:
            self.wi_0 = group_linear(config, "mlp", d_model, d_ff, bias=False)
            self.wi_1 = group_linear(config, "mlp", d_model, d_ff, bias=False)
        else:
            self.wi = group_linear(config, "mlp", d_model, d_ff, bias=False)
        self.wo = group_linear(config, "mlp", d_ff, d_model, bias=False)
        self.dropout = nn.Dropout(text_config.dropout_rate)
        self.act = ACT2FN[text_config.dense_act_fn]

    def forward(self, hidden_states: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        if self.is_gated:
            gate = self.act(apply_linear(self.wi_0, hidden_states, routing_weights))
            activated = gate * apply_linear(self.wi_1, hidden_states, routing_weights)
        else:
            activated = self.act(apply_linear(self.wi, hidden_states, routing_weights))
        return apply_linear(self.wo, self.dropout(activated), routing_weights)


class WEMoET5LayerFF(nn.Module):
    """T5's pre-norm feed-forward sub-layer with a WEMoE `DenseReluDense` and the block's router.

    `granularity` says what the router reads (`route`): `"sample"` / `"token"` the hidden states it is given (one
    routing vector per sample, averaged over its real tokens, or per token): those entering this block, or, when
    attention is upscaled, those entering the self-attention; `"prompt"` (decoder only) the pooled encoder output
    of the sample's prompt, one routing vector per sample for every decoded token."""

    def __init__(self, config: WEMoEConfig, text_config: PreTrainedConfig, granularity: str):
        super().__init__()
        self.granularity = granularity
        self.top_k = config.router_top_k
        self.DenseReluDense = WEMoET5DenseActDense(config, text_config)
        self.layer_norm = WEMoET5LayerNorm(text_config.d_model, eps=text_config.layer_norm_epsilon)
        self.dropout = nn.Dropout(text_config.dropout_rate)
        self.router = build_router(config, text_config.d_model, "per_layer")

    def route(
        self,
        normed: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        shared_router: WEMoERouter | None = None,
        prompt_states: torch.Tensor | None = None,
        granularity: str | None = None,
    ) -> torch.Tensor:
        router = self.router if self.router is not None else shared_router
        if (granularity or self.granularity) == "prompt":
            # The pooled prompt `(batch, d)` as a one-token sequence: one routing vector `(batch, experts)` per sample.
            return compute_routing_weights(router, prompt_states.unsqueeze(1), "sample", top_k=self.top_k)
        return compute_routing_weights(router, normed, self.granularity, token_mask, self.top_k)

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        shared_router: WEMoERouter | None = None,
        prompt_states: torch.Tensor | None = None,
        routing_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        normed = self.layer_norm(hidden_states)
        if routing_weights is None:
            routing_weights = self.route(normed, token_mask, shared_router, prompt_states)
        forwarded = self.DenseReluDense(normed, routing_weights)
        return hidden_states + self.dropout(forwarded), routing_weights


@dataclass
class WEMoET5BlockOutput:
    hidden_states: torch.Tensor
    routing_weights: torch.Tensor
    self_attention_weights: torch.Tensor | None
    cross_attention_weights: torch.Tensor | None


class WEMoET5Block(nn.Module):
    """A T5 block (self-attention, cross-attention in the decoder, feed-forward) with WEMoE blocks: one routing
    vector per block from its router, read before the feed-forward block (the paper's MLP-only upscaling) or, when
    attention is upscaled, before the self-attention. A decoder routed per token routes its cross-attention's key
    and value projections, which read the prompt, by the prompt (`WEMoET5LayerFF.route` over the pooled encoder
    output), so that they are the same at every decoding step and in the cache."""

    def __init__(self, config: WEMoEConfig, text_config: PreTrainedConfig, layer_idx: int, granularity: str):
        super().__init__()
        self.routes_attention = "attention" in config.upscaled_groups
        self.is_decoder = text_config.is_decoder
        self.layer = nn.ModuleList([WEMoET5LayerSelfAttention(config, text_config, layer_idx == 0, layer_idx)])
        if self.is_decoder:
            self.layer.append(WEMoET5LayerCrossAttention(config, text_config, layer_idx=layer_idx))
        self.layer.append(WEMoET5LayerFF(config, text_config, granularity))

    def forward(
        self,
        hidden_states: torch.Tensor,
        self_attention_bias: torch.Tensor | None,
        token_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        cross_attention_bias: torch.Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
        shared_router: WEMoERouter | None = None,
        prompt_states: torch.Tensor | None = None,
    ) -> WEMoET5BlockOutput:
        feed_forward = self.layer[-1]
        routing_weights = prompt_routing = None
        if self.routes_attention:
            normed = self.layer[0].layer_norm(hidden_states)
            routing_weights = feed_forward.route(normed, token_mask, shared_router, prompt_states)
            if self.is_decoder and encoder_hidden_states is not None:
                prompt_routing = feed_forward.route(None, None, shared_router, prompt_states, granularity="prompt")
        hidden_states, self_attention_weights = self.layer[0](
            hidden_states, self_attention_bias, cache=cache, routing_weights=routing_weights
        )
        hidden_states = clamp_inf_for_fp16(hidden_states)
        cross_attention_weights = None
        if self.is_decoder and encoder_hidden_states is not None:
            hidden_states, cross_attention_weights = self.layer[1](
                hidden_states, encoder_hidden_states, cross_attention_bias, cache, routing_weights, prompt_routing
            )
            hidden_states = clamp_inf_for_fp16(hidden_states)
        hidden_states, routing_weights = feed_forward(
            hidden_states, token_mask, shared_router, prompt_states, routing_weights
        )
        return WEMoET5BlockOutput(
            clamp_inf_for_fp16(hidden_states), routing_weights, self_attention_weights, cross_attention_weights
        )


def causal_mask(
    query_length: int,
    past_length: int,
    attention_mask: torch.Tensor | None,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """The decoder's additive self-attention mask `(batch or 1, 1, query_length, past_length + query_length)`: each
    query sees the cached positions and itself, and none that a `(batch, keys)` padding mask excludes."""
    key_length = past_length + query_length
    query_positions = torch.arange(query_length, device=device)[:, None] + past_length
    keep = (torch.arange(key_length, device=device)[None, :] <= query_positions)[None, None]
    if attention_mask is not None:
        keep = keep & attention_mask[:, None, None, -key_length:].bool()
    return additive_mask(keep, dtype)


@dataclass
class WEMoET5StackOutput:
    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...]
    routing_weights: tuple[torch.Tensor, ...]
    attentions: tuple[torch.Tensor | None, ...]
    cross_attentions: tuple[torch.Tensor | None, ...]


class WEMoET5Stack(nn.Module):
    """T5's encoder or decoder stack (same parameter names, minus the embedding, which the model owns)."""

    main_input_name = "input_ids"  # what `generate()` feeds the encoder entry (`WEMoEForConditionalGeneration.encode`)

    def __init__(self, config: WEMoEConfig, text_config: PreTrainedConfig):
        super().__init__()
        self.is_decoder = text_config.is_decoder
        granularity = config.decoder_routing if self.is_decoder else config.routing_granularity
        # A decoder routed per prompt reads the pooled prompt everywhere; one with upscaled attention, in its
        # cross-attention's key and value projections.
        self.reads_prompt = self.is_decoder and (granularity == "prompt" or "attention" in config.upscaled_groups)
        self.block = nn.ModuleList(
            [WEMoET5Block(config, text_config, i, granularity) for i in range(text_config.num_layers)]
        )
        self.final_layer_norm = WEMoET5LayerNorm(text_config.d_model, eps=text_config.layer_norm_epsilon)
        self.dropout = nn.Dropout(text_config.dropout_rate)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
        shared_router: WEMoERouter | None = None,
    ) -> WEMoET5StackOutput:
        # The relative position bias is learned by the first block and shared by all; the masks are folded into it.
        query_length, dtype = inputs_embeds.shape[1], inputs_embeds.dtype
        first_attention = self.block[0].layer[0].SelfAttention
        if self.is_decoder:
            past_length = cache.get_seq_length() if cache is not None else 0
            self_attention_bias = first_attention.compute_bias(query_length, past_length + query_length, past_length)
            self_attention_bias = self_attention_bias.to(dtype) + causal_mask(
                query_length, past_length, attention_mask, dtype, inputs_embeds.device
            )
            cross_attention_bias = padding_mask(encoder_attention_mask, dtype)
            token_mask = None  # decoder routing is per token or per prompt: it averages no decoder tokens
        else:
            self_attention_bias = first_attention.compute_bias(query_length, query_length).to(dtype)
            mask = padding_mask(attention_mask, dtype)
            self_attention_bias = self_attention_bias if mask is None else self_attention_bias + mask
            cross_attention_bias, token_mask = None, attention_mask  # encoder routing averages over real tokens only
        prompt_states = self.pooled_prompt(encoder_hidden_states, encoder_attention_mask)

        hidden_states = self.dropout(inputs_embeds)
        all_hidden_states, all_routing_weights, all_attentions, all_cross_attentions = (hidden_states,), (), (), ()
        for block in self.block:
            output = block(
                hidden_states,
                self_attention_bias,
                token_mask=token_mask,
                encoder_hidden_states=encoder_hidden_states,
                cross_attention_bias=cross_attention_bias,
                cache=cache,
                shared_router=shared_router,
                prompt_states=prompt_states,
            )
            hidden_states = output.hidden_states
            all_hidden_states += (hidden_states,)
            all_routing_weights += (output.routing_weights,)
            all_attentions += (output.self_attention_weights,)
            all_cross_attentions += (output.cross_attention_weights,)
        hidden_states = self.dropout(self.final_layer_norm(hidden_states))
        return WEMoET5StackOutput(
            hidden_states, all_hidden_states, all_routing_weights, all_attentions, all_cross_attentions
        )

    def pooled_prompt(
        self, encoder_hidden_states: torch.Tensor | None, encoder_attention_mask: torch.Tensor | None
    ) -> torch.Tensor | None:
        """What a decoder routed per prompt routes from: the encoder's final hidden states averaged over each prompt's
        real tokens, `(batch, d_model)`; recomputed at every decoding step from the same encoder output, so the
        routing never depends on the step or on the cache. None for a stack that routes from its own states."""
        if not self.reads_prompt:
            return None
        if encoder_hidden_states is None:
            raise ValueError(
                "A decoder routed per prompt (`decoder_routing='prompt'`, or upscaled cross-attention) needs the "
                "encoder's output."
            )
        return masked_mean(encoder_hidden_states, encoder_attention_mask)


@dataclass
class WEMoEEncoderOutput(BaseModelOutput):
    r"""
    routing_weights (`tuple(torch.FloatTensor)`, *optional*, returned when `output_routing_weights=True`):
        Per encoder layer, the routing weights used: `(batch_size, num_experts)` per sample or
        `(batch_size, seq_len, num_experts)` per token.
    """

    routing_weights: tuple[torch.FloatTensor, ...] | None = None


# The name transformers gives the KV cache: `cache` from 5.24 (its ModelOutput maps `past_key_values` onto it).
CACHE_NAME = "cache" if version.parse(transformers.__version__).release >= (5, 24) else "past_key_values"


@dataclass
class WEMoESeq2SeqLMOutput(ModelOutput):
    r"""
    The outputs of `T5ForConditionalGeneration`, plus the routing weights.

    loss (`torch.FloatTensor` of shape `(1,)`, *optional*, returned when `labels` is provided):
        Cross-entropy of the labels.
    logits (`torch.FloatTensor` of shape `(batch_size, target_len, vocab_size)`):
        Next-token scores.
    cache (`EncoderDecoderCache`, *optional*, returned when `use_cache=True`):
        The decoder's self-attention and cross-attention keys and values, to continue decoding from. Before
        transformers 5.24 the field is `past_key_values`, the name that version's `generate()` reads.
    decoder_hidden_states, decoder_attentions, cross_attentions, encoder_last_hidden_state, encoder_hidden_states,
    encoder_attentions:
        As in `Seq2SeqLMOutput` (attentions only with eager attention).
    encoder_routing_weights (`tuple(torch.FloatTensor)`, *optional*, returned when `output_routing_weights=True`):
        Per encoder layer, `(batch_size, num_experts)` per sample or `(batch_size, seq_len, num_experts)` per token.
    decoder_routing_weights (`tuple(torch.FloatTensor)`, *optional*, returned when `output_routing_weights=True`):
        Per decoder layer, `(batch_size, target_len, num_experts)` with `decoder_routing="token"` (every token
        routed), `(batch_size, num_experts)` with `decoder_routing="prompt"` (one routing per prompt).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    if CACHE_NAME == "cache":
        cache: EncoderDecoderCache | None = None
    else:
        past_key_values: EncoderDecoderCache | None = None
    decoder_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    decoder_attentions: tuple[torch.FloatTensor, ...] | None = None
    cross_attentions: tuple[torch.FloatTensor, ...] | None = None
    encoder_last_hidden_state: torch.FloatTensor | None = None
    encoder_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    encoder_attentions: tuple[torch.FloatTensor, ...] | None = None
    encoder_routing_weights: tuple[torch.FloatTensor, ...] | None = None
    decoder_routing_weights: tuple[torch.FloatTensor, ...] | None = None


class WEMoET5EncoderEntry:
    """What `generate()` calls as the encoder (`get_encoder()`): the model's own `encode`, which embeds with the
    model's `shared` embedding and routes with its shared router, both owned once by the model."""

    def __init__(self, model: "WEMoEForConditionalGeneration"):
        self.forward = model.encode

    def __call__(self, *args, **kwargs) -> WEMoEEncoderOutput:
        return self.forward(*args, **kwargs)


def cache_argument(cache: EncoderDecoderCache | None, past_key_values: EncoderDecoderCache | None):
    """The KV cache, given by either name; the old one is deprecated where transformers has renamed it (5.24)."""
    if cache is not None and past_key_values is not None:
        raise ValueError("Give the KV cache as `cache` or as `past_key_values`, not both.")
    if past_key_values is None:
        return cache
    if CACHE_NAME == "cache":
        warnings.warn(
            "`past_key_values` is deprecated since transformers 5.24; use `cache` instead.", FutureWarning, stacklevel=3
        )
    return past_key_values


@register_wemoe_model
class WEMoEForConditionalGeneration(WEMoEPreTrainedModel, GenerationMixin):
    """T5 / Flan-T5 with WEMoE feed-forward blocks in the encoder and decoder, everything else merged statically.

    Parameter names match `T5ForConditionalGeneration` (`shared`, `encoder.block.{i}.layer...`, `decoder...`,
    `lm_head`), plus each linear's `*_task_vectors` and the routers. The encoder routes per sample (its real tokens
    averaged) or per token; the decoder per token (the paper) or, with `decoder_routing="prompt"`, once per prompt
    from the pooled encoder output. Either way `generate()` gives the same output with and without the cache.
    """

    backbone = "t5"
    # The artifact's `pipeline_wemoe.py` (copied with this file, which imports it) restores the
    # `text2text-generation` task that transformers 5 removed.
    artifact_pipelines = {
        "text2text-generation": {
            "impl": f"pipeline_wemoe.{WEMoEText2TextGenerationPipeline.__name__}",
            "pt": ["AutoModelForSeq2SeqLM"],
            "type": "text",
        }
    }
    _tied_weights_keys = {"lm_head.weight": "shared.weight"}  # only when `config.tie_word_embeddings`
    _no_split_modules = ["WEMoET5Block"]
    _supports_flash_attn = False
    main_input_name = "input_ids"

    def __init__(self, config: WEMoEConfig):
        super().__init__(config)
        text_config = config.text_config
        encoder_config = copy.deepcopy(text_config)
        encoder_config.is_decoder, encoder_config.use_cache = False, False
        decoder_config = config.get_text_config(decoder=True)
        self.model_dim = text_config.d_model
        self.shared = nn.Embedding(text_config.vocab_size, text_config.d_model)
        self.encoder = WEMoET5Stack(config, encoder_config)
        self.decoder = WEMoET5Stack(config, decoder_config)
        self.lm_head = nn.Linear(text_config.d_model, text_config.vocab_size, bias=False)
        self.router = build_router(config, text_config.d_model, "shared")
        self.post_init()
        self.freeze_all_but_routers()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, WEMoET5LayerNorm):
            init.ones_(module.weight)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.shared

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.shared = new_embeddings

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def get_encoder(self, modality: str | None = None) -> WEMoET5EncoderEntry:
        return WEMoET5EncoderEntry(self)

    def encode(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = True,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> WEMoEEncoderOutput:
        """Run the encoder; its routing weights are always returned (they are small)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Give exactly one of `input_ids` and `inputs_embeds`.")
        if inputs_embeds is None:
            inputs_embeds = self.shared(input_ids)
        encoded = self.encoder(inputs_embeds, attention_mask=attention_mask, shared_router=self.router)
        return WEMoEEncoderOutput(
            last_hidden_state=encoded.last_hidden_state,
            hidden_states=encoded.hidden_states if output_hidden_states else None,
            attentions=returned_attentions(self.config, output_attentions, encoded.attentions),
            routing_weights=encoded.routing_weights,
        )

    def _shift_right(self, labels: torch.LongTensor) -> torch.LongTensor:
        start, pad = self.config.text_config.decoder_start_token_id, self.config.text_config.pad_token_id
        if start is None or pad is None:
            raise ValueError("`text_config` needs `decoder_start_token_id` and `pad_token_id` to shift labels.")
        shifted = labels.new_full(labels.shape, start)
        shifted[..., 1:] = labels[..., :-1]
        return shifted.masked_fill(shifted == -100, pad)

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return self._shift_right(labels)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: tuple | BaseModelOutput | None = None,
        cache: EncoderDecoderCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_routing_weights: bool = False,
        return_dict: bool | None = None,
        past_key_values: EncoderDecoderCache | None = None,
        **kwargs,
    ) -> WEMoESeq2SeqLMOutput | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`):
                Tokenized prompts, e.g. `"sst2 sentence: ..."`; pad anywhere the attention mask says.
            decoder_input_ids (`torch.LongTensor` of shape `(batch_size, target_len)`, *optional*):
                Decoder inputs; derived from `labels` when only those are given.
            cache (`EncoderDecoderCache`, *optional*):
                Keys and values of earlier decoding steps (`past_key_values` is accepted as the same: it is the
                name before transformers 5.24); the output returns it under the installed version's name.
            labels (`torch.LongTensor` of shape `(batch_size, target_len)`, *optional*):
                Target token ids (-100 is ignored); a cross-entropy loss is returned with them.
            output_routing_weights (`bool`, *optional*, defaults to `False`):
                Return every encoder and decoder layer's routing weights, for analysis (their shapes: see
                `WEMoESeq2SeqLMOutput`).

        Other arguments are those of `T5ForConditionalGeneration.forward`.

        Example:

        ```python
        >>> from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
        >>> model = AutoModelForSeq2SeqLM.from_pretrained("path/to/wemoe-t5", trust_remote_code=True)
        >>> tokenizer = AutoTokenizer.from_pretrained("path/to/wemoe-t5", trust_remote_code=True)
        >>> inputs = tokenizer(["sst2 sentence: a gorgeous, witty movie."], return_tensors="pt")
        >>> tokenizer.batch_decode(model.generate(**inputs), skip_special_tokens=True)
        ```
        """
        cache = cache_argument(cache, past_key_values)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if encoder_outputs is None:
            encoder_outputs = self.encode(
                input_ids, attention_mask, inputs_embeds, output_hidden_states, output_attentions=output_attentions
            )
        elif not isinstance(encoder_outputs, BaseModelOutput):
            encoder_outputs = WEMoEEncoderOutput(last_hidden_state=encoder_outputs[0])

        if labels is not None and decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = self._shift_right(labels)
        if (decoder_input_ids is None) == (decoder_inputs_embeds is None):
            raise ValueError("Give exactly one of `decoder_input_ids`, `decoder_inputs_embeds` (or `labels`).")
        if decoder_inputs_embeds is None:
            decoder_inputs_embeds = self.shared(decoder_input_ids)
        use_cache = use_cache if use_cache is not None else self.config.text_config.use_cache
        if not use_cache:
            cache = None
        elif cache is None:
            decoder_config = self.config.get_text_config(decoder=True)
            cache = EncoderDecoderCache(DynamicCache(config=decoder_config), DynamicCache(config=decoder_config))
        elif not isinstance(cache, EncoderDecoderCache):
            raise TypeError(
                f"The KV cache must be an EncoderDecoderCache (self-attention and cross-attention), got "
                f"{type(cache).__name__}."
            )

        decoded = self.decoder(
            decoder_inputs_embeds,
            attention_mask=decoder_attention_mask,
            encoder_hidden_states=encoder_outputs.last_hidden_state,
            encoder_attention_mask=attention_mask,
            cache=cache,
            shared_router=self.router,
        )
        sequence_output = decoded.last_hidden_state
        if self.config.text_config.scale_decoder_outputs:
            sequence_output = sequence_output * (self.model_dim**-0.5)
        logits = self.lm_head(sequence_output)

        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), labels.to(logits.device).flatten(), ignore_index=-100)
        encoder_routing_weights = getattr(encoder_outputs, "routing_weights", None)
        output = WEMoESeq2SeqLMOutput(
            loss=loss,
            logits=logits,
            **{CACHE_NAME: cache},
            decoder_hidden_states=decoded.hidden_states if output_hidden_states else None,
            decoder_attentions=returned_attentions(self.config, output_attentions, decoded.attentions),
            cross_attentions=returned_attentions(self.config, output_attentions, decoded.cross_attentions),
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
            encoder_routing_weights=encoder_routing_weights if output_routing_weights else None,
            decoder_routing_weights=decoded.routing_weights if output_routing_weights else None,
        )
        return output if return_dict else output.to_tuple()


WEMoEForConditionalGeneration.register_for_auto_class("AutoModelForSeq2SeqLM")

__all__ = [
    "WEMoEEncoderOutput",
    "WEMoEForConditionalGeneration",
    "WEMoESeq2SeqLMOutput",
    "WEMoET5Attention",
    "WEMoET5Block",
    "WEMoET5LayerNorm",
]
