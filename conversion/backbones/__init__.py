"""The registry of backbone families. Each module of this package is one family's plug-in (a `Backbone` subclass,
registered with `register_backbone` under its `architecture` name); all are imported here, so a new family is a new
module and nothing else in `wemoe` changes.

List what is registered:

```python
>>> from wemoe.backbones import BACKBONES
>>> {name: backbone.model_class.__name__ for name, backbone in BACKBONES.items()}
```
"""

import importlib
import pkgutil

from transformers import PreTrainedConfig

from .base import Backbone

BACKBONES: dict[str, Backbone] = {}


def register_backbone(backbone_class: type[Backbone]) -> type[Backbone]:
    """Class decorator: register one instance of a family's `Backbone` under its `architecture`."""
    BACKBONES[backbone_class.architecture] = backbone_class()
    return backbone_class


def get_backbone(architecture: str) -> Backbone:
    if architecture not in BACKBONES:
        raise ValueError(f"Unknown architecture {architecture!r}; registered: {sorted(BACKBONES)}.")
    return BACKBONES[architecture]


def backbone_for_config(config: PreTrainedConfig) -> Backbone:
    """The family of a WEMoE artifact's config (its `backbone`) or of a plain model's (its `model_type`)."""
    if config.model_type == "wemoe":
        # Configs saved by 0.1.0 code name no backbone: a vision tower is CLIP, a text model T5.
        backbone = getattr(config, "backbone", None) or ("clip" if config.vision_config is not None else "t5")
        return get_backbone(backbone)
    for backbone in BACKBONES.values():
        if config.model_type in backbone.plain_model_types:
            return backbone
    known = sorted(model_type for backbone in BACKBONES.values() for model_type in backbone.plain_model_types)
    raise ValueError(f"No backbone family handles {config.model_type!r} models; known model types: {known}.")


for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["BACKBONES", "Backbone", "backbone_for_config", "get_backbone", "register_backbone"]
