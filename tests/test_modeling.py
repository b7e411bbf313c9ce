"""The WEMoE layer math on plain tensors, against loops that merge one weight per sample or per token."""

import pytest
import torch
import torch.nn.functional as F

import modeling_wemoe.modeling_wemoe
from modeling_wemoe import WEMoEConfig, WEMoEForImageClassification
from modeling_wemoe.modeling_wemoe import (
    WEMoELinear,
    WEMoERouter,
    WEMoESparseTaskVectors,
    compute_routing_weights,
    even_tile,
    num_kept_entries,
    pack_bitmask,
    unpack_bitmask,
)

# 70 output rows (or, for the wide layer, input columns): two full tiles of the per-sample path and a partial third,
# with tiles of 32 float32 rows of 12 entries (30 under autograd; no divisor of 70 is near either).
NUM_EXPERTS, IN_FEATURES, OUT_FEATURES = 3, 12, 70


@pytest.fixture(autouse=True)
def tiles_of_32_rows(monkeypatch):
    monkeypatch.setattr(modeling_wemoe.modeling_wemoe, "TILE_BYTES", 32 * IN_FEATURES * 4)
    monkeypatch.setattr(modeling_wemoe.modeling_wemoe, "RECORDED_TILE_BYTES", 30 * IN_FEATURES * 4)


def make_linear(
    expert_format: str, bias: bool, seed: int = 0, wide: bool = False, prepare: bool = True
) -> tuple[WEMoELinear, torch.Tensor, torch.Tensor]:
    """A WEMoELinear with random W0/b0 and task vectors; returns it with the dense task vectors it stores. `wide`:
    more inputs than outputs (a down projection, laid out by `prepare` for tiles of input columns). `prepare`: as
    loading does (E-WEMoE's tile index; dense W0 and task vectors in one tensor)."""
    in_features, out_features = (OUT_FEATURES, IN_FEATURES) if wide else (IN_FEATURES, OUT_FEATURES)
    config = WEMoEConfig(
        vision_config={"hidden_size": 16, "num_attention_heads": 4},
        projection_dim=8,
        tasks=[f"task{i}" for i in range(NUM_EXPERTS)],
        expert_format=expert_format,
        keep=0.3 if expert_format == "sparse" else None,
        rank=5 if expert_format == "lowrank" else None,
    )
    generator = torch.Generator().manual_seed(seed)
    layer = WEMoELinear(config, in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_features, in_features, generator=generator))
        stores = [("weight", (out_features, in_features))] + ([("bias", (out_features,))] if bias else [])
        for name, shape in stores:
            if name == "bias":
                layer.bias.copy_(torch.randn(shape, generator=generator))
            task_vectors = torch.randn(NUM_EXPERTS, *shape, generator=generator)
            store = getattr(layer, f"{name}_task_vectors")
            if expert_format == "lowrank" and name == "weight":
                factor_a = 0.3 * torch.randn(NUM_EXPERTS, 5, in_features, generator=generator)
                factor_b = 0.3 * torch.randn(NUM_EXPERTS, out_features, 5, generator=generator)
                store.assign(factor_a, factor_b)
            elif expert_format == "sparse":
                flat = task_vectors.flatten(1)
                mask = torch.zeros_like(flat, dtype=torch.bool)
                mask.scatter_(1, flat.abs().topk(store.num_kept, dim=1).indices, True)
                store.assign(task_vectors, mask.view_as(task_vectors))
            else:
                store.assign(task_vectors)
    if prepare:
        layer.prepare()
    weight_tv = layer.weight_task_vectors.dense()
    bias_tv = layer.bias_task_vectors.dense() if bias else None
    return layer, weight_tv, bias_tv


def random_inputs(layer: WEMoELinear, *leading: int) -> torch.Tensor:
    """Inputs scaled so that every layer's outputs are about 3 (the merged weights' entries are about 2): 1e-5 is
    then well above fp32 rounding for both layers, and far below any error in the math."""
    return 0.5 * torch.randn(*leading, layer.in_features) * (IN_FEATURES / layer.in_features) ** 0.5


def merged_linear(layer, weight_tv, bias_tv, routing, inputs):
    weight = layer.weight + torch.einsum("e,eoi->oi", routing, weight_tv)
    bias = layer.bias + routing @ bias_tv if bias_tv is not None else None
    return F.linear(inputs, weight, bias)


@pytest.mark.parametrize("expert_format", ["dense", "sparse", "lowrank"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
# Few tokens per sample (one; three for sparse experts keeping 0.3) take the per-token formula instead of tiles.
@pytest.mark.parametrize("seq", [7, 3, 1], ids=["7-tokens", "3-tokens", "1-token"])
@pytest.mark.parametrize("wide", [False, True], ids=["row-tiles", "column-tiles"])
def test_per_sample_linear_matches_a_weight_merged_for_each_sample(expert_format, bias, seq, wide):
    layer, weight_tv, bias_tv = make_linear(expert_format, bias, wide=wide)
    inputs = random_inputs(layer, 5, seq)
    routing = torch.randn(5, NUM_EXPERTS)
    expected = torch.stack(
        [merged_linear(layer, weight_tv, bias_tv, r, x) for r, x in zip(routing, inputs, strict=True)]
    )
    torch.testing.assert_close(layer(inputs, routing), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("wide", [False, True], ids=["row-tiles", "column-tiles"])
def test_dense_task_vectors_stacked_under_a_copy_of_w0_give_what_they_give_apart(wide):
    # Prepared (at load), each tile's [W0; tau] is read in place from one tensor holding a copy of W0 above the task
    # vectors (transposed, for tiles of input columns); before, or once anything has made that copy stale, the tile
    # is copied together first. Both must be the per-sample merge of the W0 and task vectors the layer holds now.
    layer, weight_tv, bias_tv = make_linear("dense", bias=True, prepare=False, wide=wide)
    weight_tv = weight_tv.detach().clone()  # `dense()` is the stored tensor, which `prepare` moves
    store = layer.weight_task_vectors
    inputs = random_inputs(layer, 5, 7)
    routing = torch.randn(5, NUM_EXPERTS)

    def assert_merged(weight_tv, inputs, routing):
        pairs = zip(routing, inputs, strict=True)
        expected = torch.stack([merged_linear(layer, weight_tv, bias_tv.to(inputs.dtype), r, x) for r, x in pairs])
        torch.testing.assert_close(layer(inputs, routing), expected, atol=1e-5, rtol=0)

    assert not store.is_stacked_under(layer.weight)
    assert_merged(weight_tv, inputs, routing)
    layer.prepare()
    assert store.is_stacked_under(layer.weight)
    assert_merged(weight_tv, inputs, routing)
    store.assign(3 * weight_tv)  # written in place: the stacked tensor holds them
    assert store.is_stacked_under(layer.weight)
    assert_merged(3 * weight_tv, inputs, routing)
    store.assign(weight_tv)

    with torch.no_grad():
        layer.weight.mul_(0.5)  # W0 changed in place: the copy is stale
    assert not store.is_stacked_under(layer.weight)
    assert_merged(weight_tv, inputs, routing)
    layer.prepare()
    assert_merged(weight_tv, inputs, routing)

    layer.to(torch.float64)  # moved tensors are stacked again
    assert store.is_stacked_under(layer.weight) and store.values.dtype == torch.float64
    assert_merged(weight_tv.double(), inputs.double(), routing.double())

    # A new W0 in a new tensor, even one equal to the old and at the same version count: apart until prepared again.
    replacement = layer.weight.detach().clone()
    with torch.no_grad():
        while replacement._version < layer.weight._version:
            replacement.add_(0)
    layer.weight = torch.nn.Parameter(replacement, requires_grad=False)
    assert layer.weight._version == store._stacked_base[1]
    assert not store.is_stacked_under(layer.weight)
    assert_merged(weight_tv.double(), inputs.double(), routing.double())
    layer.prepare()

    # New task vectors in a new tensor (as loading with `assign=True` gives): apart, and the merge reads them.
    store.values = torch.nn.Parameter(2 * weight_tv.double(), requires_grad=False)
    assert not store.is_stacked_under(layer.weight)
    assert_merged(2 * weight_tv.double(), inputs.double(), routing.double())


@pytest.mark.parametrize("prepare", [False, True], ids=["apart", "stacked"])
@pytest.mark.parametrize("wide", [False, True], ids=["row-tiles", "column-tiles"])
def test_batch_routing_merges_one_weight_from_the_mean_routing_weights(wide, prepare):
    # The reference's adaptation mode: one weight for the batch, read from the stack (in either order) once prepared.
    layer, weight_tv, bias_tv = make_linear("dense", bias=True, wide=wide, prepare=prepare)
    assert layer.weight_task_vectors.is_stacked_under(layer.weight) == prepare
    inputs = random_inputs(layer, 5, 7)
    routing = torch.randn(5, NUM_EXPERTS)
    expected = merged_linear(layer, weight_tv, bias_tv, routing.mean(0), inputs)
    torch.testing.assert_close(layer.forward_batch_as_one(inputs, routing), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("length", "largest", "tile"),
    [(2048, 384, 256), (3072, 256, 256), (768, 256, 256), (70, 32, 32), (70, 28, 28), (100, 200, 100), (97, 10, 10)],
)
def test_tiles_divide_the_rows_where_a_divisor_is_at_least_half_the_largest_tile(length, largest, tile):
    assert even_tile(length, largest) == tile


def test_forwards_recorded_for_backward_take_their_own_tile_size_except_over_a_sparse_tile_index():
    dense, _, _ = make_linear("dense", bias=False)
    sparse, _, _ = make_linear("sparse", bias=False)
    assert dense.weight_task_vectors.per_sample_tile(torch.float32) == 32
    assert dense.weight_task_vectors.per_sample_tile(torch.float32, recorded=True) == 30
    assert sparse.weight_task_vectors.per_sample_tile(torch.float32, recorded=True) == 32


def test_a_down_projection_s_task_vectors_are_held_transposed_and_read_as_they_were_assigned():
    # Tiled by input columns, its stack is [W0^T; tau^T], so that a tile of columns is a view; `values` is then a
    # view with the transpose's strides, which the other readers (batch routing, the per-token formula, savers) must
    # read as the (num_experts, out, in) tensor it was.
    layer, weight_tv, _ = make_linear("dense", bias=True, wide=True, prepare=False)
    weight_tv = weight_tv.detach().clone()
    layer.prepare()
    store = layer.weight_task_vectors
    assert store.is_stacked_under(layer.weight) and store._stacked.shape == (1 + NUM_EXPERTS, OUT_FEATURES, IN_FEATURES)
    assert not store.values.is_contiguous()
    torch.testing.assert_close(store._stacked[0], layer.weight.t(), atol=0, rtol=0)
    torch.testing.assert_close(store.dense(), weight_tv, atol=0, rtol=0)
    saved = layer.state_dict()["weight_task_vectors.values"]
    assert saved.is_contiguous()
    torch.testing.assert_close(saved, weight_tv, atol=0, rtol=0)
    assert layer.state_dict(keep_vars=True)["weight_task_vectors.values"] is store.values
    routing = torch.randn(2, NUM_EXPERTS)
    torch.testing.assert_close(store.combine(routing), torch.einsum("be,eoi->boi", routing, weight_tv))
    rows = torch.randn(4, OUT_FEATURES)
    torch.testing.assert_close(store.expert_outputs(rows), torch.einsum("eoi,ti->eot", weight_tv, rows))


@pytest.mark.parametrize("expert_format", ["dense", "sparse"])
@pytest.mark.parametrize("wide", [False, True], ids=["row-tiles", "column-tiles"])
def test_per_sample_linear_gives_the_same_outputs_and_gradients_with_autograd(expert_format, wide):
    # Without autograd the tiles reuse buffers (`out=`); with it (test-time adaptation) they cannot.
    layer, weight_tv, bias_tv = make_linear(expert_format, bias=True, wide=wide)
    inputs = random_inputs(layer, 5, 7)
    routing = torch.randn(5, NUM_EXPERTS, requires_grad=True)
    with torch.no_grad():
        without_autograd = layer(inputs, routing)
    outputs = layer(inputs, routing)
    torch.testing.assert_close(outputs, without_autograd, atol=1e-5, rtol=0)
    (gradient,) = torch.autograd.grad(outputs.square().sum(), routing)
    reference_routing = routing.detach().requires_grad_()
    expected = torch.stack(
        [merged_linear(layer, weight_tv, bias_tv, r, x) for r, x in zip(reference_routing, inputs, strict=True)]
    )
    (expected_gradient,) = torch.autograd.grad(expected.square().sum(), reference_routing)
    torch.testing.assert_close(gradient, expected_gradient, atol=1e-3, rtol=1e-5)


def test_a_prepared_sparse_tile_index_is_rebuilt_when_the_layer_moves_to_another_dtype():
    layer, weight_tv, bias_tv = make_linear("sparse", bias=True)
    store = layer.weight_task_vectors
    store.prepare()
    assert store._tile_layouts, "prepare() builds the tile index"
    layer.to(torch.float64)
    (positions, values), *_ = next(iter(store._tile_layouts.values()))
    assert values.dtype == torch.float64 and positions.dtype == torch.int32
    inputs = torch.randn(5, 7, IN_FEATURES, dtype=torch.float64)
    routing = torch.randn(5, NUM_EXPERTS, dtype=torch.float64)
    expected = torch.stack(
        [
            merged_linear(layer, weight_tv.double(), bias_tv.double(), r, x)
            for r, x in zip(routing, inputs, strict=True)
        ]
    )
    torch.testing.assert_close(layer(inputs, routing), expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("expert_format", ["dense", "sparse", "lowrank"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("wide", [False, True], ids=["row-tiles", "column-tiles"])
def test_per_token_linear_matches_a_weight_merged_for_each_token(expert_format, bias, wide):
    layer, weight_tv, bias_tv = make_linear(expert_format, bias, wide=wide)
    inputs = random_inputs(layer, 2, 4)
    routing = torch.randn(2, 4, NUM_EXPERTS)
    expected = torch.stack(
        [
            torch.stack([merged_linear(layer, weight_tv, bias_tv, routing[b, n], inputs[b, n]) for n in range(4)])
            for b in range(2)
        ]
    )
    torch.testing.assert_close(layer(inputs, routing), expected, atol=1e-5, rtol=0)


def test_sparse_store_keeps_values_and_positions():
    layer, weight_tv, _ = make_linear("sparse", bias=False)
    store = layer.weight_task_vectors
    assert store.values.shape == (NUM_EXPERTS, num_kept_entries(OUT_FEATURES * IN_FEATURES, 0.3))
    assert store.bitmask.dtype == torch.uint8 and store.bitmask.shape == (NUM_EXPERTS, 105)
    assert ((weight_tv != 0).sum(dim=(1, 2)) == store.num_kept).all()


def test_sparse_store_rejects_a_mask_with_the_wrong_count():
    layer, _, _ = make_linear("sparse", bias=False)
    wrong = torch.zeros(NUM_EXPERTS, OUT_FEATURES, IN_FEATURES, dtype=torch.bool)
    with pytest.raises(ValueError, match="keep 252 entries per expert, but the keep mask sets"):
        layer.weight_task_vectors.assign(torch.randn(wrong.shape), wrong)


def test_corrupt_bitmask_is_reported():
    layer, _, _ = make_linear("sparse", bias=False)
    store = layer.weight_task_vectors
    first_unset = int((~unpack_bitmask(store.bitmask[0], store.numel)).nonzero()[0])
    with torch.no_grad():
        store.bitmask[0, first_unset // 8] |= 1 << (first_unset % 8)
    with pytest.raises(ValueError, match="Corrupt sparse task vectors"):
        layer(torch.randn(1, 2, IN_FEATURES), torch.randn(1, NUM_EXPERTS))


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 100])
def test_bitmask_round_trip(numel):
    mask = torch.rand(3, numel, generator=torch.Generator().manual_seed(numel)) > 0.5
    packed = pack_bitmask(mask)
    assert packed.shape == (3, (numel + 7) // 8)
    assert torch.equal(unpack_bitmask(packed, numel), mask)


@pytest.mark.parametrize("hidden_layers", [0, 1, 2])
def test_fresh_router_outputs_init_lambda_for_any_input(hidden_layers):
    config = WEMoEConfig(
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4},
        projection_dim=8,
        tasks=["a", "b", "c"],
        task_labels={"a": ["x"], "b": ["y"], "c": ["z"]},
        router_hidden_layers=hidden_layers,
        init_lambda=0.4,
    )
    router = WEMoEForImageClassification(config).vision_model.encoder.layers[0].mlp.router
    assert isinstance(router, WEMoERouter)
    output = router(torch.randn(2, 5, 16))
    torch.testing.assert_close(output, torch.full((2, 5, 3), 0.4))


def test_sample_routing_averages_only_real_tokens():
    router = WEMoERouter(8, 2, hidden_layers=1)
    hidden = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    padded = hidden.clone()
    padded[0, 3:] = 100.0  # padding content must not matter
    routing = compute_routing_weights(router, padded, "sample", token_mask=mask)
    torch.testing.assert_close(routing[0], router(hidden[0, :3]).mean(0))
    torch.testing.assert_close(routing[1], router(hidden[1]).mean(0))


@pytest.mark.parametrize("granularity", ["sample", "token"])
def test_a_bitmask_marking_an_extra_entry_after_all_stored_values_is_reported(granularity):
    # The kept entries fill the first tile of rows; one more bit set in the last row is past every stored value.
    store = WEMoESparseTaskVectors(NUM_EXPERTS, (OUT_FEATURES, IN_FEATURES), 0.3)
    first_entries = torch.arange(store.numel) < store.num_kept
    with torch.no_grad():
        store.bitmask.copy_(pack_bitmask(first_entries).expand_as(store.bitmask))
        store.bitmask[0, -1] |= 1 << ((store.numel - 1) % 8)
    inputs = torch.randn(2, 3, IN_FEATURES)
    with pytest.raises(ValueError, match="Corrupt sparse task vectors"):
        if granularity == "sample":
            store.merge_tile(torch.zeros(OUT_FEATURES, IN_FEATURES), torch.randn(2, NUM_EXPERTS), 0, 32)
        else:
            store.expert_outputs(inputs.reshape(-1, IN_FEATURES))


@pytest.mark.parametrize("granularity", ["sample", "token"])
def test_sparse_cached_layouts_follow_newly_assigned_task_vectors(granularity):
    layer, _, _ = make_linear("sparse", bias=False, seed=0)
    inputs = torch.randn(2, 3, IN_FEATURES)
    routing = torch.randn(2, NUM_EXPERTS) if granularity == "sample" else torch.randn(2, 3, NUM_EXPERTS)
    layer(inputs, routing)  # builds the cached tile layout (per sample) or sparse matrix (per token)
    replacement, replacement_tv, _ = make_linear("sparse", bias=False, seed=1)
    store = layer.weight_task_vectors
    store.assign(replacement_tv, replacement_tv != 0)
    with torch.no_grad():
        layer.weight.copy_(replacement.weight)
    # Per token, each (sample, token) pair is one merged weight and one input row.
    rows = (routing, inputs) if granularity == "sample" else (routing.flatten(0, 1), inputs.flatten(0, 1))
    expected = torch.stack([merged_linear(layer, replacement_tv, None, r, x) for r, x in zip(*rows, strict=True)])
    expected = expected.view(2, 3, OUT_FEATURES)
    torch.testing.assert_close(layer(inputs, routing), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("granularity", ["sample", "token"])
def test_sparse_experts_in_bfloat16_follow_float32(granularity):
    layer, _, _ = make_linear("sparse", bias=True)
    inputs = torch.randn(2, 3, IN_FEATURES)
    routing = torch.randn(2, NUM_EXPERTS) if granularity == "sample" else torch.randn(2, 3, NUM_EXPERTS)
    expected = layer(inputs, routing)
    actual = layer.to(torch.bfloat16)(inputs.bfloat16(), routing.bfloat16())
    assert actual.dtype == torch.bfloat16
    torch.testing.assert_close(actual.float(), expected, atol=0.1, rtol=0.02)


@pytest.mark.parametrize("granularity", ["sample", "token"])
def test_top_k_keeps_only_the_largest_routing_weights(granularity):
    router = WEMoERouter(8, 4, hidden_layers=1)
    with torch.no_grad():
        router.fc.weight.normal_()
    hidden = torch.randn(3, 5, 8)
    full = compute_routing_weights(router, hidden, granularity)
    top2 = compute_routing_weights(router, hidden, granularity, top_k=2)
    kept = top2 != 0
    assert (kept.sum(-1) == 2).all()
    assert torch.equal(top2[kept], full[kept])
    smallest_kept = full.masked_fill(~kept, float("inf")).min(-1).values
    largest_dropped = full.masked_fill(kept, float("-inf")).max(-1).values
    assert (largest_dropped <= smallest_kept).all()
    torch.testing.assert_close(compute_routing_weights(router, hidden, granularity, top_k=4), full)


def test_a_down_projection_in_bfloat16_follows_float32():
    # More inputs than outputs: the per-sample path goes by tiles of input columns, in either dtype.
    layer, _, _ = make_linear("dense", bias=True, wide=True)
    inputs, routing = random_inputs(layer, 5, 7), torch.randn(5, NUM_EXPERTS)
    expected = layer(inputs, routing)
    actual = layer.to(torch.bfloat16)(inputs.bfloat16(), routing.bfloat16())
    assert actual.dtype == torch.bfloat16
    torch.testing.assert_close(actual.float(), expected, atol=0.1, rtol=0.02)


def test_prepare_leaves_an_offloaded_meta_store_for_its_first_forward():
    with torch.device("meta"):
        store = WEMoESparseTaskVectors(NUM_EXPERTS, (OUT_FEATURES, IN_FEATURES), 0.3)
    store.prepare()
    assert store._tile_layouts == {}
