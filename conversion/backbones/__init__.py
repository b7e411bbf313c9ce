"""The backbone family plug-ins, one module each (`clip.py`, `t5.py`, `bert.py`): every module of this package is
imported here and registers its `Backbone` under its `architecture` name, so a new family is a new module and nothing
else in `wemoe` changes (`docs/adding-a-backbone.md`). The interface and the registry are `wemoe.backbone`.

List what is registered:

```python
>>> from wemoe.backbones import BACKBONES
>>> {name: backbone.model_class.__name__ for name, backbone in BACKBONES.items()}
```
"""

import importlib
import pkgutil

from ..backbone import BACKBONES, Backbone, backbone_for_config, get_backbone, register_backbone

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["BACKBONES", "Backbone", "backbone_for_config", "get_backbone", "register_backbone"]
