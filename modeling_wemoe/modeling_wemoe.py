"""PyTorch WEMoE models: weight-ensembling mixtures of experts over fine-tuned task vectors.

Method: Tang et al., "Merging Multi-Task Models via Weight-Ensembling Mixture of Experts" (ICML 2024) and
Shen et al., "Efficient and Effective Weight-Ensembling Mixture of Experts for Multi-Task Model Merging" (E-WEMoE).
Every MLP weight W of layer l becomes, for input x, W(x) = W0 + sum_i r_i(x) * tau_i, with r = router_l(h) and
tau_i = theta_i - theta_0 the task vector of expert i; everything else is merged once by the converter.

Shipped inside every artifact: imports only torch, transformers and the sibling configuration file.
"""

import copy
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_outputs import BaseModelOutput, ImageClassifierOutput, Seq2SeqLMOutput
from transformers.models.clip.modeling_clip import CLIPAttention, CLIPVisionEmbeddings
from transformers.models.t5.modeling_t5 import T5LayerCrossAttention, T5LayerNorm, T5LayerSelfAttention

from .configuration_wemoe import WEMoEConfig
from .pipeline_wemoe import WEMoEText2TextGenerationPipeline


def num_kept_entries(numel: int, keep: float) -> int:
    """Entries a sparse task-vector tensor of `numel` entries keeps: round(keep * numel)."""
    return round(keep * numel)


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean `(..., n)` mask into `(..., ceil(n / 8))` bytes, least significant bit first."""
    padded = F.pad(mask.to(torch.uint8), (0, -mask.shape[-1] % 8))
    bits = padded.view(*mask.shape[:-1], -1, 8)
    place_values = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=mask.device)
    return (bits * place_values).sum(-1).to(torch.uint8)


def unpack_bitmask(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of `pack_bitmask`: `(..., ceil(n / 8))` bytes to a boolean `(..., n)` mask."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(-2)[..., :numel].bool()


class WEMoETaskVectors(nn.Module):
    """Storage of one tensor's task vectors that hands them out a tile of rows at a time, so that a forward never
    holds more than one tile of them in dense form."""

    shape: tuple[int, ...]

    def tile(self, index: int, tile_rows: int) -> torch.Tensor:
        """Every expert's task vector restricted to rows `[index * tile_rows, (index + 1) * tile_rows)`, flattened:
        `(num_experts, rows * row_width)`."""
        raise NotImplementedError

    def merge_tile(self, base: torch.Tensor, routing_weights: torch.Tensor, index: int, tile_rows: int) -> torch.Tensor:
        """`base + sum_i r[b, i] * tau_i` on one tile of rows, for every row b of `(batch, num_experts)` routing
        weights, where `base` is the same tile of the pre-trained tensor: `(batch, rows, *shape[1:])`."""
        merged = torch.addmm(base.reshape(1, -1), routing_weights.to(base.dtype), self.tile(index, tile_rows))
        return merged.view(routing_weights.shape[0], -1, *self.shape[1:])

    def expert_outputs(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`x @ tau_i^T` for every expert of a weight matrix: `(..., in)` to `(..., num_experts, out)`."""
        task_vectors = self.tile(0, self.shape[0]).view(-1, self.shape[1])
        return F.linear(hidden_states, task_vectors).unflatten(-1, (-1, self.shape[0]))

    def combine(self, routing_weights: torch.Tensor) -> torch.Tensor:
        """sum_i r[..., i] * tau_i over the whole tensor for routing weights `(..., num_experts)`: `(..., *shape)`."""
        merged = routing_weights.to(self.values.dtype) @ self.tile(0, self.shape[0])
        return merged.view(*routing_weights.shape[:-1], *self.shape)


class WEMoEDenseTaskVectors(WEMoETaskVectors):
    """The task vectors of one tensor, stacked as `(num_experts, *shape)`."""

    def __init__(self, num_experts: int, shape: tuple[int, ...]):
        super().__init__()
        self.shape = tuple(shape)
        self.values = nn.Parameter(torch.zeros(num_experts, *shape), requires_grad=False)

    @property
    def num_stored_entries(self) -> int:
        return self.values.numel()

    def assign(self, task_vectors: torch.Tensor) -> None:
        """Store `(num_experts, *shape)` task vectors."""
        with torch.no_grad():
            self.values.copy_(task_vectors)

    def dense(self) -> torch.Tensor:
        return self.values

    def tile(self, index: int, tile_rows: int) -> torch.Tensor:
        rows = self.values[:, index * tile_rows : (index + 1) * tile_rows]
        return rows.reshape(rows.shape[0], -1)


class WEMoESparseTaskVectors(WEMoETaskVectors):
    """The task vectors of one tensor, each pruned to its `round(keep * numel)` kept entries.

    Stored compactly: `values` `(num_experts, k)` in ascending flat-index order and `bitmask`
    `(num_experts, ceil(numel / 8))` marking which entries were kept (1 bit per entry instead of a 64-bit index).
    """

    def __init__(self, num_experts: int, shape: tuple[int, ...], keep: float):
        super().__init__()
        self.shape = tuple(shape)
        self.numel = math.prod(shape)
        self.num_kept = num_kept_entries(self.numel, keep)
        self.values = nn.Parameter(torch.zeros(num_experts, self.num_kept), requires_grad=False)
        self.register_buffer("bitmask", torch.zeros(num_experts, math.ceil(self.numel / 8), dtype=torch.uint8))
        self._derived_key = None
        self._tile_layouts: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._csr: torch.Tensor | None = None

    @property
    def num_stored_entries(self) -> int:
        return self.values.numel()

    def assign(self, task_vectors: torch.Tensor, keep_mask: torch.Tensor) -> None:
        """Store the entries of `(num_experts, *shape)` task vectors where `keep_mask` is set."""
        flat_mask = keep_mask.reshape(keep_mask.shape[0], -1)
        kept_per_expert = flat_mask.sum(-1).tolist()
        if any(count != self.num_kept for count in kept_per_expert):
            raise ValueError(
                f"Sparse task vectors of shape {self.shape} keep {self.num_kept} entries per expert, "
                f"but the keep mask sets {kept_per_expert}."
            )
        with torch.no_grad():
            self.values.copy_(task_vectors.reshape(flat_mask.shape)[flat_mask].view_as(self.values))
            self.bitmask.copy_(pack_bitmask(flat_mask))

    def check_kept_counts(self, kept_per_expert: list[int]) -> None:
        """The bitmask must mark exactly as many entries per expert as there are stored values."""
        if any(count != self.num_kept for count in kept_per_expert):
            raise ValueError(
                f"Corrupt sparse task vectors: the bitmask sets {kept_per_expert} entries per expert, "
                f"expected {self.num_kept} each (tensor shape {self.shape})."
            )

    def flat_indices(self) -> torch.Tensor:
        """`(num_experts, k)` flat indices of the kept entries (ascending, matching `values`)."""
        mask = unpack_bitmask(self.bitmask, self.numel)
        self.check_kept_counts(mask.sum(dim=-1).tolist())
        indices = mask.nonzero()[:, 1]
        return indices.view(mask.shape[0], self.num_kept)

    def dense(self) -> torch.Tensor:
        flat = self.values.new_zeros(self.values.shape[0], self.numel)
        return flat.scatter_(1, self.flat_indices(), self.values).view(-1, *self.shape)

    def tile_layout(self, tile_rows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per row tile: where each kept entry goes in a `(num_experts, tile_rows * row_width)` slab (int32), and
        the entries in that order. Derived from the stored tensors once per tile height, and again only when they
        change."""
        self._forget_derived_if_changed()
        if tile_rows not in self._tile_layouts:
            self._tile_layouts[tile_rows] = self._build_tile_layout(tile_rows)
        return self._tile_layouts[tile_rows]

    def _forget_derived_if_changed(self) -> None:
        key = tuple((t.device, t.dtype, t.data_ptr(), t._version) for t in (self.bitmask, self.values))
        if key != self._derived_key:
            self._derived_key, self._tile_layouts, self._csr = key, {}, None

    def expert_outputs(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # Few tokens at a time (a generation step): one sparse matmul reads only the kept entries, ~5x faster than
        # expanding the task vectors. torch's CPU sparse matmul has no half-precision kernels: expand there.
        if self.values.dtype not in (torch.float32, torch.float64) or len(self.shape) != 2:
            return super().expert_outputs(hidden_states)
        per_expert = (self.csr() @ hidden_states.reshape(-1, self.shape[1]).t()).t()
        return per_expert.reshape(*hidden_states.shape[:-1], -1, self.shape[0])

    def csr(self) -> torch.Tensor:
        """The task vectors as one `(num_experts * out, in)` sparse CSR matrix sharing `values` (int32 indices)."""
        self._forget_derived_if_changed()
        if self._csr is None:
            out_features, in_features = self.shape
            indices = self.flat_indices()
            experts = torch.arange(indices.shape[0], device=indices.device).unsqueeze(1)
            rows = (experts * out_features + indices // in_features).flatten()
            row_starts = F.pad(torch.bincount(rows, minlength=indices.shape[0] * out_features).cumsum(0), (1, 0))
            columns = (indices % in_features).flatten()
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                self._csr = torch.sparse_csr_tensor(
                    row_starts.to(torch.int32),
                    columns.to(torch.int32),
                    self.values.detach().flatten(),
                    (row_starts.numel() - 1, in_features),
                    check_invariants=False,
                )
        return self._csr

    def _build_tile_layout(self, tile_rows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # Tile by tile from the bitmask, so that building it never holds more than one tile's mask and indices; the
        # tiles are views of two preallocated tensors rather than many separate allocations.
        slab_numel = tile_rows * (self.numel // self.shape[0])
        num_experts = self.values.shape[0]
        values = self.values.detach()
        all_positions = torch.empty(values.numel(), dtype=torch.int32, device=values.device)
        all_values = torch.empty_like(values).flatten()
        offsets, filled, layout = [0] * num_experts, 0, []
        for start in range(0, self.numel, slab_numel):
            stop = min(start + slab_numel, self.numel)
            packed = self.bitmask[:, start // 8 : math.ceil(stop / 8)]
            mask = unpack_bitmask(packed, packed.shape[1] * 8)[:, start % 8 : start % 8 + stop - start]
            counts = mask.sum(-1).tolist()
            if any(offset + count > self.num_kept for offset, count in zip(offsets, counts, strict=True)):
                offsets = [offset + count for offset, count in zip(offsets, counts, strict=True)]
                continue  # more entries marked than stored: counted on, and reported below
            experts, columns = mask.nonzero(as_tuple=True)
            tile = slice(filled, filled + len(columns))
            all_positions[tile] = experts * slab_numel + columns
            torch.cat(
                [values[e, offsets[e] : offsets[e] + counts[e]] for e in range(num_experts)], out=all_values[tile]
            )
            layout.append((all_positions[tile], all_values[tile]))
            offsets = [offset + count for offset, count in zip(offsets, counts, strict=True)]
            filled = tile.stop
        self.check_kept_counts(offsets)
        return layout

    def tile(self, index: int, tile_rows: int) -> torch.Tensor:
        positions, tile_values = self.tile_layout(tile_rows)[index]
        row_width = self.numel // self.shape[0]
        rows = min(tile_rows, self.shape[0] - index * tile_rows)
        slab = self.values.new_zeros(self.values.shape[0], tile_rows * row_width)
        slab.view(-1)[positions] = tile_values
        return slab[:, : rows * row_width]


# Output rows merged and applied together per sample: a tile of 32 rows of a ViT-B/32 MLP weight, for 16 samples,
# is 1.5-6 MB, which measured fastest on CPU (16 and 64 rows were slower on one matrix or the other).
TILE_ROWS = 32


class WEMoELowRankTaskVectors(nn.Module):
    """The task vectors of one weight matrix as rank-`rank` factors: tau_i = B[i] @ A[i], with `A`
    `(num_experts, rank, in)` and `B` `(num_experts, out, rank)`. Applied to inputs without ever forming tau_i."""

    def __init__(self, num_experts: int, shape: tuple[int, int], rank: int):
        super().__init__()
        self.shape = tuple(shape)
        self.A = nn.Parameter(torch.zeros(num_experts, rank, shape[1]), requires_grad=False)
        self.B = nn.Parameter(torch.zeros(num_experts, shape[0], rank), requires_grad=False)

    @property
    def num_stored_entries(self) -> int:
        return self.A.numel() + self.B.numel()

    def assign(self, factor_a: torch.Tensor, factor_b: torch.Tensor) -> None:
        with torch.no_grad():
            self.A.copy_(factor_a)
            self.B.copy_(factor_b)

    def dense(self) -> torch.Tensor:
        return self.B @ self.A

    def apply(self, hidden_states: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        """sum_i r_i B_i (A_i x) for `(batch, seq, in)` inputs and routing `(batch, experts)` or
        `(batch, seq, experts)`: two matmuls over all experts at once."""
        num_experts, rank, _ = self.A.shape
        projected = hidden_states @ self.A.reshape(num_experts * rank, -1).t()  # (batch, seq, experts * rank)
        projected = projected.unflatten(-1, (num_experts, rank))
        weights = routing_weights.unsqueeze(1) if routing_weights.dim() == 2 else routing_weights
        scaled = (projected * weights.to(projected.dtype).unsqueeze(-1)).flatten(-2)
        return scaled @ self.B.transpose(1, 2).reshape(num_experts * rank, -1)

    def apply_selected(self, hidden_states: torch.Tensor, routing_weights: torch.Tensor, top_k: int) -> torch.Tensor:
        """`apply` for per-sample routing that keeps `top_k` experts: each expert's factors are applied only to the
        samples that selected it, so the work grows with `top_k`, not with the number of experts."""
        # The weights are already masked to top_k: select the kept (non-zero) experts, not the largest values, since
        # a kept weight may be negative; an expert kept at exactly 0 contributes nothing either way.
        selected = (routing_weights != 0).to(routing_weights.dtype).topk(top_k, dim=-1).indices  # (batch, top_k)
        weights = routing_weights.gather(-1, selected).to(hidden_states.dtype)
        output = hidden_states.new_zeros(*hidden_states.shape[:-1], self.shape[0])
        for expert in range(self.A.shape[0]):
            samples, slots = (selected == expert).nonzero(as_tuple=True)
            if samples.numel():
                projected = hidden_states[samples] @ self.A[expert].t()
                projected = projected * weights[samples, slots][:, None, None]
                output.index_add_(0, samples, projected @ self.B[expert].t())
        return output


def build_task_vectors(config: WEMoEConfig, shape: tuple[int, ...]) -> nn.Module:
    if config.expert_format == "lowrank" and len(shape) == 2:
        return WEMoELowRankTaskVectors(config.num_experts, shape, config.rank)
    if config.expert_format == "sparse":
        return WEMoESparseTaskVectors(config.num_experts, shape, config.keep)
    return WEMoEDenseTaskVectors(config.num_experts, shape)


class WEMoELinear(nn.Module):
    """A linear layer whose weight and bias are `W0 + sum_i r_i * tau_i`, re-mixed for every sample or token.

    `weight`/`bias` hold the frozen pre-trained W0 and b0; `weight_task_vectors`/`bias_task_vectors` the experts'
    task vectors. Routing weights `(batch, num_experts)` mix one weight per sample; `(batch, seq, num_experts)`
    mix one per token. Knows nothing of the model family around it.
    """

    def __init__(self, config: WEMoEConfig, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.weight_task_vectors = build_task_vectors(config, (out_features, in_features))
        self.bias_task_vectors = build_task_vectors(config, (out_features,)) if bias else None
        self.top_k = config.router_top_k

    def forward(self, hidden_states: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        if isinstance(self.weight_task_vectors, WEMoELowRankTaskVectors):
            return self._forward_low_rank(hidden_states, routing_weights)
        if routing_weights.dim() == 2:
            return self._forward_per_sample(hidden_states, routing_weights)
        return self._forward_per_token(hidden_states, routing_weights)

    def _forward_low_rank(self, hidden_states: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        # x (W0 + sum_i r_i B_i A_i)^T = x W0^T + sum_i r_i (x A_i^T) B_i^T: exact, per sample or per token.
        output = F.linear(hidden_states, self.weight, self.bias)
        if routing_weights.dim() == 2 and self.top_k is not None and self.top_k < routing_weights.shape[-1]:
            output = output + self.weight_task_vectors.apply_selected(hidden_states, routing_weights, self.top_k)
        else:
            output = output + self.weight_task_vectors.apply(hidden_states, routing_weights)
        if self.bias is not None:
            bias_delta = routing_weights.to(output.dtype) @ self.bias_task_vectors.dense()
            output = output + (bias_delta.unsqueeze(1) if routing_weights.dim() == 2 else bias_delta)
        return output

    def _forward_per_sample(self, hidden_states: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        # Merge and apply one tile of output rows at a time: each sample's merged tile (W0 + sum_i r_i tau_i) stays
        # in cache, and the task vectors are read once per batch, instead of writing and re-reading a whole merged
        # weight per sample (memory-bound: ~6x a dense linear at ViT-B/32 size against ~2x tiled).
        output = hidden_states.new_empty(*hidden_states.shape[:-1], self.out_features)
        for tile in range(math.ceil(self.out_features / TILE_ROWS)):
            rows = slice(tile * TILE_ROWS, (tile + 1) * TILE_ROWS)
            weight = self.weight_task_vectors.merge_tile(self.weight[rows], routing_weights, tile, TILE_ROWS)
            output[..., rows] = torch.matmul(hidden_states, weight.transpose(-1, -2))
        if self.bias is not None:
            output = output + (self.bias + self.bias_task_vectors.combine(routing_weights)).unsqueeze(1)
        return output

    def _forward_per_token(self, hidden_states: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        # x (W0 + sum_i r_i tau_i)^T = x W0^T + sum_i r_i (x tau_i^T): exact per token, no per-token weight copies.
        # All experts in one matmul: the steps of generation route a few tokens each, where a loop over tiles of
        # rows would cost more in calls than it saves.
        output = F.linear(hidden_states, self.weight, self.bias)
        routing_weights = routing_weights.to(output.dtype)
        per_expert = self.weight_task_vectors.expert_outputs(hidden_states)
        output = output + (routing_weights.unsqueeze(-2) @ per_expert).squeeze(-2)
        if self.bias is not None:
            output = output + self.bias_task_vectors.combine(routing_weights)
        return output


class WEMoERouterLinear(nn.Linear):
    """A router layer, initialised for routing rather than by the generic `nn.Linear` rule: the output layer starts
    at weight 0 and bias `init_lambda` (so routing starts as task arithmetic), a hidden layer at N(0, 0.01)."""

    def __init__(self, in_features: int, out_features: int, is_output: bool):
        super().__init__(in_features, out_features)
        self.is_output = is_output

    def reset_for_routing(self, init_lambda: float) -> None:
        if self.is_output:
            init.zeros_(self.weight)
            init.constant_(self.bias, init_lambda)
        else:
            init.normal_(self.weight, std=0.01)
            init.zeros_(self.bias)


class WEMoERouter(nn.Module):
    """Maps hidden states `(..., hidden_size)` to raw routing weights `(..., num_experts)` (no softmax).

    Depth 2: Linear(d, d) -> ReLU -> Linear(d, num_experts); depth 1: Linear(d, num_experts); depth 0: one learned
    vector for every input. The output starts at `init_lambda` for every expert (task arithmetic).
    """

    def __init__(self, hidden_size: int, num_experts: int, hidden_layers: int):
        super().__init__()
        self.hidden_layers = hidden_layers
        self.num_experts = num_experts
        if hidden_layers == 0:
            self.weight = nn.Parameter(torch.empty(num_experts))
        elif hidden_layers == 1:
            self.fc = WEMoERouterLinear(hidden_size, num_experts, is_output=True)
        else:
            self.fc1 = WEMoERouterLinear(hidden_size, hidden_size, is_output=False)
            self.fc2 = WEMoERouterLinear(hidden_size, num_experts, is_output=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.hidden_layers == 0:
            return self.weight.expand(*hidden_states.shape[:-1], self.num_experts)
        if self.hidden_layers == 1:
            return self.fc(hidden_states)
        return self.fc2(F.relu(self.fc1(hidden_states)))


def build_router(config: WEMoEConfig, hidden_size: int, owner: str) -> WEMoERouter | None:
    """The router that `owner` ("per_layer": each WEMoE layer, "shared": the model) holds under `config.router_mode`,
    or None when the router lives elsewhere."""
    if config.router_mode != owner:
        return None
    return WEMoERouter(hidden_size, config.num_experts, config.router_hidden_layers)


def compute_routing_weights(
    router: WEMoERouter,
    hidden_states: torch.Tensor,
    granularity: str,
    token_mask: torch.Tensor | None = None,
    top_k: int | None = None,
) -> torch.Tensor:
    """Router outputs per token `(batch, seq, experts)`, or per sample `(batch, experts)` averaged over its real
    tokens; with `top_k`, all but each row's `top_k` largest weights are zeroed. Each sample is reduced on its own:
    a sample's routing never depends on the rest of its batch."""
    routing_weights = router(hidden_states)
    if granularity == "sample":
        if token_mask is None:
            routing_weights = routing_weights.mean(dim=1)
        else:
            mask = token_mask.to(routing_weights.dtype).unsqueeze(-1)
            routing_weights = (routing_weights * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
    if top_k is None:
        return routing_weights
    kept = torch.zeros_like(routing_weights).scatter_(-1, routing_weights.topk(top_k, dim=-1).indices, 1.0)
    return routing_weights * kept


class WEMoECLIPMLP(nn.Module):
    """CLIP's fc1 -> activation -> fc2 block with both linears weight-ensembled under one routing vector."""

    def __init__(self, config: WEMoEConfig):
        super().__init__()
        vision_config = config.vision_config
        self.granularity = config.routing_granularity
        self.top_k = config.router_top_k
        self.activation_fn = ACT2FN[vision_config.hidden_act]
        self.fc1 = WEMoELinear(config, vision_config.hidden_size, vision_config.intermediate_size)
        self.fc2 = WEMoELinear(config, vision_config.intermediate_size, vision_config.hidden_size)
        self.router = build_router(config, vision_config.hidden_size, "per_layer")

    def forward(
        self, hidden_states: torch.Tensor, shared_router: WEMoERouter | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        router = self.router if self.router is not None else shared_router
        routing_weights = compute_routing_weights(router, hidden_states, self.granularity, top_k=self.top_k)
        hidden_states = self.fc1(hidden_states, routing_weights)
        hidden_states = self.activation_fn(hidden_states)
        hidden_states = self.fc2(hidden_states, routing_weights)
        return hidden_states, routing_weights


class WEMoECLIPEncoderLayer(nn.Module):
    """A CLIP encoder layer (pre-norm attention, then pre-norm MLP) whose MLP is a WEMoE block."""

    def __init__(self, config: WEMoEConfig):
        super().__init__()
        vision_config = config.vision_config
        self.self_attn = CLIPAttention(vision_config)
        self.layer_norm1 = nn.LayerNorm(vision_config.hidden_size, eps=vision_config.layer_norm_eps)
        self.mlp = WEMoECLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(vision_config.hidden_size, eps=vision_config.layer_norm_eps)

    def forward(
        self, hidden_states: torch.Tensor, shared_router: WEMoERouter | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        residual = hidden_states
        hidden_states, _ = self.self_attn(hidden_states=self.layer_norm1(hidden_states))
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states, routing_weights = self.mlp(self.layer_norm2(hidden_states), shared_router=shared_router)
        return residual + hidden_states, routing_weights


class WEMoECLIPEncoder(nn.Module):
    def __init__(self, config: WEMoEConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            [WEMoECLIPEncoderLayer(config) for _ in range(config.vision_config.num_hidden_layers)]
        )

    def forward(
        self, hidden_states: torch.Tensor, shared_router: WEMoERouter | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        all_hidden_states, all_routing_weights = (hidden_states,), ()
        for layer in self.layers:
            hidden_states, routing_weights = layer(hidden_states, shared_router=shared_router)
            all_hidden_states += (hidden_states,)
            all_routing_weights += (routing_weights,)
        return hidden_states, all_hidden_states, all_routing_weights


class WEMoECLIPVisionTransformer(nn.Module):
    """CLIP's vision tower (same parameter names as `CLIPVisionModel`) with WEMoE MLPs."""

    def __init__(self, config: WEMoEConfig):
        super().__init__()
        vision_config = config.vision_config
        self.embeddings = CLIPVisionEmbeddings(vision_config)
        self.pre_layrnorm = nn.LayerNorm(vision_config.hidden_size, eps=vision_config.layer_norm_eps)
        self.encoder = WEMoECLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(vision_config.hidden_size, eps=vision_config.layer_norm_eps)

    def forward(
        self,
        pixel_values: torch.Tensor,
        shared_router: WEMoERouter | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        hidden_states = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        hidden_states = self.pre_layrnorm(hidden_states)
        return self.encoder(hidden_states, shared_router=shared_router)


@dataclass
class WEMoEImageClassifierOutput(ImageClassifierOutput):
    r"""
    loss (`torch.FloatTensor` of shape `(1,)`, *optional*, returned when `labels` is provided):
        Cross-entropy over the returned logits.
    logits (`torch.FloatTensor` of shape `(batch_size, num_classes)`):
        Scaled cosine similarities to the class embeddings of `task`, or of every task's classes.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
        The embeddings output and every layer's output, each `(batch_size, seq_len, hidden_size)`.
    image_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
        L2-normalised projected image embeddings.
    routing_weights (`tuple(torch.FloatTensor)`, *optional*, returned when `output_routing_weights=True`):
        Per layer, the routing weights used: `(batch_size, num_experts)` per sample or
        `(batch_size, seq_len, num_experts)` per token.
    """

    image_embeds: torch.FloatTensor | None = None
    routing_weights: tuple[torch.FloatTensor, ...] | None = None


class WEMoEPreTrainedModel(PreTrainedModel):
    config_class = WEMoEConfig
    config: WEMoEConfig
    base_model_prefix = "wemoe"
    _no_split_modules = ["WEMoECLIPEncoderLayer", "CLIPVisionEmbeddings", "WEMoET5Block"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Everything but the routers is overwritten by conversion; these defaults only make a model built from
        # the config alone well defined (the pre-trained base with zero task vectors). A tensor is initialised
        # only once, so router layers must not fall through to the generic `nn.Linear` rule.
        if isinstance(module, WEMoERouterLinear):
            module.reset_for_routing(self.config.init_lambda)
            return
        super()._init_weights(module)
        if isinstance(module, WEMoERouter) and module.hidden_layers == 0:
            init.constant_(module.weight, self.config.init_lambda)
        elif isinstance(module, WEMoELinear):
            init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, WEMoEDenseTaskVectors):
            init.zeros_(module.values)
        elif isinstance(module, WEMoELowRankTaskVectors):
            init.zeros_(module.A)
            init.zeros_(module.B)
        elif isinstance(module, WEMoESparseTaskVectors):
            init.zeros_(module.values)
            first_entries = torch.arange(module.numel) < module.num_kept
            init.copy_(module.bitmask, pack_bitmask(first_entries).expand_as(module.bitmask))
        elif isinstance(module, CLIPVisionEmbeddings):
            init.normal_(module.class_embedding, std=module.embed_dim**-0.5)
            init.copy_(module.position_ids, torch.arange(module.num_positions).expand((1, -1)))
        elif isinstance(module, T5LayerNorm):
            init.ones_(module.weight)

    def freeze_all_but_routers(self) -> None:
        """Only the routers train (test-time adaptation); every merged weight and task vector stays fixed."""
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(is_router_parameter(name))

    def parameter_report(self) -> dict[str, int]:
        """Trainable and total parameter counts, and how many task-vector entries are stored."""
        task_vector_entries = sum(
            module.num_stored_entries
            for module in self.modules()
            if isinstance(module, (WEMoEDenseTaskVectors, WEMoESparseTaskVectors, WEMoELowRankTaskVectors))
        )
        return {
            "trainable_parameters": self.num_parameters(only_trainable=True),
            "total_parameters": self.num_parameters(),
            "task_vector_entries": task_vector_entries,
        }

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # transformers' AutoModel maps one config class to one model class per process, so once a CLIP artifact is
        # loaded, AutoModel would build a T5 artifact as an image classifier (and the reverse). The config it hands
        # over says which model the artifact is. (Artifacts in directories of the same name share one dynamic module
        # name, so the config's class may be another copy of WEMoEConfig: compare the model type, not the class.)
        config = kwargs.get("config")
        if getattr(config, "model_type", None) == WEMoEConfig.model_type and cls is not model_class_for(config):
            return model_class_for(config).from_pretrained(*args, **kwargs)
        # Loading materialises fresh parameters (all trainable); restore "only routers train".
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.freeze_all_but_routers()
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        # `register_for_auto_class` records a single auto class per model class; AutoModel must resolve too.
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map["AutoModel"] = f"modeling_wemoe.{type(self).__name__}"
        self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)


def model_class_for(config: WEMoEConfig) -> type[WEMoEPreTrainedModel]:
    return WEMoEForConditionalGeneration if config.text_config is not None else WEMoEForImageClassification


def check_config_fits(model_class: type, config: WEMoEConfig) -> None:
    expected = model_class_for(config)
    if model_class is not expected:
        which = "text_config" if config.text_config is not None else "vision_config"
        raise ValueError(
            f"This WEMoE config ({which} set) is for {expected.__name__}, not {model_class.__name__}; load it with "
            "AutoModel or that class."
        )


def is_router_parameter(name: str) -> bool:
    return name.startswith("router.") or ".router." in name


class WEMoEForImageClassification(WEMoEPreTrainedModel):
    """CLIP vision tower with WEMoE MLPs, CLIP's visual projection and one zero-shot head per task.

    Logits are `exp(logit_scale) * normalize(visual_projection(pooled)) @ classifier.weight.T`, where the rows of
    `classifier.weight` are the L2-normalised text embeddings of every task's class names, in task order.
    """

    main_input_name = "pixel_values"

    def __init__(self, config: WEMoEConfig):
        super().__init__(config)
        # The setter hands the attention implementation down to `vision_config`, which CLIPAttention reads.
        check_config_fits(WEMoEForImageClassification, config)
        config._attn_implementation = config._attn_implementation
        if config.task_labels is None:
            raise ValueError("WEMoEForImageClassification needs `config.task_labels` (each task's class names).")
        vision_config = config.vision_config
        self.vision_model = WEMoECLIPVisionTransformer(config)
        self.visual_projection = nn.Linear(vision_config.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.classifier = nn.Linear(config.projection_dim, len(config.id2label), bias=False)
        self.router = build_router(config, vision_config.hidden_size, "shared")
        self.post_init()
        self.freeze_all_but_routers()

    def task_slice(self, task: str | None) -> slice:
        """Columns of the logits that belong to `task` (all columns for `None`)."""
        if task is None:
            return slice(None)
        offsets = self.config.task_label_offsets
        if task not in offsets:
            raise ValueError(f"Unknown task {task!r}: this model has tasks {list(offsets)}.")
        return slice(*offsets[task])

    def forward(
        self,
        pixel_values: torch.Tensor,
        task: str | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_routing_weights: bool = False,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
    ) -> WEMoEImageClassifierOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Images prepared by the artifact's image processor.
            task (`str`, *optional*):
                Return only this task's classes. Without it the logits span every task's classes, matching
                `config.id2label` (`"<task>: <label>"`).
            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Class indices within the returned logits; a cross-entropy loss is returned with them.
            output_routing_weights (`bool`, *optional*, defaults to `False`):
                Return every layer's routing weights, for analysis.

        Example:

        ```python
        >>> import torch
        >>> from transformers import AutoModel
        >>> model = AutoModel.from_pretrained("path/to/wemoe-artifact", trust_remote_code=True)
        >>> pixel_values = torch.randn(2, 3, 224, 224)
        >>> logits = model(pixel_values, task="eurosat").logits  # (2, number of eurosat classes)
        ```
        """
        columns = self.task_slice(task)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict

        last_hidden_state, hidden_states, routing_weights = self.vision_model(
            pixel_values, shared_router=self.router, interpolate_pos_encoding=interpolate_pos_encoding
        )
        pooled_output = self.vision_model.post_layernorm(last_hidden_state[:, 0, :])
        image_embeds = F.normalize(self.visual_projection(pooled_output), dim=-1)
        class_embeds = self.classifier.weight[columns]
        logits = self.logit_scale.exp() * image_embeds @ class_embeds.t()

        loss = F.cross_entropy(logits, labels.to(logits.device)) if labels is not None else None
        output = WEMoEImageClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=hidden_states if output_hidden_states else None,
            image_embeds=image_embeds,
            routing_weights=routing_weights if output_routing_weights else None,
        )
        return output if return_dict else output.to_tuple()


WEMoEForImageClassification.register_for_auto_class("AutoModelForImageClassification")


def clamp_inf_for_fp16(hidden_states: torch.Tensor) -> torch.Tensor:
    """T5's guard against fp16 overflow in the residual stream (a no-op in other dtypes)."""
    if hidden_states.dtype != torch.float16:
        return hidden_states
    finfo = torch.finfo(hidden_states.dtype)
    clamp_value = torch.where(torch.isinf(hidden_states).any(), finfo.max - 1000, finfo.max)
    return torch.clamp(hidden_states, min=-clamp_value, max=clamp_value)


class WEMoET5DenseActDense(nn.Module):
    """T5's feed-forward, `wo(act(wi x))` or gated `wo(act(wi_0 x) * wi_1 x)` (Flan-T5, T5 v1.1), with every linear
    weight-ensembled under one routing vector. Parameter names match T5's `DenseReluDense`."""

    def __init__(self, config: WEMoEConfig, text_config: PreTrainedConfig):
        super().__init__()
        self.is_gated = text_config.is_gated_act
        d_model, d_ff = text_config.d_model, text_config.d_ff
        if self.is_gated:
            self.wi_0 = WEMoELinear(config, d_model, d_ff, bias=False)
            self.wi_1 = WEMoELinear(config, d_model, d_ff, bias=False)
        else:
            self.wi = WEMoELinear(config, d_model, d_ff, bias=False)
        self.wo = WEMoELinear(config, d_ff, d_model, bias=False)
        self.dropout = nn.Dropout(text_config.dropout_rate)
        self.act = ACT2FN[text_config.dense_act_fn]

    def forward(self, hidden_states: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        if self.is_gated:
            activated = self.act(self.wi_0(hidden_states, routing_weights)) * self.wi_1(hidden_states, routing_weights)
        else:
            activated = self.act(self.wi(hidden_states, routing_weights))
        return self.wo(self.dropout(activated), routing_weights)


class WEMoET5LayerFF(nn.Module):
    """T5's pre-norm feed-forward sub-layer with a WEMoE `DenseReluDense` and its router."""

    def __init__(self, config: WEMoEConfig, text_config: PreTrainedConfig, granularity: str):
        super().__init__()
        self.granularity = granularity
        self.top_k = config.router_top_k
        self.DenseReluDense = WEMoET5DenseActDense(config, text_config)
        self.layer_norm = T5LayerNorm(text_config.d_model, eps=text_config.layer_norm_epsilon)
        self.dropout = nn.Dropout(text_config.dropout_rate)
        self.router = build_router(config, text_config.d_model, "per_layer")

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        shared_router: WEMoERouter | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        normed = self.layer_norm(hidden_states)
        router = self.router if self.router is not None else shared_router
        routing_weights = compute_routing_weights(router, normed, self.granularity, token_mask, self.top_k)
        forwarded = self.DenseReluDense(normed, routing_weights)
        return hidden_states + self.dropout(forwarded), routing_weights


class WEMoET5Block(nn.Module):
    """A T5 block (self-attention, cross-attention in the decoder, feed-forward) with a WEMoE feed-forward."""

    def __init__(self, config: WEMoEConfig, text_config: PreTrainedConfig, layer_idx: int, granularity: str):
        super().__init__()
        self.is_decoder = text_config.is_decoder
        self.layer = nn.ModuleList(
            [T5LayerSelfAttention(text_config, has_relative_attention_bias=layer_idx == 0, layer_idx=layer_idx)]
        )
        if self.is_decoder:
            self.layer.append(T5LayerCrossAttention(text_config, layer_idx=layer_idx))
        self.layer.append(WEMoET5LayerFF(config, text_config, granularity))

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_bias: torch.Tensor | None,
        token_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        encoder_decoder_position_bias: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        shared_router: WEMoERouter | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        hidden_states, position_bias, _ = self.layer[0](
            hidden_states, attention_mask=attention_mask, position_bias=position_bias, past_key_values=past_key_values
        )
        hidden_states = clamp_inf_for_fp16(hidden_states)
        if self.is_decoder and encoder_hidden_states is not None:
            hidden_states, encoder_decoder_position_bias, _ = self.layer[1](
                hidden_states,
                key_value_states=encoder_hidden_states,
                attention_mask=encoder_attention_mask,
                position_bias=encoder_decoder_position_bias,
                past_key_values=past_key_values,
            )
            hidden_states = clamp_inf_for_fp16(hidden_states)
        hidden_states, routing_weights = self.layer[-1](hidden_states, token_mask, shared_router)
        return clamp_inf_for_fp16(hidden_states), position_bias, encoder_decoder_position_bias, routing_weights


class WEMoET5Stack(nn.Module):
    """T5's encoder or decoder stack (same parameter names, minus the embedding, which the model owns)."""

    main_input_name = "input_ids"  # what `generate()` feeds the encoder entry (`WEMoEForConditionalGeneration.encode`)

    def __init__(self, config: WEMoEConfig, text_config: PreTrainedConfig):
        super().__init__()
        self.config = text_config
        self.is_decoder = text_config.is_decoder
        granularity = "token" if self.is_decoder else config.routing_granularity
        self.block = nn.ModuleList(
            [WEMoET5Block(config, text_config, i, granularity) for i in range(text_config.num_layers)]
        )
        self.final_layer_norm = T5LayerNorm(text_config.d_model, eps=text_config.layer_norm_epsilon)
        self.dropout = nn.Dropout(text_config.dropout_rate)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        shared_router: WEMoERouter | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        # Encoder routing averages over real tokens only; decoder routing is per token and needs no mask.
        token_mask = None if self.is_decoder else attention_mask
        if self.is_decoder:
            self_attention_cache = (
                past_key_values.self_attention_cache
                if isinstance(past_key_values, EncoderDecoderCache)
                else past_key_values
            )
            attention_mask = create_causal_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                past_key_values=self_attention_cache,
            )
            encoder_attention_mask = create_bidirectional_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=encoder_attention_mask,
                encoder_hidden_states=encoder_hidden_states,
            )
        else:
            attention_mask = create_bidirectional_mask(
                config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask
            )

        hidden_states = self.dropout(inputs_embeds)
        all_hidden_states, all_routing_weights = (hidden_states,), ()
        position_bias = encoder_decoder_position_bias = None
        for block in self.block:
            hidden_states, position_bias, encoder_decoder_position_bias, routing_weights = block(
                hidden_states,
                attention_mask,
                position_bias,
                token_mask=token_mask,
                encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask,
                encoder_decoder_position_bias=encoder_decoder_position_bias,
                past_key_values=past_key_values,
                shared_router=shared_router,
            )
            all_hidden_states += (hidden_states,)
            all_routing_weights += (routing_weights,)
        hidden_states = self.dropout(self.final_layer_norm(hidden_states))
        return hidden_states, all_hidden_states, all_routing_weights


@dataclass
class WEMoEEncoderOutput(BaseModelOutput):
    r"""
    routing_weights (`tuple(torch.FloatTensor)`, *optional*, returned when `output_routing_weights=True`):
        Per encoder layer, the routing weights used: `(batch_size, num_experts)` per sample or
        `(batch_size, seq_len, num_experts)` per token.
    """

    routing_weights: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class WEMoESeq2SeqLMOutput(Seq2SeqLMOutput):
    r"""
    encoder_routing_weights (`tuple(torch.FloatTensor)`, *optional*, returned when `output_routing_weights=True`):
        Per encoder layer, `(batch_size, num_experts)` per sample or `(batch_size, seq_len, num_experts)` per token.
    decoder_routing_weights (`tuple(torch.FloatTensor)`, *optional*, returned when `output_routing_weights=True`):
        Per decoder layer, `(batch_size, target_len, num_experts)`: the decoder routes every token.
    """

    encoder_routing_weights: tuple[torch.FloatTensor, ...] | None = None
    decoder_routing_weights: tuple[torch.FloatTensor, ...] | None = None


class WEMoET5EncoderEntry:
    """What `generate()` calls as the encoder (`get_encoder()`): the model's own `encode`, which embeds with the
    model's `shared` embedding and routes with its shared router, both owned once by the model."""

    def __init__(self, model: "WEMoEForConditionalGeneration"):
        self.forward = model.encode

    def __call__(self, *args, **kwargs) -> WEMoEEncoderOutput:
        return self.forward(*args, **kwargs)


class WEMoEForConditionalGeneration(WEMoEPreTrainedModel, GenerationMixin):
    """T5 / Flan-T5 with WEMoE feed-forward blocks in the encoder and decoder, everything else merged statically.

    Parameter names match `T5ForConditionalGeneration` (`shared`, `encoder.block.{i}.layer...`, `decoder...`,
    `lm_head`), plus each linear's `*_task_vectors` and the routers. The encoder routes per sample (its real tokens
    averaged) or per token; the decoder per token, so `generate()` gives the same output with and without the cache.
    """

    _tied_weights_keys = {"lm_head.weight": "shared.weight"}  # only when `config.tie_word_embeddings`
    _supports_flash_attn = False
    main_input_name = "input_ids"

    def __init__(self, config: WEMoEConfig):
        super().__init__(config)
        check_config_fits(WEMoEForConditionalGeneration, config)
        # The setter hands the attention implementation down to `text_config`, which T5Attention reads.
        config._attn_implementation = config._attn_implementation
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
        **kwargs,
    ) -> WEMoEEncoderOutput:
        """Run the encoder; its routing weights are always returned (they are small)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Give exactly one of `input_ids` and `inputs_embeds`.")
        if inputs_embeds is None:
            inputs_embeds = self.shared(input_ids)
        last_hidden_state, hidden_states, routing_weights = self.encoder(
            inputs_embeds, attention_mask=attention_mask, shared_router=self.router
        )
        return WEMoEEncoderOutput(
            last_hidden_state=last_hidden_state,
            hidden_states=hidden_states if output_hidden_states else None,
            routing_weights=routing_weights,
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
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_routing_weights: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> WEMoESeq2SeqLMOutput | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`):
                Tokenized prompts, e.g. `"sst2 sentence: ..."`; pad anywhere the attention mask says.
            decoder_input_ids (`torch.LongTensor` of shape `(batch_size, target_len)`, *optional*):
                Decoder inputs; derived from `labels` when only those are given.
            labels (`torch.LongTensor` of shape `(batch_size, target_len)`, *optional*):
                Target token ids (-100 is ignored); a cross-entropy loss is returned with them.
            output_routing_weights (`bool`, *optional*, defaults to `False`):
                Return every encoder and decoder layer's routing weights, for analysis.

        Other arguments are those of `T5ForConditionalGeneration.forward`.

        Example:

        ```python
        >>> from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
        >>> model = AutoModelForSeq2SeqLM.from_pretrained("path/to/wemoe-t5", trust_remote_code=True)
        >>> tokenizer = AutoTokenizer.from_pretrained("path/to/wemoe-t5")
        >>> inputs = tokenizer(["sst2 sentence: a gorgeous, witty movie."], return_tensors="pt")
        >>> tokenizer.batch_decode(model.generate(**inputs), skip_special_tokens=True)
        ```
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if encoder_outputs is None:
            encoder_outputs = self.encode(input_ids, attention_mask, inputs_embeds, output_hidden_states)
        elif not isinstance(encoder_outputs, BaseModelOutput):
            encoder_outputs = WEMoEEncoderOutput(last_hidden_state=encoder_outputs[0])

        if labels is not None and decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = self._shift_right(labels)
        if (decoder_input_ids is None) == (decoder_inputs_embeds is None):
            raise ValueError("Give exactly one of `decoder_input_ids`, `decoder_inputs_embeds` (or `labels`).")
        if decoder_inputs_embeds is None:
            decoder_inputs_embeds = self.shared(decoder_input_ids)
        use_cache = use_cache if use_cache is not None else self.config.text_config.use_cache
        if use_cache and past_key_values is None:
            past_key_values = EncoderDecoderCache(
                DynamicCache(config=self.decoder.config), DynamicCache(config=self.decoder.config)
            )
        elif not use_cache:
            past_key_values = None

        sequence_output, decoder_hidden_states, decoder_routing_weights = self.decoder(
            decoder_inputs_embeds,
            attention_mask=decoder_attention_mask,
            encoder_hidden_states=encoder_outputs.last_hidden_state,
            encoder_attention_mask=attention_mask,
            past_key_values=past_key_values,
            shared_router=self.router,
        )
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
            past_key_values=past_key_values,
            decoder_hidden_states=decoder_hidden_states if output_hidden_states else None,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_routing_weights=encoder_routing_weights if output_routing_weights else None,
            decoder_routing_weights=decoder_routing_weights if output_routing_weights else None,
        )
        return output if return_dict else output.to_tuple()

    def save_pretrained(self, save_directory, *args, **kwargs):
        # The artifact's `pipeline_wemoe.py` (copied with the modeling file, which imports it) restores the
        # `text2text-generation` task that transformers 5 removed.
        self.config.custom_pipelines = {
            "text2text-generation": {
                "impl": f"pipeline_wemoe.{WEMoEText2TextGenerationPipeline.__name__}",
                "pt": ["AutoModelForSeq2SeqLM"],
                "type": "text",
            }
        }
        return super().save_pretrained(save_directory, *args, **kwargs)


WEMoEForConditionalGeneration.register_for_auto_class("AutoModelForSeq2SeqLM")

__all__ = [
    "WEMoEDenseTaskVectors",
    "WEMoEForConditionalGeneration",
    "WEMoEForImageClassification",
    "WEMoELinear",
    "WEMoELowRankTaskVectors",
    "WEMoEPreTrainedModel",
    "WEMoERouter",
    "WEMoESparseTaskVectors",
    "WEMoECLIPMLP",
    "compute_routing_weights",
    "num_kept_entries",
    "pack_bitmask",
    "unpack_bitmask",
]
