"""The WEMoE layers every backbone shares: task-vector storage, the weight-ensembled linear, the router, attention,
and the pretrained-model base class. One `modeling_wemoe_<family>.py` per backbone builds a model from them.

Method: Tang et al., "Merging Multi-Task Models via Weight-Ensembling Mixture of Experts" (ICML 2024) and
Shen et al., "Efficient and Effective Weight-Ensembling Mixture of Experts for Multi-Task Model Merging" (E-WEMoE).
Every MLP weight W of layer l becomes, for input x, W(x) = W0 + sum_i r_i(x) * tau_i, with r = router_l(h) and
tau_i = theta_i - theta_0 the task vector of expert i; everything else is merged once by the converter.

Shipped inside every artifact: imports only torch, transformers' public API and the sibling configuration file, so
that a published artifact keeps working when transformers changes the internals of its own model families.
"""

import json
import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import logging

from .configuration_wemoe import WEMoEConfig

logger = logging.get_logger(__name__)


def num_kept_entries(numel: int, keep: float) -> int:
    """Entries a sparse task-vector tensor of `numel` entries keeps: round(keep * numel)."""
    return round(keep * numel)


def magnitude_keep_mask(task_vectors: torch.Tensor, keep: float) -> torch.Tensor:
    """For each expert's tensor in `(num_experts, *shape)`, mark exactly round(keep * numel) entries of largest
    magnitude (E-WEMoE's per-tensor magnitude pruning)."""
    flat = task_vectors.reshape(task_vectors.shape[0], -1)
    num_kept = num_kept_entries(flat.shape[1], keep)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask.scatter_(1, flat.abs().topk(num_kept, dim=1).indices, True)
    return mask.view(task_vectors.shape)


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


# One sample's merged tile of a weight matrix, in bytes: 256 rows of a ViT-B/32 fc1 in float32, 512 in bfloat16. On
# CPU (2 threads, ViT-B/32, batch 16, with W0 merged as an expert of weight 1) this measured fastest for the whole
# model: with attention upscaled too, 2.10x the dense forward against 2.18x at 384 KiB, 2.09x at 1536 KiB and 2.43x
# at 192 KiB; MLP only, 1.80x against 1.84x, 1.82x and 1.97x. Smaller tiles pay more in calls and run the per-sample
# matmuls on fewer columns; larger ones fall out of cache.
TILE_BYTES = 768 * 1024
# The same under autograd (adaptation through the experts), where every tile's merged weight is a fresh tensor kept
# for backward: smaller ones measured faster (the entropy step per sample, 3.3x a dense training step at 192 KiB
# against 4.6x at 768 KiB).
RECORDED_TILE_BYTES = 192 * 1024


def tile_size(row_width: int, dtype: torch.dtype, recorded: bool = False) -> int:
    """Rows (or, for column tiles, columns) of `row_width` entries merged and applied together per sample;
    `recorded`: for a forward recorded for backward."""
    return max(1, (RECORDED_TILE_BYTES if recorded else TILE_BYTES) // (row_width * dtype.itemsize))


def even_tile(length: int, largest: int) -> int:
    """At most `largest`, and where one is at least half of it, a divisor of `length`: every tile is then full and
    reuses the buffers, where a last, partial tile allocates its own (Flan-T5-small's 2048-row fc: 1.7x the dense
    encoder with tiles of 256 rows, 2.2x with 384 and a partial one)."""
    if largest >= length:
        return length
    return next((tile for tile in range(largest, largest // 2, -1) if length % tile == 0), largest)


def with_base_weight(routing_weights: torch.Tensor) -> torch.Tensor:
    """Routing weights `(batch, num_experts)` with a leading column of ones: `[1, r] @ [W0; tau]` is the merge."""
    return torch.cat([routing_weights.new_ones(routing_weights.shape[0], 1), routing_weights], dim=-1)


def merge_column_tile(
    base_and_routing: torch.Tensor, stacked: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """`[1, r] @ [W0; tau]` on a tile of input columns, `stacked` `(1 + num_experts, columns, out)` held either way
    round in memory (a view of a stack held transposed, or the transpose of a gathered tile): one matmul over the
    tile as it lies, `(batch, columns, out)`, transposed back where it lay the other way round."""
    held = stacked if stacked[0].is_contiguous() else stacked.transpose(1, 2)
    merged = torch.mm(base_and_routing, held.reshape(held.shape[0], -1), out=out)
    merged = merged.view(-1, *held.shape[1:])
    return merged if held is stacked else merged.transpose(1, 2)


def needs_autograd(*tensors: torch.Tensor) -> bool:
    """Whether an operation on `tensors` is recorded for backward (test-time adaptation), where `out=` cannot be."""
    return torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors)


class WEMoETaskVectors(nn.Module):
    """The task vectors of one tensor, in some storage format, and the products WEMoE needs from them.

    `apply` is the whole weight-ensembled matmul `x (W0 + sum_i r_i tau_i)^T` for one weight matrix; `combine` the
    ensembled delta `sum_i r_i tau_i` of a small tensor (a bias). Subclasses store the task vectors densely,
    sparsely, or as low-rank factors; the default `apply` works from `tile`, a few rows of every expert at a time,
    or for a matrix with more inputs than outputs from `column_tile`, a few of its input columns.
    """

    shape: tuple[int, ...]

    @property
    def num_stored_entries(self) -> int:
        """How many numbers the storage holds (for the parameter report)."""
        raise NotImplementedError

    def assign_task_vectors(self, task_vectors: torch.Tensor) -> torch.Tensor | None:
        """Store dense `(num_experts, *shape)` task vectors in this format, compressing them as the format does
        (the converter hands every format the same dense stack). Returns each expert's relative reconstruction error
        where the format approximates a task vector by factors (low-rank), else None."""
        raise NotImplementedError

    def dense(self) -> torch.Tensor:
        """The task vectors as a dense `(num_experts, *shape)` tensor (for analysis and tests)."""
        raise NotImplementedError

    def zero_(self) -> None:
        """Empty task vectors: a model built from its config alone is the pre-trained base."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Build, ahead of the first forward, what forwards derive from the stored tensors (nothing here)."""

    def stack_under(self, base: torch.Tensor) -> None:
        """Hold a copy of the pre-trained tensor `base` and the task vectors in one tensor, where the format allows
        it (dense), so that a merge reads each tile's `[W0; tau]` in place; nothing here."""

    def is_stacked_under(self, base: torch.Tensor) -> bool:
        """Whether the store holds `base`, as it is now, above its task vectors (`stack_under`)."""
        return False

    def per_token_read_fraction(self) -> float:
        """What `expert_outputs` reads per token, as a fraction of the dense task vectors."""
        return 1.0

    def goes_by_columns(self) -> bool:
        """Whether the per-sample path tiles this matrix by input columns (more inputs than outputs) or by rows."""
        return len(self.shape) == 2 and self.shape[1] > self.shape[0]

    def per_sample_tile(self, dtype: torch.dtype, recorded: bool = False) -> int:
        """Rows, or input columns, per tile of the per-sample path for inputs of `dtype` (`recorded`: under
        autograd)."""
        if self.goes_by_columns():
            return even_tile(self.shape[1], tile_size(self.shape[0], dtype, recorded))
        return even_tile(self.shape[0], tile_size(self.shape[-1], dtype, recorded))

    def tile(self, index: int, tile_rows: int) -> torch.Tensor:
        """Every expert's task vector restricted to rows `[index * tile_rows, (index + 1) * tile_rows)`, flattened:
        `(num_experts, rows * row_width)`."""
        raise NotImplementedError

    def column_tile(self, index: int, columns: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Every expert's task vector restricted to input columns `[index * columns, (index + 1) * columns)` of a
        matrix, `(num_experts, out * width)` in (row, column) order; written into `out` `(num_experts, out, columns)`
        (a full tile) when given."""
        raise NotImplementedError

    def stacked_tile(
        self, weight: torch.Tensor, index: int, tile_rows: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`[W0; tau_1; ...; tau_n]` on one tile of rows as one `(1 + num_experts, rows * row_width)` matrix, for
        `weight` the pre-trained tensor; written into `out` (a full tile) when given."""
        base = weight[index * tile_rows : (index + 1) * tile_rows].reshape(1, -1)
        return torch.cat([base, self.tile(index, tile_rows)], out=out)

    def stacked_column_tile(
        self, weight: torch.Tensor, index: int, columns: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`[W0; tau_1; ...; tau_n]` on input columns `[index * columns, (index + 1) * columns)` of a matrix,
        transposed: `(1 + num_experts, width, out)`, either way round in memory (`merge_column_tile`). Here the
        transpose of the tile gathered, written into `out` `(1 + num_experts, out, columns)` (a full tile) when
        given."""
        base = weight[:, index * columns : (index + 1) * columns]
        if out is None:
            gathered = torch.cat([base.reshape(1, -1), self.column_tile(index, columns)])
            return gathered.view(gathered.shape[0], *base.shape).transpose(1, 2)
        out[0].copy_(base)
        self.column_tile(index, columns, out=out[1:])
        return out.transpose(1, 2)

    def merge_tile(
        self,
        weight: torch.Tensor,
        routing_weights: torch.Tensor,
        index: int,
        tile_rows: int,
        out: torch.Tensor | None = None,
        stack_buffer: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`W0 + sum_i r[b, i] * tau_i` on one tile of rows, for every row b of `(batch, num_experts)` routing
        weights, where `weight` is the pre-trained tensor: `(batch, rows, *shape[1:])`; written into `out`
        `(batch, rows * row_width)` when given. One matmul with W0 as an expert of weight 1: adding W0 to every
        sample's tile afterwards cost as much as the merge itself (ViT-B/32 shapes, 2 threads)."""
        stacked = self.stacked_tile(weight, index, tile_rows, out=stack_buffer)
        merged = torch.mm(with_base_weight(routing_weights.to(stacked.dtype)), stacked, out=out)
        return merged.view(routing_weights.shape[0], -1, *self.shape[1:])

    def expert_outputs(self, rows: torch.Tensor) -> torch.Tensor:
        """`tau_i x^T` for every expert of a weight matrix and rows `x` `(tokens, in)`: `(num_experts, out, tokens)`.

        One matmul per expert with the task vector as the left operand: for a few rows (decoding steps), torch's CPU
        `F.linear` ran single-threaded and re-packed the whole task vector per call; this form measured 1.5-2.5x
        faster at 1-16 rows on two threads, and no slower at 800.
        """
        task_vectors = self.tile(0, self.shape[0]).view(-1, *self.shape)
        return torch.bmm(task_vectors, rows.t().expand(task_vectors.shape[0], -1, -1))

    def combine(self, routing_weights: torch.Tensor) -> torch.Tensor:
        """sum_i r[..., i] * tau_i over the whole tensor for routing weights `(..., num_experts)`: `(..., *shape)`."""
        tile = self.tile(0, self.shape[0])
        merged = routing_weights.to(tile.dtype) @ tile
        return merged.view(*routing_weights.shape[:-1], *self.shape)

    def merged_weight(self, weight: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        """`W0 + sum_i r_i tau_i` for one set of routing weights `(num_experts,)`, `weight` the pre-trained tensor."""
        return weight + self.combine(routing_weights).to(weight.dtype)

    def apply(
        self, hidden_states: torch.Tensor, weight: torch.Tensor, routing_weights: torch.Tensor, top_k: int | None
    ) -> torch.Tensor:
        """`x (W0 + sum_i r_i tau_i)^T` for inputs `(batch, seq, in)` and routing weights `(batch, num_experts)`
        (one weight per sample) or `(batch, seq, num_experts)` (one per token); no bias."""
        if routing_weights.dim() == 2 and hidden_states.shape[-2] * self.per_token_read_fraction() > 1:
            return self._apply_per_sample(hidden_states, weight, routing_weights)
        if routing_weights.dim() == 2:
            # Few tokens per sample (decoding steps): x tau_i^T for every expert reads the stored entries once per
            # token, which costs less than merging a weight for each sample.
            routing_weights = routing_weights.unsqueeze(-2)
        return self._apply_per_token(hidden_states, weight, routing_weights)

    def _apply_per_sample(
        self, hidden_states: torch.Tensor, weight: torch.Tensor, routing_weights: torch.Tensor
    ) -> torch.Tensor:
        if self.goes_by_columns():
            return self._apply_in_column_tiles(hidden_states, weight, routing_weights)
        # Merge and apply one tile of output rows at a time: each sample's merged tile (W0 + sum_i r_i tau_i) stays
        # in cache, and the task vectors are read once per batch, instead of writing and re-reading a whole merged
        # weight per sample (memory-bound: ~6x a dense linear at ViT-B/32 size against ~2x tiled).
        (batch, seq, in_features), out_features = hidden_states.shape, weight.shape[0]
        routing_weights = routing_weights.to(hidden_states.dtype)
        output = hidden_states.new_empty(batch, seq, out_features)
        # Without autograd, every full tile reuses buffers: a fresh allocation per tile (several MB at ViT-B/32
        # size) costs page faults that measured as much as the merge itself.
        reuse = not needs_autograd(hidden_states, weight, routing_weights)
        tile_rows = self.per_sample_tile(hidden_states.dtype, recorded=not reuse)
        merged_buffer = hidden_states.new_empty(batch, tile_rows * in_features) if reuse else None
        product_buffer = hidden_states.new_empty(batch, seq, tile_rows) if reuse else None
        stack_buffer = None
        if reuse and not self.is_stacked_under(weight):
            stack_buffer = weight.new_empty(1 + routing_weights.shape[-1], tile_rows * in_features)
        for tile in range(math.ceil(out_features / tile_rows)):
            rows = slice(tile * tile_rows, min((tile + 1) * tile_rows, out_features))
            full = rows.stop - rows.start == tile_rows
            buffers = (merged_buffer, stack_buffer) if full else (None, None)
            merged = self.merge_tile(weight, routing_weights, tile, tile_rows, *buffers)
            product = torch.matmul(hidden_states, merged.transpose(-1, -2), out=product_buffer if full else None)
            output[..., rows] = product
        return output

    def _apply_in_column_tiles(
        self, hidden_states: torch.Tensor, weight: torch.Tensor, routing_weights: torch.Tensor
    ) -> torch.Tensor:
        # More inputs than outputs (an MLP's down projection): per sample, a tile of output rows is a long thin
        # matmul, which ran at half the dense speed. Go by tiles of input columns instead, adding
        # x[:, cols] (W0 + sum_i r_i tau_i)[:, cols]^T into the output.
        (batch, seq, in_features), out_features = hidden_states.shape, weight.shape[0]
        routing_weights = routing_weights.to(hidden_states.dtype)
        base_and_routing = with_base_weight(routing_weights)
        output = hidden_states.new_zeros(batch, seq, out_features)
        reuse = not needs_autograd(hidden_states, weight, routing_weights)
        columns = self.per_sample_tile(hidden_states.dtype, recorded=not reuse)
        stack_buffer = merged_buffer = None
        if reuse:
            merged_buffer = hidden_states.new_empty(batch, out_features * columns)
            if not self.is_stacked_under(weight):
                stack_buffer = weight.new_empty(base_and_routing.shape[-1], out_features, columns)
        for index in range(math.ceil(in_features / columns)):
            tile = slice(index * columns, min((index + 1) * columns, in_features))
            full = reuse and tile.stop - tile.start == columns
            stacked = self.stacked_column_tile(weight, index, columns, out=stack_buffer if full else None)
            merged = merge_column_tile(base_and_routing, stacked, out=merged_buffer if full else None)
            if reuse:
                output.baddbmm_(hidden_states[..., tile], merged)
            else:
                output = torch.baddbmm(output, hidden_states[..., tile], merged)
        return output

    def _apply_per_token(
        self, hidden_states: torch.Tensor, weight: torch.Tensor, routing_weights: torch.Tensor
    ) -> torch.Tensor:
        # x (W0 + sum_i r_i tau_i)^T = x W0^T + sum_i r_i (x tau_i^T): exact per token, no per-token weight copies.
        # All experts in one matmul: the steps of generation route a few tokens each, where a loop over tiles of
        # rows would cost more in calls than it saves.
        rows = hidden_states.reshape(-1, hidden_states.shape[-1])
        per_expert = self.expert_outputs(rows)
        weights = routing_weights.expand(*hidden_states.shape[:-1], -1).reshape(rows.shape[0], -1)
        delta = (per_expert * weights.t().to(per_expert.dtype).unsqueeze(1)).sum(0)  # (out, tokens)
        return F.linear(hidden_states, weight) + delta.t().reshape(*hidden_states.shape[:-1], -1)


def contiguous_values(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """A state-dict post-hook: savers (safetensors refuses a tensor that is not contiguous) get task vectors held
    transposed (`WEMoEDenseTaskVectors.stack_under`) as a plain `(num_experts, out, in)` copy; `keep_vars=True`
    still gets the parameter itself."""
    key = f"{prefix}values"
    tensor = state_dict.get(key)
    if tensor is not None and tensor is not module.values and not tensor.is_contiguous():
        # Expert by expert: torch's blocked transposing copy takes 2-D tensors only (a ViT-B/32 fc2's 8 experts:
        # 47 ms, against 131 ms for `.contiguous()` of the 3-D view).
        plain = torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device)
        for expert, held in zip(plain, tensor, strict=True):
            expert.copy_(held)
        state_dict[key] = plain


class WEMoEDenseTaskVectors(WEMoETaskVectors):
    """The task vectors of one tensor, stacked as `values` `(num_experts, *shape)` (held transposed, a view with the
    transpose's strides, once `stack_under` has moved a matrix that goes by input columns)."""

    def __init__(self, num_experts: int, shape: tuple[int, ...]):
        super().__init__()
        self.shape = tuple(shape)
        self.values = nn.Parameter(torch.zeros(num_experts, *shape), requires_grad=False)
        self._stacked: torch.Tensor | None = None
        # The W0 copied (held, so that no other tensor can take its address) and its version counter then.
        self._stacked_base: tuple[torch.Tensor, int] | None = None
        self.register_state_dict_post_hook(contiguous_values)

    def stacked_order(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` `(..., out, in)` in the order `stack_under` holds this matrix: transposed where it goes by input
        columns, so that a tile of columns is contiguous rows of the stack."""
        return tensor.transpose(-1, -2) if self.goes_by_columns() else tensor

    def stack_under(self, base: torch.Tensor) -> None:
        """Move `values` into one `(1 + num_experts, ...)` tensor under a copy of `base`, in `stacked_order`: each
        tile's `[W0; tau]` is then a view, read by the merge in place. Copying each tile of rows together measured
        0.14x of the dense forward at ViT-B/32 shape with attention upscaled; a ViT-B/32 fc2 that gathered each tile
        of input columns (and read the merged tile transposed) took 29-33 ms, against 21-22 ms read in place (batch
        16, 2 threads). The copy costs one more W0 per matrix."""
        if len(self.shape) != 2 or base.is_meta or self.values.is_meta:
            return
        if (base.dtype, base.device, base.shape) != (self.values.dtype, self.values.device, self.values.shape[1:]):
            return
        stacked = torch.cat([self.stacked_order(base.detach()).unsqueeze(0), self.stacked_order(self.values.detach())])
        # `values` gets a storage of its own, the bytes after the copy of W0 (a slice of the stacked tensor's, which
        # it keeps alive): savers (transformers; safetensors' `save_model`/`load_model`, which accelerate's
        # checkpoints use) refuse a tensor that covers only part of its storage, and see a plain tensor instead.
        after_base = stacked.untyped_storage()[stacked[0].numel() * stacked.element_size() :]
        self.values.data = self.stacked_order(stacked.new_empty(0).set_(after_base, 0, stacked[1:].shape))
        self._stacked, self._stacked_base = stacked, (base.detach(), base._version)

    def is_stacked_under(self, base: torch.Tensor) -> bool:
        # A W0 changed in place, or either tensor replaced (`.to()`, loading with assign), leaves the copy stale.
        if self._stacked is None:
            return False
        copied, version = self._stacked_base
        held, values = self.stacked_order(self._stacked[1:]), self.values
        still_held = (values.data_ptr(), values.shape, values.stride()) == (held.data_ptr(), held.shape, held.stride())
        return still_held and (base.data_ptr(), base._version) == (copied.data_ptr(), version)

    def stacked_tile(
        self, weight: torch.Tensor, index: int, tile_rows: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not self.is_stacked_under(weight):
            return super().stacked_tile(weight, index, tile_rows, out)
        rows = self._stacked[:, index * tile_rows : (index + 1) * tile_rows]
        return rows.reshape(rows.shape[0], -1)

    def stacked_column_tile(
        self, weight: torch.Tensor, index: int, columns: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not self.is_stacked_under(weight):
            return super().stacked_column_tile(weight, index, columns, out)
        return self._stacked[:, index * columns : (index + 1) * columns]

    @property
    def num_stored_entries(self) -> int:
        return self.values.numel()

    def assign(self, task_vectors: torch.Tensor) -> None:
        """Store `(num_experts, *shape)` task vectors."""
        with torch.no_grad():
            self.values.copy_(task_vectors)

    def assign_task_vectors(self, task_vectors: torch.Tensor) -> None:
        self.assign(task_vectors)

    def dense(self) -> torch.Tensor:
        return self.values

    def zero_(self) -> None:
        init.zeros_(self.values)

    def tile(self, index: int, tile_rows: int) -> torch.Tensor:
        rows = self.values[:, index * tile_rows : (index + 1) * tile_rows]
        return rows.reshape(rows.shape[0], -1)

    def column_tile(self, index: int, columns: int, out: torch.Tensor | None = None) -> torch.Tensor:
        tile = self.values[:, :, index * columns : (index + 1) * columns]
        return tile.reshape(tile.shape[0], -1) if out is None else out.copy_(tile).view(tile.shape[0], -1)

    def expert_outputs(self, rows: torch.Tensor) -> torch.Tensor:
        # `bmm` reads task vectors held transposed as they lie, where `tile` would copy them.
        return torch.bmm(self.values, rows.t().expand(self.values.shape[0], -1, -1))

    def merged_weight(self, weight: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        if not self.is_stacked_under(weight):
            return super().merged_weight(weight, routing_weights)
        # One matmul over the stack as it lies; held transposed, the result is the transpose's view, which `F.linear`
        # reads as it is (adding W0 to a delta held transposed reads one of them across its strides, several times
        # slower).
        stacked = self._stacked.view(self._stacked.shape[0], -1)
        merged = with_base_weight(routing_weights.unsqueeze(0).to(stacked.dtype)) @ stacked
        return self.stacked_order(merged.view(self._stacked.shape[1:]))

    def extra_repr(self) -> str:
        return f"num_experts={self.values.shape[0]}, shape={self.shape}"


class WEMoESparseTaskVectors(WEMoETaskVectors):
    """The task vectors of one tensor, each pruned to its `round(keep * numel)` kept entries.

    Stored compactly: `values` `(num_experts, k)` in ascending flat-index order and `bitmask`
    `(num_experts, ceil(numel / 8))` marking which entries were kept (1 bit per entry instead of a 64-bit index).
    """

    def __init__(self, num_experts: int, shape: tuple[int, ...], keep: float):
        super().__init__()
        self.shape = tuple(shape)
        self.keep = keep
        self.numel = math.prod(shape)
        self.num_kept = num_kept_entries(self.numel, keep)
        self.values = nn.Parameter(torch.zeros(num_experts, self.num_kept), requires_grad=False)
        self.register_buffer("bitmask", torch.zeros(num_experts, math.ceil(self.numel / 8), dtype=torch.uint8))
        self._derived_key = None
        self._tile_layouts: dict[tuple[str, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
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

    def assign_task_vectors(self, task_vectors: torch.Tensor) -> None:
        """E-WEMoE's pruning: each expert keeps its `round(keep * numel)` largest-magnitude entries."""
        self.assign(task_vectors, magnitude_keep_mask(task_vectors, self.keep))

    def zero_(self) -> None:
        init.zeros_(self.values)
        first_entries = torch.arange(self.numel) < self.num_kept
        init.copy_(self.bitmask, pack_bitmask(first_entries).expand_as(self.bitmask))

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

    def prepare(self) -> None:
        # The tile index is about 0.65x the sparse store: built here, at load, a first forward allocates no more
        # than a warm one. A bias is combined whole; a matrix goes by the tiles `_apply_per_sample` uses for inputs
        # of its dtype (input columns when it has more inputs than outputs). Offloaded (meta) tensors build theirs
        # when they are loaded for a forward.
        if self.values.is_meta or self.bitmask.is_meta:
            return
        if len(self.shape) == 1:
            self.tile_layout(self.shape[0])
        elif self.goes_by_columns():
            self.column_layout(self.per_sample_tile(self.values.dtype))
        else:
            self.tile_layout(self.per_sample_tile(self.values.dtype))

    def _apply(self, fn, recurse=True):
        # `.to()`, `.half()`...: a prepared index is rebuilt for the moved tensors now, not in the next forward.
        prepared = bool(self._tile_layouts)
        module = super()._apply(fn, recurse)
        if prepared:
            self.prepare()
        return module

    def tile_layout(self, tile_rows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per row tile: where each kept entry goes in a `(num_experts, tile_rows * row_width)` slab (int32), and
        the entries in that order. Derived from the stored tensors once per tile height, and again only when they
        change."""
        return self._derived_layout(("rows", tile_rows), self._build_tile_layout)

    def column_layout(self, columns: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per tile of input columns of a matrix: where each kept entry goes in a `(num_experts, out, columns)`
        slab (int32), and the entries in that order."""
        return self._derived_layout(("columns", columns), self._build_column_layout)

    def _derived_layout(self, key: tuple[str, int], build) -> list[tuple[torch.Tensor, torch.Tensor]]:
        self._forget_derived_if_changed()
        if key not in self._tile_layouts:
            self._tile_layouts[key] = build(key[1])
        return self._tile_layouts[key]

    def _forget_derived_if_changed(self) -> None:
        key = tuple((t.device, t.dtype, t.data_ptr(), t._version) for t in (self.bitmask, self.values))
        if key != self._derived_key:
            self._derived_key, self._tile_layouts, self._csr = key, {}, None

    def per_token_read_fraction(self) -> float:
        return self.num_kept / self.numel if self.uses_sparse_matmul() else 1.0

    def per_sample_tile(self, dtype: torch.dtype, recorded: bool = False) -> int:
        # One tile index, built at load, serves forwards with and without autograd.
        return super().per_sample_tile(dtype)

    def uses_sparse_matmul(self) -> bool:
        return self.values.dtype in (torch.float32, torch.float64) and len(self.shape) == 2

    def expert_outputs(self, rows: torch.Tensor) -> torch.Tensor:
        # Few tokens at a time (a generation step): one sparse matmul reads only the kept entries, ~5x faster than
        # expanding the task vectors. torch's CPU sparse matmul has no half-precision kernels: expand there.
        if not self.uses_sparse_matmul():
            return super().expert_outputs(rows)
        return (self.csr() @ rows.t()).view(-1, self.shape[0], rows.shape[0])

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

    def _build_column_layout(self, columns: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # From every kept entry's (row, column): its tile, and its place in the tile's (expert, row, column) slab;
        # sorted by tile, then place. Transient int64 tensors of the size of the kept entries, one tensor at a time.
        num_experts, (out_features, in_features) = self.values.shape[0], self.shape
        indices = self.flat_indices()
        experts = torch.arange(num_experts, device=indices.device).unsqueeze(1)
        rows, in_columns = indices // in_features, indices % in_features
        places = ((experts * out_features + rows) * columns + in_columns % columns).flatten()
        tiles = (in_columns // columns).flatten()
        order = torch.argsort(tiles * places.new_tensor(num_experts * out_features * columns) + places)
        positions = places[order].to(torch.int32)
        values = self.values.detach().flatten()[order]
        counts = torch.bincount(tiles, minlength=math.ceil(in_features / columns)).tolist()
        return list(zip(positions.split(counts), values.split(counts), strict=True))

    def column_tile(self, index: int, columns: int, out: torch.Tensor | None = None) -> torch.Tensor:
        positions, tile_values = self.column_layout(columns)[index]
        num_experts, out_features = self.values.shape[0], self.shape[0]
        slab = self.values.new_zeros(num_experts, out_features, columns) if out is None else out.zero_()
        slab.view(-1)[positions] = tile_values
        width = min(columns, self.shape[1] - index * columns)
        return slab.view(num_experts, -1) if width == columns else slab[:, :, :width].reshape(num_experts, -1)

    def tile(self, index: int, tile_rows: int) -> torch.Tensor:
        positions, tile_values = self.tile_layout(tile_rows)[index]
        row_width = self.numel // self.shape[0]
        rows = min(tile_rows, self.shape[0] - index * tile_rows)
        slab = self.values.new_zeros(self.values.shape[0], tile_rows * row_width)
        slab.view(-1)[positions] = tile_values
        return slab[:, : rows * row_width]

    def extra_repr(self) -> str:
        kept = f"{self.num_kept} of {self.numel} entries per expert"
        return f"num_experts={self.values.shape[0]}, shape={self.shape}, keep={self.keep:g} ({kept})"


def low_rank_factors(task_vectors: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors of each expert's task-vector matrix in `(num_experts, out, in)` (truncated SVD):
    `A` `(num_experts, rank, in)`, `B` `(num_experts, out, rank)`, and each expert's relative reconstruction error
    ||tau - B A||_F / ||tau||_F. Ranks above the matrix size are zero-padded (exact)."""
    u, s, vh = torch.linalg.svd(task_vectors.float(), full_matrices=False)
    kept = min(rank, s.shape[-1])
    factor_b = task_vectors.new_zeros(task_vectors.shape[0], task_vectors.shape[1], rank, dtype=torch.float32)
    factor_a = task_vectors.new_zeros(task_vectors.shape[0], rank, task_vectors.shape[2], dtype=torch.float32)
    factor_b[..., :kept] = u[..., :kept] * s[..., None, :kept]
    factor_a[:, :kept] = vh[:, :kept]
    residual = torch.linalg.matrix_norm(task_vectors.float() - factor_b @ factor_a)
    error = residual / torch.linalg.matrix_norm(task_vectors.float()).clamp_min(torch.finfo(torch.float32).tiny)
    return factor_a, factor_b, error


class WEMoELowRankTaskVectors(WEMoETaskVectors):
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

    def assign_task_vectors(self, task_vectors: torch.Tensor) -> torch.Tensor:
        """Each expert's best rank-`rank` factors (truncated SVD), and their relative reconstruction errors."""
        factor_a, factor_b, error = low_rank_factors(task_vectors, self.A.shape[1])
        self.assign(factor_a, factor_b)
        return error

    def dense(self) -> torch.Tensor:
        return self.B @ self.A

    def zero_(self) -> None:
        init.zeros_(self.A)
        init.zeros_(self.B)

    def tile(self, index: int, tile_rows: int) -> torch.Tensor:
        rows = self.B[:, index * tile_rows : (index + 1) * tile_rows] @ self.A
        return rows.reshape(rows.shape[0], -1)

    def apply(
        self, hidden_states: torch.Tensor, weight: torch.Tensor, routing_weights: torch.Tensor, top_k: int | None
    ) -> torch.Tensor:
        # x (W0 + sum_i r_i B_i A_i)^T = x W0^T + sum_i r_i (x A_i^T) B_i^T: exact, per sample or per token.
        output = F.linear(hidden_states, weight)
        if routing_weights.dim() == 2 and top_k is not None and top_k < routing_weights.shape[-1]:
            return output + self._apply_selected(hidden_states, routing_weights, top_k)
        num_experts, rank, _ = self.A.shape
        projected = hidden_states @ self.A.reshape(num_experts * rank, -1).t()  # (batch, seq, experts * rank)
        projected = projected.unflatten(-1, (num_experts, rank))
        weights = routing_weights.unsqueeze(1) if routing_weights.dim() == 2 else routing_weights
        scaled = (projected * weights.to(projected.dtype).unsqueeze(-1)).flatten(-2)
        return output + scaled @ self.B.transpose(1, 2).reshape(num_experts * rank, -1)

    def _apply_selected(self, hidden_states: torch.Tensor, routing_weights: torch.Tensor, top_k: int) -> torch.Tensor:
        """sum_i r_i B_i (A_i x) for per-sample routing that keeps `top_k` experts: each expert's factors are applied
        only to the samples that selected it, so the work grows with `top_k`, not with the number of experts."""
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

    def extra_repr(self) -> str:
        return f"num_experts={self.A.shape[0]}, shape={self.shape}, rank={self.A.shape[1]}"


def build_task_vectors(config: WEMoEConfig, shape: tuple[int, ...]) -> WEMoETaskVectors:
    """The storage `config.expert_format` asks for; low-rank factors only for matrices (biases stay dense)."""
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
        # False: the experts take the routing weights as constants, so a loss reaches each router only through the
        # routing weights it gives (`WEMoEPreTrainedModel.route_gradients_through_experts`).
        self.routing_gradients = True
        # True: one weight for the whole batch, merged with its mean routing weights (the reference's adaptation
        # mode; `WEMoEPreTrainedModel.route_each_batch_as_one`). Never saved: serving routes each sample.
        self.batch_routing = False

    def prepare(self) -> None:
        """Build the task-vector stores' derived layouts (E-WEMoE's tile index) ahead of the first forward, and
        stack dense task vectors under a copy of W0."""
        self.weight_task_vectors.stack_under(self.weight)
        for store in (self.weight_task_vectors, self.bias_task_vectors):
            if store is not None:
                store.prepare()

    def _apply(self, fn, recurse=True):
        # `.to()`, `.half()`...: the converted task vectors are a tensor of their own; stack them again.
        stacked = self.weight_task_vectors.is_stacked_under(self.weight)
        module = super()._apply(fn, recurse)
        if stacked:
            self.weight_task_vectors.stack_under(self.weight)
        return module

    def forward(self, hidden_states: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        if not self.routing_gradients:
            routing_weights = routing_weights.detach()
        if self.batch_routing:
            return self.forward_batch_as_one(hidden_states, routing_weights)
        output = self.weight_task_vectors.apply(hidden_states, self.weight, routing_weights, self.top_k)
        if self.bias is None:
            return output
        bias = self.bias + self.bias_task_vectors.combine(routing_weights)
        return output + (bias.unsqueeze(1) if routing_weights.dim() == 2 else bias)

    def forward_batch_as_one(self, hidden_states: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        """One merged weight `W0 + sum_i mean(r)_i tau_i` for the whole batch, the mean over every sample (and token,
        where routing is per token): a dense linear's cost plus one merge, as the reference's `batch_reduce`."""
        mean_weights = routing_weights.reshape(-1, routing_weights.shape[-1]).mean(dim=0)
        dtype = hidden_states.dtype
        weight = self.weight_task_vectors.merged_weight(self.weight, mean_weights)
        bias = None if self.bias is None else (self.bias + self.bias_task_vectors.combine(mean_weights)).to(dtype)
        return F.linear(hidden_states, weight.to(dtype), bias)

    def extra_repr(self) -> str:
        top_k = "" if self.top_k is None else f", top_k={self.top_k}"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{top_k}"


def group_linear(
    config: WEMoEConfig, group: str, in_features: int, out_features: int, bias: bool = True
) -> nn.Linear | WEMoELinear:
    """A linear of the module group `group` (`"mlp"`, `"attention"`): weight-ensembled when the config upscales that
    group (`WEMoEConfig.upscale`), else a plain linear that holds the static merge."""
    if group in config.upscaled_groups:
        return WEMoELinear(config, in_features, out_features, bias)
    return nn.Linear(in_features, out_features, bias=bias)


def apply_linear(linear: nn.Module, hidden_states: torch.Tensor, routing_weights: torch.Tensor | None) -> torch.Tensor:
    """`linear` on `hidden_states`, routed by `routing_weights` when it is weight-ensembled (`group_linear`)."""
    return linear(hidden_states, routing_weights) if isinstance(linear, WEMoELinear) else linear(hidden_states)


class WEMoERouterLinear(nn.Linear):
    """A router layer, initialised for routing rather than by the generic `nn.Linear` rule: the output layer starts
    at bias `init_lambda` and weight 0 (so routing starts as exactly task arithmetic) or, as the reference
    implementation, N(0, 0.01); a hidden layer at N(0, 0.01)."""

    def __init__(self, in_features: int, out_features: int, is_output: bool):
        super().__init__(in_features, out_features)
        self.is_output = is_output

    def reset_for_routing(self, init_lambda: float, reference: bool = False) -> None:
        if self.is_output:
            if reference:
                init.normal_(self.weight, std=0.01)
            else:
                init.zeros_(self.weight)
            init.constant_(self.bias, init_lambda)
        else:
            init.normal_(self.weight, std=0.01)
            init.zeros_(self.bias)


class WEMoERouter(nn.Module):
    """Maps hidden states `(..., hidden_size)` to routing weights `(..., num_experts)`: raw (the paper), or a softmax
    over the experts with `normalization="softmax"`.

    Depth 2: Linear(d, d) -> ReLU -> Linear(d, num_experts); depth 1: Linear(d, num_experts); depth 0: one learned
    vector for every input. The raw output starts at `init_lambda` for every expert (task arithmetic).
    """

    def __init__(self, hidden_size: int, num_experts: int, hidden_layers: int, normalization: str = "none"):
        super().__init__()
        self.hidden_size = hidden_size
        self.hidden_layers = hidden_layers
        self.num_experts = num_experts
        self.normalization = normalization
        if hidden_layers == 0:
            self.weight = nn.Parameter(torch.empty(num_experts))
        elif hidden_layers == 1:
            self.fc = WEMoERouterLinear(hidden_size, num_experts, is_output=True)
        else:
            self.fc1 = WEMoERouterLinear(hidden_size, hidden_size, is_output=False)
            self.fc2 = WEMoERouterLinear(hidden_size, num_experts, is_output=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        raw = self.raw_weights(hidden_states)
        return raw.softmax(dim=-1) if self.normalization == "softmax" else raw

    def raw_weights(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.hidden_layers == 0:
            return self.weight.expand(*hidden_states.shape[:-1], self.num_experts)
        if self.hidden_layers == 1:
            return self.fc(hidden_states)
        return self.fc2(F.relu(self.fc1(hidden_states)))

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, hidden_layers={self.hidden_layers}, "
            f"normalization={self.normalization}"
        )


def build_router(config: WEMoEConfig, hidden_size: int, owner: str) -> WEMoERouter | None:
    """The router that `owner` ("per_layer": each WEMoE layer, "shared": the model) holds under `config.router_mode`,
    or None when the router lives elsewhere."""
    if config.router_mode != owner:
        return None
    return WEMoERouter(hidden_size, config.num_experts, config.router_hidden_layers, config.router_normalization)


def masked_mean(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """`(batch, seq, d)` averaged over each sample's real tokens (all of them without a mask): `(batch, d)`. Each
    sample is reduced on its own: padding and batch mates never change it."""
    if attention_mask is None:
        return hidden_states.mean(dim=1)
    mask = attention_mask.to(hidden_states.dtype).unsqueeze(-1)
    return (hidden_states * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


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
        routing_weights = masked_mean(routing_weights, token_mask)
    if top_k is None:
        return routing_weights
    kept = torch.zeros_like(routing_weights).scatter_(-1, routing_weights.topk(top_k, dim=-1).indices, 1.0)
    return routing_weights * kept


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bias: torch.Tensor | None,
    scaling: float,
    dropout: float,
    implementation: str | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled dot-product attention over `(batch, heads, seq, head_dim)` tensors with an additive `bias` (padding and
    causal masks, position biases): `(batch, seq, heads, head_dim)` outputs, and the attention probabilities when
    `implementation` is `"eager"` (SDPA does not return them)."""
    if implementation == "eager":
        scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
        if bias is not None:
            scores = scores + bias
        weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        output = torch.matmul(F.dropout(weights, p=dropout), value)
        return output.transpose(1, 2).contiguous(), weights
    if bias is not None:
        bias = bias.to(query.dtype)
    output = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=dropout, scale=scaling)
    return output.transpose(1, 2).contiguous(), None


def returned_attentions(config: WEMoEConfig, output_attentions: bool | None, attentions: tuple) -> tuple | None:
    """The attention probabilities a forward returns: only when asked (argument, else config), and only eager
    attention computes them; as transformers' models do, another implementation says so and returns none."""
    if not (output_attentions if output_attentions is not None else config.output_attentions):
        return None
    if config._attn_implementation != "eager":
        logger.warning_once(
            f"`{config._attn_implementation}` attention does not return attention weights (`output_attentions=True`); "
            'load the model with `attn_implementation="eager"` to get them.'
        )
        return None
    return attentions


def additive_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where `keep` is set, the dtype's most negative value elsewhere (not -inf: a row with nothing to attend to
    stays finite)."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)


def padding_mask(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A `(batch, seq)` 1/0 attention mask as an additive `(batch, 1, 1, seq)` bias over the keys."""
    if attention_mask is None:
        return None
    return additive_mask(attention_mask[:, None, None, :].bool(), dtype)


def is_router_parameter(name: str) -> bool:
    return name.startswith("router.") or ".router." in name


# What a model's tensors were built for (task order, and each task's classes where the tensors hold its head), saved
# with them as bytes: an artifact whose config.json was edited to another order loads as an error, not as a silently
# wrong model. Artifacts saved before 0.2 lack it, and are loaded without this check.
TASK_RECORD = "task_record"


def encode_task_record(
    tasks: list[str], task_labels: dict[str, list[str]] | None, expert_tasks: list[str] | None = None
) -> torch.Tensor:
    record = [[task, (task_labels or {}).get(task)] for task in tasks]
    if expert_tasks is not None:  # only models with tasks without an expert say which tasks have one
        record.append({"experts": list(expert_tasks)})
    return torch.tensor(list(json.dumps(record).encode()), dtype=torch.uint8)


def loading_problems(loading_info: dict) -> str | None:
    """What keeps a loaded checkpoint from matching its config exactly, in words; None when it matches."""
    missing = [key for key in loading_info.get("missing_keys", ()) if key != TASK_RECORD]
    problems = {
        "missing from the checkpoint": sorted(missing),
        "in the checkpoint but not in the model": sorted(loading_info.get("unexpected_keys", ())),
        "of another shape than the config gives": sorted(
            str(item[0]) if isinstance(item, tuple) else str(item) for item in loading_info.get("mismatched_keys", ())
        ),
    }
    found = [f"{len(keys)} tensor(s) {what}: {keys}" for what, keys in problems.items() if keys]
    return "; ".join(found) or None


def damaged_weight_files(name_or_path) -> list[str]:
    """The safetensors files of a local checkpoint directory whose header cannot be read (truncated or corrupt), each
    with safetensors' reason, in words; nothing for a Hub id."""
    directory = Path(str(name_or_path))
    problems = []
    for file in sorted(directory.glob("*.safetensors")) if directory.is_dir() else []:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except SafetensorError as error:
            problems.append(f"{str(file)!r} is truncated or corrupt ({error})")
    return problems


# Model classes by backbone (`WEMoEConfig.backbone`), filled by each family's modeling file as it is imported.
WEMOE_MODEL_CLASSES: dict[str, type["WEMoEPreTrainedModel"]] = {}


def register_wemoe_model(model_class: type["WEMoEPreTrainedModel"]) -> type["WEMoEPreTrainedModel"]:
    """Class decorator: the model class that `from_pretrained` builds for configs of `model_class.backbone`."""
    WEMOE_MODEL_CLASSES[model_class.backbone] = model_class
    return model_class


def model_class_for(config: WEMoEConfig) -> type["WEMoEPreTrainedModel"]:
    if config.backbone not in WEMOE_MODEL_CLASSES:
        raise ValueError(
            f"This WEMoE config is for a {config.backbone!r} backbone, whose modeling code is not loaded; loaded: "
            f"{sorted(WEMOE_MODEL_CLASSES)}."
        )
    return WEMOE_MODEL_CLASSES[config.backbone]


HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "code_revision")


def artifact_model_class(config: WEMoEConfig, name_or_path, hub_kwargs: dict) -> type["WEMoEPreTrainedModel"]:
    """The model class of the artifact at `name_or_path`: from the loaded code when it serves the config's backbone,
    else from the artifact's own code files (an artifact ships only its own family's modeling file)."""
    if config.backbone in WEMOE_MODEL_CLASSES:
        return WEMOE_MODEL_CLASSES[config.backbone]
    reference = (getattr(config, "auto_map", None) or {}).get("AutoModel")
    if reference is None:
        return model_class_for(config)  # says what is missing
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    options = {key: hub_kwargs[key] for key in HUB_KWARGS if key in hub_kwargs}
    return get_class_from_dynamic_module(reference, name_or_path, **options)


class WEMoEPreTrainedModel(PreTrainedModel):
    """Weight initialisation, freezing, loading and saving shared by every WEMoE model; a family's model class sets
    `backbone` (the `WEMoEConfig.backbone` it serves) and registers itself with `register_wemoe_model`."""

    config_class = WEMoEConfig
    config: WEMoEConfig
    base_model_prefix = "wemoe"
    backbone: str = ""
    artifact_pipelines: dict[str, dict] = {}  # `config.custom_pipelines` of saved artifacts: task -> pipeline class
    _supports_sdpa = True

    # Whether the tensors hold each task's classes (a classification head per task): then they are recorded too.
    labels_in_tensors: bool = False
    _keys_to_ignore_on_load_missing = [rf"^{TASK_RECORD}$"]  # artifacts saved before 0.2 have none

    def __init__(self, config: WEMoEConfig):
        super().__init__(config)
        if config.backbone != self.backbone:
            raise ValueError(
                f"This WEMoE config is for a {config.backbone!r} backbone, not {type(self).__name__} "
                f"({self.backbone!r}); load it with AutoModel or that backbone's class."
            )
        self.register_buffer(TASK_RECORD, self.expected_task_record())

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        # transformers guesses this from the source (its AttentionInterface); `attention` here reads
        # `config._attn_implementation` at every call, so `set_attn_implementation` takes effect at once.
        return True

    def expected_task_record(self) -> torch.Tensor:
        labels = self.config.task_labels if self.labels_in_tensors else None
        return encode_task_record(self.config.tasks, labels, self.config.expert_tasks)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Everything but the routers is overwritten by conversion; these defaults only make a model built from
        # the config alone well defined (the pre-trained base with zero task vectors). A tensor is initialised
        # only once, so router layers must not fall through to the generic `nn.Linear` rule.
        if isinstance(module, WEMoERouterLinear):
            module.reset_for_routing(self.config.init_lambda, reference=self.config.router_init == "reference")
            return
        super()._init_weights(module)
        if module is self:
            init.copy_(getattr(self, TASK_RECORD), self.expected_task_record())
        if isinstance(module, WEMoERouter) and module.hidden_layers == 0:
            init.constant_(module.weight, self.config.init_lambda)
        elif isinstance(module, WEMoELinear):
            init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, WEMoETaskVectors):
            module.zero_()

    def prepare_task_vectors(self) -> None:
        """Build each task-vector store's derived layouts (E-WEMoE's tile index) now rather than in the first
        forward; `from_pretrained` does this."""
        for module in self.modules():
            if isinstance(module, WEMoELinear):
                module.prepare()

    def freeze_all_but_routers(self) -> None:
        """Only the routers train (test-time adaptation); every merged weight and task vector stays fixed."""
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(is_router_parameter(name))

    def route_gradients_through_experts(self, enabled: bool = True) -> None:
        """Whether a loss's gradients reach the routers through the experts' outputs (the default: an objective on the
        model's predictions, as the paper's entropy, needs it) or only through the routing weights each router gives
        (an objective on the routing itself, as task routing). Without, every router learns from the hidden states
        entering it, nothing of the per-sample merge is recorded for backward, and a training forward costs what
        inference does."""
        for module in self.modules():
            if isinstance(module, WEMoELinear):
                module.routing_gradients = enabled

    def route_each_batch_as_one(self, enabled: bool = True) -> None:
        """Whether every upscaled linear merges one weight per batch from the batch's mean routing weights (the
        reference implementation's adaptation mode, `batch_reduce`: each adaptation batch holds one task's inputs)
        instead of one per sample. For adaptation only: a sample's output then depends on its batch mates, so it is
        never saved, and `wemoe.adapt` switches it off before returning the model."""
        for module in self.modules():
            if isinstance(module, WEMoELinear):
                module.batch_routing = enabled

    def parameter_report(self) -> dict[str, int]:
        """Trainable and total parameter counts, and how many task-vector entries are stored."""
        task_vector_entries = sum(
            module.num_stored_entries for module in self.modules() if isinstance(module, WEMoETaskVectors)
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
        if getattr(config, "model_type", None) == WEMoEConfig.model_type and config.backbone != cls.backbone:
            name_or_path = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            return artifact_model_class(config, name_or_path, kwargs).from_pretrained(*args, **kwargs)
        # transformers reports tensors that do not match the config, and leaves missing ones uninitialised: refuse.
        wants_info = kwargs.pop("output_loading_info", False)
        try:
            model, loading_info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        except SafetensorError as error:  # it names no file: name it
            name_or_path = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            found = "; ".join(damaged_weight_files(name_or_path)) or f"a safetensors file is damaged ({error})"
            message = f"The WEMoE checkpoint {str(name_or_path)!r}: {found}. Download or convert it again."
            raise OSError(message) from None
        problems = loading_problems(loading_info)
        if problems:
            raise ValueError(f"The WEMoE checkpoint does not match its config.json: {problems}.")
        model.check_task_record()
        model.prepare_task_vectors()
        # Loading materialises fresh parameters (all trainable); restore "only routers train".
        model.freeze_all_but_routers()
        return (model, loading_info) if wants_info else model

    def check_task_record(self) -> None:
        """The tensors were saved for the tasks (and classes) in the order config.json gives."""
        saved = bytes(getattr(self, TASK_RECORD).tolist()).decode(errors="replace")
        expected = bytes(self.expected_task_record().tolist()).decode()
        if saved != expected:
            raise ValueError(
                f"The WEMoE checkpoint was saved for tasks and classes {saved}, but config.json says {expected}: "
                "config.json was edited. Restore it; tasks and their classes cannot be reordered after conversion."
            )

    def save_pretrained(self, save_directory, *args, **kwargs):
        # `register_for_auto_class` records a single auto class per model class; AutoModel must resolve too.
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map["AutoModel"] = f"{type(self).__module__.rsplit('.', 1)[-1]}.{type(self).__name__}"
        self.config.auto_map = auto_map
        if self.artifact_pipelines:
            self.config.custom_pipelines = self.artifact_pipelines
        return super().save_pretrained(save_directory, *args, **kwargs)


__all__ = [
    "TILE_BYTES",
    "WEMOE_MODEL_CLASSES",
    "WEMoEDenseTaskVectors",
    "WEMoELinear",
    "WEMoELowRankTaskVectors",
    "WEMoEPreTrainedModel",
    "WEMoERouter",
    "WEMoESparseTaskVectors",
    "WEMoETaskVectors",
    "additive_mask",
    "attention",
    "build_router",
    "build_task_vectors",
    "damaged_weight_files",
    "compute_routing_weights",
    "is_router_parameter",
    "loading_problems",
    "low_rank_factors",
    "magnitude_keep_mask",
    "masked_mean",
    "model_class_for",
    "num_kept_entries",
    "pack_bitmask",
    "padding_mask",
    "register_wemoe_model",
    "unpack_bitmask",
]
