import pytest
from huggingface_hub.errors import StrictDataclassError
from transformers import CLIPVisionConfig

from modeling_wemoe import WEMoEConfig

VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


def make_config(**overrides) -> WEMoEConfig:
    fields = {
        "vision_config": VISION,
        "projection_dim": 16,
        "tasks": ["shapes", "colors"],
        "task_labels": {"shapes": ["circle", "square"], "colors": ["red"]},
    }
    return WEMoEConfig(**{**fields, **overrides})


def test_derived_fields_and_round_trip(tmp_path):
    config = make_config(expert_format="sparse", keep=0.1, router_mode="shared")
    assert isinstance(config.vision_config, CLIPVisionConfig)
    assert config.num_experts == 2
    assert config.id2label == {0: "shapes: circle", 1: "shapes: square", 2: "colors: red"}
    assert config.task_label_offsets == {"shapes": (0, 2), "colors": (2, 3)}
    config.save_pretrained(tmp_path)
    reloaded = WEMoEConfig.from_pretrained(tmp_path)
    assert reloaded.to_dict() == config.to_dict()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"router_hidden_layers": 3}, "router_hidden_layers` must be 0, 1 or 2, got 3"),
        ({"router_top_k": 3}, r"`router_top_k` must be between 1 and num_experts \(2\), got 3"),
        ({"router_top_k": 0}, r"`router_top_k` must be between 1 and num_experts \(2\), got 0"),
        ({"routing_granularity": "batch"}, "routing_granularity"),
        ({"router_mode": "global"}, "router_mode"),
        ({"expert_format": "sparse"}, r"`keep` must be in \(0, 1\] with expert_format='sparse', got None"),
        ({"expert_format": "sparse", "keep": 1.5}, r"`keep` must be in \(0, 1\]"),
        ({"keep": 0.1}, "only applies to expert_format='sparse'"),
        ({"expert_format": "lowrank"}, "`rank` must be a positive int with expert_format='lowrank', got None"),
        ({"rank": 8}, "only applies to expert_format='lowrank'"),
        ({"tasks": ["shapes", "shapes"], "task_labels": {"shapes": ["a"]}}, r"duplicate names \['shapes'\]"),
        ({"tasks": []}, "at least one task"),
        ({"num_experts": 3}, r"`num_experts` \(3\) must equal the number of tasks \(2\)"),
        ({"task_labels": {"shapes": ["circle"]}}, "one entry per task"),
        ({"task_labels": {"shapes": ["circle"], "colors": []}}, r"empty class list for task\(s\) \['colors'\]"),
        ({"vision_config": None}, "Give exactly one of `vision_config` \\(CLIP\\) and `text_config` \\(T5\\)"),
        ({"projection_dim": None}, "`projection_dim` must be a positive int"),
        ({"tasks": "shapes"}, "tasks"),
        ({"expert_tasks": ["colors", "shapes"]}, r"`expert_tasks` \['colors', 'shapes'\] must name tasks of `tasks`"),
        ({"expert_tasks": ["cars"]}, r"each once and in the order of `tasks`"),
        ({"expert_tasks": []}, "`expert_tasks` must list at least one task"),
        ({"expert_tasks": ["colors"], "num_experts": 2}, r"`num_experts` \(2\) must equal the number of tasks with an"),
        ({"expert_tasks": ["colors"], "router_top_k": 2}, r"`router_top_k` must be between 1 and num_experts \(1\)"),
    ],
)
def test_invalid_values_are_rejected_with_the_field_name(overrides, message):
    with pytest.raises(StrictDataclassError, match=message):
        make_config(**overrides)


def test_tasks_without_an_expert_are_a_clip_config_s_only():
    config = make_config(expert_tasks=["colors"])
    assert config.num_experts == 1 and config.tasks_with_experts == ["colors"]
    assert config.tasks_without_experts == ["shapes"] and len(config.id2label) == 3  # every task keeps its head
    assert make_config().expert_tasks is None and make_config().tasks_with_experts == ["shapes", "colors"]
    with pytest.raises(StrictDataclassError, match="`expert_tasks` applies to a CLIP backbone only"):
        WEMoEConfig(text_config={"d_model": 16}, tasks=["sst2", "qqp"], expert_tasks=["sst2"])
