"""The code that ships inside every WEMoE artifact (copied flat next to config.json by `save_pretrained`): the
configuration, the shared layers, and one modeling file per backbone family."""

from .configuration_wemoe import WEMoEConfig
from .modeling_wemoe import (
    WEMoEDenseTaskVectors,
    WEMoELinear,
    WEMoELowRankTaskVectors,
    WEMoEPreTrainedModel,
    WEMoERouter,
    WEMoESparseTaskVectors,
    WEMoETaskVectors,
)
from .modeling_wemoe_bert import WEMoEForSequenceClassification as WEMoEForSequenceClassification
from .modeling_wemoe_clip import WEMoEForImageClassification
from .modeling_wemoe_t5 import WEMoEForConditionalGeneration

__all__ = [
    "WEMoEConfig",
    "WEMoEDenseTaskVectors",
    "WEMoEForConditionalGeneration",
    "WEMoEForImageClassification",
    "WEMoELinear",
    "WEMoELowRankTaskVectors",
    "WEMoEPreTrainedModel",
    "WEMoERouter",
    "WEMoESparseTaskVectors",
    "WEMoETaskVectors",
]
