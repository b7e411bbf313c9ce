"""The code that ships inside every WEMoE artifact (copied flat next to config.json by `save_pretrained`)."""

from .configuration_wemoe import WEMoEConfig
from .modeling_wemoe import (
    WEMoEDenseTaskVectors,
    WEMoEForConditionalGeneration,
    WEMoEForImageClassification,
    WEMoELinear,
    WEMoEPreTrainedModel,
    WEMoERouter,
    WEMoESparseTaskVectors,
)

__all__ = [
    "WEMoEConfig",
    "WEMoEDenseTaskVectors",
    "WEMoEForConditionalGeneration",
    "WEMoEForImageClassification",
    "WEMoELinear",
    "WEMoEPreTrainedModel",
    "WEMoERouter",
    "WEMoESparseTaskVectors",
]
