"""The backbone registry tells the truth: every registered family's model class, expert linears and plain model
types are what its plug-in says, and recipes, configs and artifacts reach the right family through it."""

import pytest
from transformers import BertConfig, CLIPVisionConfig, T5Config

from modeling_wemoe import WEMoEConfig
from modeling_wemoe.modeling_wemoe import WEMOE_MODEL_CLASSES, WEMoELinear, model_class_for
from wemoe.backbones import BACKBONES, backbone_for_config, get_backbone

# A tiny WEMoE config of every registered family: a family without one here fails `test_every_family_is_covered`.
TINY_BACKBONE_CONFIGS = {
    "bert": {
        "text_config": BertConfig(
            vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        ).to_dict()
    },
    "clip": {
        "vision_config": CLIPVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4
        ).to_dict(),
        "projection_dim": 8,
    },
    "t5": {
        "text_config": T5Config(
            vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2
        ).to_dict()
    },
}


def tiny_config(architecture: str) -> WEMoEConfig:
    return WEMoEConfig(
        **TINY_BACKBONE_CONFIGS[architecture], tasks=["a", "b"], task_labels={"a": ["x", "y"], "b": ["z", "w"]}
    )


def test_every_family_is_covered():
    assert set(TINY_BACKBONE_CONFIGS) == set(BACKBONES)


@pytest.mark.parametrize("architecture", sorted(BACKBONES))
def test_a_family_plug_in_describes_its_model(architecture):
    backbone = get_backbone(architecture)
    config = tiny_config(architecture)
    assert config.backbone == architecture and backbone_for_config(config) is backbone
    assert model_class_for(config) is backbone.model_class is WEMOE_MODEL_CLASSES[architecture]
    model = backbone.model_class(config)
    experts = [name for name, module in model.named_modules() if isinstance(module, WEMoELinear)]
    assert experts and all(name.endswith(backbone.expert_linears) for name in experts), experts
    assert backbone.input_kind in ("image", "text") and backbone.pipeline_tag
    for model_type in backbone.plain_model_types:
        assert backbone_for_config(type("Config", (), {"model_type": model_type})()) is backbone


def test_unknown_families_are_named():
    with pytest.raises(ValueError, match=r"Unknown architecture 'gpt2'; registered: \['bert', 'clip', 't5'"):
        get_backbone("gpt2")
    with pytest.raises(ValueError, match=r"No backbone family handles 'llama' models"):
        backbone_for_config(type("Config", (), {"model_type": "llama"})())


def test_a_config_saved_before_families_were_named_still_finds_its_family():
    saved = tiny_config("t5").to_dict()
    del saved["text_config"]["model_type"]
    loaded = WEMoEConfig.from_dict(saved)
    assert loaded.backbone == "t5" and backbone_for_config(loaded).architecture == "t5"
