"""Bases and experts given as directories (both CLIP key layouts) give the same model as in memory."""

import torch

from modeling_wemoe import WEMoEForImageClassification
from modeling_wemoe.modeling_wemoe import WEMoESparseTaskVectors
from wemoe import default_image_processor, merge_clip


def test_merge_from_directories_equals_merge_in_memory(base, experts, classnames, tokenizer, pixel_values, tmp_path):
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    default_image_processor(base.config.vision_config).save_pretrained(tmp_path / "base")
    paths = {}
    for task, expert in experts.items():  # CLIPVisionModel dirs (no prefix) and a CLIPModel dir (vision_model.)
        expert.save_pretrained(tmp_path / task)
        paths[task] = str(tmp_path / task)

    from_paths = merge_clip(str(tmp_path / "base"), paths, classnames)
    in_memory = merge_clip(base, experts, classnames, tokenizer=tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(from_paths(pixel_values).logits, in_memory(pixel_values).logits, atol=1e-6, rtol=0)


def test_only_routers_train_and_the_report_counts_what_is_stored(base, experts, classnames, tokenizer):
    model = merge_clip(base, experts, classnames, tokenizer=tokenizer)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".router." in name for name in trainable)
    vision = base.config.vision_config
    mlp_entries = vision.num_hidden_layers * (
        2 * vision.hidden_size * vision.intermediate_size + vision.hidden_size + vision.intermediate_size
    )
    router_parameters = vision.num_hidden_layers * (
        vision.hidden_size * (vision.hidden_size + 1) + 3 * (vision.hidden_size + 1)
    )
    report = model.parameter_report()
    assert report == {
        "trainable_parameters": router_parameters,
        "total_parameters": model.num_parameters(),
        "task_vector_entries": 3 * mlp_entries,
    }
    assert model.num_parameters(only_trainable=True) == router_parameters

    sparse = merge_clip(base, experts, classnames, tokenizer=tokenizer, variant="e-wemoe", keep=0.1)
    per_layer = [vision.hidden_size * vision.intermediate_size] * 2 + [vision.intermediate_size, vision.hidden_size]
    kept = vision.num_hidden_layers * sum(round(0.1 * n) for n in per_layer)
    assert sparse.parameter_report()["task_vector_entries"] == 3 * kept
    assert sparse.parameter_report()["trainable_parameters"] == vision.hidden_size * (vision.hidden_size + 1) + 3 * (
        vision.hidden_size + 1
    )


def test_a_full_clip_expert_with_a_changed_text_tower_is_reported(base, experts, classnames, tokenizer, caplog):
    changed = type(experts["scenes"])(base.config).eval()
    changed.load_state_dict(experts["scenes"].state_dict())
    with torch.no_grad():
        changed.text_model.encoder.layers[0].mlp.fc1.bias.add_(1.0)
    with caplog.at_level("WARNING", logger="wemoe.clip"):
        merge_clip(base, {**experts, "scenes": changed}, classnames, tokenizer=tokenizer)
    assert "Expert 'scenes' has a fine-tuned text tower" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="wemoe.clip"):
        merge_clip(base, experts, classnames, tokenizer=tokenizer)
    assert "text tower" not in caplog.text


def test_from_pretrained_builds_the_e_wemoe_tile_index_so_forwards_reuse_it(
    base, experts, classnames, tokenizer, pixel_values, tmp_path
):
    merge_clip(base, experts, classnames, tokenizer=tokenizer, variant="e-wemoe", keep=0.1).save_pretrained(tmp_path)
    model = WEMoEForImageClassification.from_pretrained(tmp_path)
    stores = [module for module in model.modules() if isinstance(module, WEMoESparseTaskVectors)]
    assert stores and all(store._tile_layouts for store in stores), "the first forward would build the index"
    built = [store._tile_layouts for store in stores]
    with torch.no_grad():
        model(pixel_values)
    assert all(store._tile_layouts is layouts for store, layouts in zip(stores, built, strict=True))
