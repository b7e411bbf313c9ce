"""Low-rank experts: truncated-SVD task vectors applied as sum_i r_i B_i (A_i x)."""

import pytest
import torch
from reference import randomize_routers, stacked_task_vectors
from test_checkpoints import lora_expert

from modeling_wemoe.modeling_wemoe import WEMoELowRankTaskVectors, low_rank_factors
from wemoe import merge_clip
from wemoe.recipe import RecipeError, load_recipe


def assert_same_logits_under_random_routers(model, reference, pixel_values) -> None:
    """Both models get the same random routers (same seed and router shapes), then must agree."""
    randomize_routers(model)
    randomize_routers(reference)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values).logits, reference(pixel_values).logits, atol=1e-4, rtol=0)


def test_full_rank_equals_dense_wemoe(base, experts, classnames, tokenizer, pixel_values):
    dense = merge_clip(base, experts, classnames, tokenizer=tokenizer)
    full_rank = merge_clip(base, experts, classnames, tokenizer=tokenizer, expert_format="lowrank", rank=32)
    assert_same_logits_under_random_routers(full_rank, dense, pixel_values)


def test_truncated_factors_are_the_best_rank_r_approximation(base, experts, classnames, tokenizer, caplog):
    with caplog.at_level("INFO", logger="wemoe"):
        model = merge_clip(
            base, experts, classnames, tokenizer=tokenizer, variant="e-wemoe", expert_format="lowrank", rank=4
        )
    assert model.router is not None and model.config.expert_format == "lowrank"
    store = model.vision_model.encoder.layers[1].mlp.fc2.weight_task_vectors
    assert isinstance(store, WEMoELowRankTaskVectors) and store.A.shape == (3, 4, 128) and store.B.shape == (3, 32, 4)
    full = stacked_task_vectors(base, experts, "encoder.layers.1.mlp.fc2.weight")
    singular_values = torch.linalg.svdvals(full)
    expected_error = singular_values[:, 4:].norm(dim=-1) / singular_values.norm(dim=-1)  # Eckart-Young
    actual_error = torch.linalg.matrix_norm(full - store.dense()) / torch.linalg.matrix_norm(full)
    torch.testing.assert_close(actual_error, expected_error, atol=1e-5, rtol=0)
    assert "rank-4 encoder.layers.1.mlp.fc2.weight: relative reconstruction error mean" in caplog.text
    assert model.vision_model.encoder.layers[0].mlp.fc1.bias_task_vectors.values.shape == (3, 128)  # biases dense


def test_low_rank_factors_pad_ranks_above_the_matrix_size():
    task_vectors = torch.randn(2, 3, 5)
    factor_a, factor_b, error = low_rank_factors(task_vectors, rank=4)
    assert factor_a.shape == (2, 4, 5) and factor_b.shape == (2, 3, 4)
    torch.testing.assert_close(factor_b @ factor_a, task_vectors, atol=1e-5, rtol=0)
    assert error.max() < 1e-5


def test_lora_experts_are_kept_exactly_at_their_rank(base, classnames, tokenizer, pixel_values):
    adapters = {}
    for i, task in enumerate(classnames):
        torch.manual_seed(10 + i)
        peft_model, dense = lora_expert(base, rslora=False)  # LoRA ranks 4 (fc1) and 2 (fc2)
        adapters[task] = dense
    dense_model = merge_clip(base, adapters, classnames, tokenizer=tokenizer)
    low_rank = merge_clip(base, adapters, classnames, tokenizer=tokenizer, expert_format="lowrank", rank=4)
    assert_same_logits_under_random_routers(low_rank, dense_model, pixel_values)


def test_low_rank_artifact_round_trip(base, experts, classnames, tokenizer, pixel_values, tmp_path):
    from transformers import AutoModel

    model = merge_clip(base, experts, classnames, tokenizer=tokenizer, expert_format="lowrank", rank=3)
    randomize_routers(model)
    model.save_pretrained(tmp_path)
    loaded, info = AutoModel.from_pretrained(tmp_path, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values).logits, model(pixel_values).logits, atol=1e-6, rtol=0)


def test_recipe_requires_rank_exactly_with_lowrank():
    tasks = [{"name": "a", "model": "m", "classnames": ["x"]}]
    assert load_recipe({"base_model": "b", "expert_format": "lowrank", "rank": 64, "tasks": tasks}).rank == 64
    for bad in ({"expert_format": "lowrank"}, {"rank": 8}):
        with pytest.raises(RecipeError, match="`rank` is required with expert_format: lowrank"):
            load_recipe({"base_model": "b", "tasks": tasks, **bad})


@pytest.mark.parametrize("top_k", [1, 2])
def test_low_rank_top_k_computes_only_the_selected_experts_exactly(
    base, experts, classnames, tokenizer, pixel_values, top_k
):
    """The gathered top-k path must equal the same model computing every expert with the masked weights."""
    model = merge_clip(
        base, experts, classnames, tokenizer=tokenizer, expert_format="lowrank", rank=4, router={"top_k": top_k}
    )
    randomize_routers(model)
    with torch.no_grad():
        selected = model(pixel_values, output_routing_weights=True)
        for module in model.modules():  # the same model, made to compute every expert (masked weights unchanged)
            if hasattr(module, "top_k") and hasattr(module, "weight_task_vectors"):
                module.top_k = None
        every_expert = model(pixel_values).logits
    assert any((r < 0).any() for r in selected.routing_weights), "negative kept weights must be exercised"
    torch.testing.assert_close(selected.logits, every_expert, atol=1e-5, rtol=0)
