"""The softmax routing option: every weight-ensembled matrix a convex combination of the experts' own, weight
averaging at the start, one expert's exactly when the router is sure; the paper's raw routing stays the default."""

import pytest
import torch
from reference import randomize_routers

from modeling_wemoe.modeling_wemoe import WEMoERouter
from wemoe import merge_clip
from wemoe.recipe import MergeOptions


@pytest.mark.parametrize("variant", ["wemoe", "e-wemoe"])
def test_softmax_routing_weights_sum_to_one_and_start_uniform(
    base, experts, classnames, tokenizer, pixel_values, variant
):
    model = merge_clip(base, experts, classnames, tokenizer=tokenizer, variant=variant,
                       router={"normalization": "softmax"})  # fmt: skip
    assert model.config.router_normalization == "softmax"
    with torch.no_grad():
        start = model(pixel_values, output_routing_weights=True).routing_weights
        randomize_routers(model)
        trained = model(pixel_values, output_routing_weights=True).routing_weights
    for weights in start:
        torch.testing.assert_close(weights, torch.full_like(weights, 1 / len(experts)))
    for weights in trained:
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
        assert (weights > 0).all() and weights.std() > 1e-3  # routed, not uniform


def test_a_sure_softmax_router_gives_that_experts_weights():
    router = WEMoERouter(hidden_size=4, num_experts=3, hidden_layers=1, normalization="softmax")
    with torch.no_grad():
        router.fc.weight.zero_()
        router.fc.bias.copy_(torch.tensor([0.0, 60.0, 0.0]))
    torch.testing.assert_close(router(torch.randn(2, 5, 4)), torch.tensor([0.0, 1.0, 0.0]).expand(2, 5, 3))


def test_raw_routing_stays_the_default_and_other_normalisations_are_refused():
    assert MergeOptions().router.normalization == "none"
    with pytest.raises(ValueError, match="router.normalization"):
        MergeOptions.model_validate({"router": {"normalization": "max"}})
