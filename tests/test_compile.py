"""torch.compile traces the dense and low-rank forwards in one graph (no data-dependent Python in the hot path).

Sparse experts (a cached tile index) and low-rank top-k dispatch (samples grouped per expert) are data-dependent by
design and break the graph; they still give eager's results under torch.compile."""

import pytest
import torch

from modeling_wemoe import WEMoEConfig, WEMoEForImageClassification

VISION = {
    "hidden_size": 32,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
}


@pytest.mark.parametrize(
    "options",
    [{}, {"expert_format": "lowrank", "rank": 4}, {"router_top_k": 2}],
    ids=["dense", "lowrank", "dense-top2"],
)
def test_forward_traces_without_graph_breaks(options):
    config = WEMoEConfig(
        vision_config=VISION,
        projection_dim=16,
        tasks=["a", "b", "c"],
        task_labels={t: ["x", "y"] for t in "abc"},
        **options,
    )
    model = WEMoEForImageClassification(config).eval()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 32, 32))
    assert explanation.graph_break_count == 0, explanation.break_reasons
