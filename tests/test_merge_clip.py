"""merge_clip against plain-CLIP references: task arithmetic at init, exact per-sample routing, E-WEMoE storage."""

import pytest
import torch
import torch.nn.functional as F
from reference import per_sample_reference_logits, randomize_routers, stacked_task_vectors, task_arithmetic_tower

from modeling_wemoe.modeling_wemoe import WEMoERouter, WEMoESparseTaskVectors, num_kept_entries
from wemoe import merge_clip


@pytest.mark.parametrize(
    "options",
    [
        {"variant": "wemoe"},
        {"variant": "wemoe", "router": {"hidden_layers": 1}},
        {"variant": "wemoe", "router": {"hidden_layers": 0, "granularity": "token"}},
        {"variant": "e-wemoe", "keep": 1.0},
        {"variant": "wemoe", "upscale": ["mlp", "attention"]},
        {"variant": "e-wemoe", "keep": 1.0, "upscale": ["attention"], "router": {"granularity": "token"}},
    ],
    ids=["wemoe", "depth1", "depth0-token", "e-wemoe-keep-all", "mlp+attention", "e-wemoe-attention-token"],
)
def test_fresh_merge_equals_task_arithmetic(base, experts, classnames, tokenizer, pixel_values, options):
    options = {**options, "router": {**options.get("router", {}), "init_lambda": 0.25}}
    static_merge = {"method": "task_arithmetic", "scaling": 0.25}
    model = merge_clip(base, experts, classnames, tokenizer=tokenizer, static_merge=static_merge, **options)
    reference = task_arithmetic_tower(base, experts, scaling=0.25)
    with torch.no_grad():
        hidden = model(pixel_values, output_hidden_states=True).hidden_states[-1]
        expected = reference(pixel_values).last_hidden_state
    torch.testing.assert_close(hidden, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "options",
    [{"variant": "wemoe"}, {"variant": "e-wemoe", "keep": 0.1}, {"variant": "wemoe", "router": {"top_k": 2}}],
    ids=["wemoe", "e-wemoe", "top-2"],
)
def test_per_sample_routing_matches_per_sample_merged_reference(
    base, experts, classnames, tokenizer, pixel_values, options
):
    model = merge_clip(base, experts, classnames, tokenizer=tokenizer, **options)
    randomize_routers(model)
    with torch.no_grad():
        output = model(pixel_values, output_routing_weights=True)
    routing = torch.stack(output.routing_weights)  # (layers, batch, experts)
    varies = routing.std(dim=1).amax(dim=-1)  # per layer, the spread across samples of its most variable expert
    assert varies.min() > 1e-2, "routing must differ between samples for this test to mean anything"
    expected = per_sample_reference_logits(model, base, experts, pixel_values)
    torch.testing.assert_close(output.logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("upscale", [["mlp"], ["mlp", "attention"]])
def test_sample_logits_do_not_depend_on_the_rest_of_the_batch(
    base, experts, classnames, tokenizer, pixel_values, upscale
):
    model = merge_clip(base, experts, classnames, tokenizer=tokenizer, upscale=upscale)
    randomize_routers(model)
    others = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        in_batch = model(pixel_values).logits[0]
        in_other_batch = model(torch.cat([others[:2], pixel_values[:1], others[2:]])).logits[2]
        alone = model(pixel_values[:1]).logits[0]
    # Float32 rounding of batched matmuls moves logits of about 7 by 1e-6; a leak between samples moves them by ~1.
    torch.testing.assert_close(in_other_batch, in_batch, atol=1e-5, rtol=0)
    torch.testing.assert_close(alone, in_batch, atol=1e-5, rtol=0)


def test_heads_are_the_base_text_embeddings_of_the_class_prompts(base, experts, classnames, tokenizer, pixel_values):
    templates = {task: ["a photo of a {}."] for task in classnames}
    model = merge_clip(base, experts, classnames, tokenizer=tokenizer, templates=templates)
    prompts = [f"a photo of a {name}." for task in model.config.tasks for name in classnames[task]]
    with torch.no_grad():
        text = base.get_text_features(**tokenizer(prompts, padding=True, return_tensors="pt")).pooler_output
        image_embeds = model(pixel_values).image_embeds
        logits = model(pixel_values, task="colors").logits
    torch.testing.assert_close(model.classifier.weight, F.normalize(text, dim=-1), atol=1e-6, rtol=0)
    start, end = model.config.task_label_offsets["colors"]
    torch.testing.assert_close(logits, base.logit_scale.exp() * image_embeds @ F.normalize(text, dim=-1)[start:end].t())
    assert model.config.id2label[start] == "colors: red"


def test_e_wemoe_shares_one_router_across_layers(base, experts, classnames, tokenizer, pixel_values):
    model = merge_clip(base, experts, classnames, tokenizer=tokenizer, variant="e-wemoe")
    assert isinstance(model.router, WEMoERouter)
    assert all(layer.mlp.router is None for layer in model.vision_model.encoder.layers)
    router_keys = [key for key in model.state_dict() if "router" in key]
    assert router_keys and all(key.startswith("router.") for key in router_keys)
    before = model(pixel_values).logits
    randomize_routers(model)
    assert not torch.allclose(model(pixel_values).logits, before), "the shared router must drive every layer"


@pytest.mark.parametrize("keep", [0.1, 0.01])
def test_e_wemoe_keeps_the_largest_entries_of_each_tensor(base, experts, classnames, tokenizer, keep):
    model = merge_clip(base, experts, classnames, tokenizer=tokenizer, variant="e-wemoe", keep=keep)
    checked = 0
    for name, module in model.vision_model.named_modules():
        if not isinstance(module, WEMoESparseTaskVectors):
            continue
        key = name.replace("_task_vectors", "")
        full = stacked_task_vectors(base, experts, key)
        stored = module.dense()
        expected_kept = num_kept_entries(full[0].numel(), keep)
        assert module.values.shape == (len(experts), expected_kept)
        for expert_index in range(len(experts)):
            kept = stored[expert_index].flatten() != 0
            assert int(kept.sum()) == expected_kept
            smallest_kept = full[expert_index].flatten()[kept].abs().min() if expected_kept else float("inf")
            assert full[expert_index].flatten()[~kept].abs().max() <= smallest_kept
            torch.testing.assert_close(stored[expert_index].flatten()[kept], full[expert_index].flatten()[kept])
        checked += 1
    assert checked == 4 * model.config.vision_config.num_hidden_layers  # fc1/fc2 weight and bias per layer


@pytest.mark.parametrize("task", [None, "colors"])
def test_labels_give_cross_entropy_and_gradients_reach_only_the_routers(
    base, experts, classnames, tokenizer, pixel_values, task
):
    model = merge_clip(base, experts, classnames, tokenizer=tokenizer)
    labels = torch.tensor([0, 1, 2, 1])
    output = model(pixel_values, task=task, labels=labels)
    torch.testing.assert_close(output.loss, F.cross_entropy(output.logits, labels))
    output.loss.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    output_layers = {name for name in with_grad if ".router.fc2." in name}
    assert with_grad and with_grad <= {name for name, p in model.named_parameters() if p.requires_grad}
    assert len(output_layers) == 2 * model.config.vision_config.num_hidden_layers  # weight and bias of each layer
