"""Using an artifact as transformers users do: a printed model that says what it stores."""

import pytest
from reference import randomize_routers

from conversion import merge_clip
from modeling_wemoe import WEMoEConfig, WEMoELinear, WEMoERouter


@pytest.fixture(scope="module")
def clip_model(base, experts, classnames, tokenizer):
    model = merge_clip(base, experts, classnames, tokenizer=tokenizer, variant="e-wemoe", keep=0.1)
    randomize_routers(model)
    return model


def small_config(**fields) -> WEMoEConfig:
    return WEMoEConfig(
        vision_config={"hidden_size": 16, "num_attention_heads": 4}, projection_dim=8, tasks=["a", "b", "c"], **fields
    )


@pytest.mark.parametrize(
    ("fields", "task_vectors"),
    [
        ({}, "WEMoEDenseTaskVectors(num_experts=3, shape=(70, 12))"),
        (
            {"expert_format": "sparse", "keep": 0.1},
            "WEMoESparseTaskVectors(num_experts=3, shape=(70, 12), keep=0.1 (84 of 840 entries per expert))",
        ),
        ({"expert_format": "lowrank", "rank": 4}, "WEMoELowRankTaskVectors(num_experts=3, shape=(70, 12), rank=4)"),
    ],
    ids=["dense", "sparse", "lowrank"],
)
def test_a_wemoe_linear_prints_its_shape_and_its_task_vectors_storage(fields, task_vectors):
    text = repr(WEMoELinear(small_config(router_top_k=2, **fields), 12, 70))
    assert text.startswith("WEMoELinear(\n  in_features=12, out_features=70, bias=True, top_k=2\n")
    assert f"(weight_task_vectors): {task_vectors}\n" in text
    assert repr(WEMoELinear(small_config(**fields), 12, 70, bias=False)).startswith(
        "WEMoELinear(\n  in_features=12, out_features=70, bias=False\n"
    )


def test_a_router_prints_its_size_depth_and_normalization():
    assert repr(WEMoERouter(16, 3, hidden_layers=2, normalization="softmax")) == (
        "WEMoERouter(\n"
        "  hidden_size=16, num_experts=3, hidden_layers=2, normalization=softmax\n"
        "  (fc1): WEMoERouterLinear(in_features=16, out_features=16, bias=True)\n"
        "  (fc2): WEMoERouterLinear(in_features=16, out_features=3, bias=True)\n"
        ")"
    )
    assert repr(WEMoERouter(16, 3, hidden_layers=0)) == (
        "WEMoERouter(hidden_size=16, num_experts=3, hidden_layers=0, normalization=none)"
    )


def test_a_printed_model_says_what_it_stores(clip_model, base):
    hidden, intermediate = base.config.vision_config.hidden_size, base.config.vision_config.intermediate_size
    text = str(clip_model)
    kept = round(0.1 * hidden * intermediate)
    assert (
        f"(weight_task_vectors): WEMoESparseTaskVectors(num_experts=3, shape=({intermediate}, {hidden}), keep=0.1 "
        f"({kept} of {hidden * intermediate} entries per expert))"
    ) in text
    router = f"hidden_size={hidden}, num_experts=3, hidden_layers=2, normalization=none"
    assert f"(router): WEMoERouter(\n    {router}\n" in text
