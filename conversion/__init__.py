"""Building WEMoE artifacts: reading checkpoints, merging, zero-shot heads, saving."""

from .artifact import default_image_processor, load_image_processor, save_artifact
from .clip import merge_clip
from .convert import convert
from .merge_methods import STATIC_MERGE_METHODS, magnitude_keep_mask, task_arithmetic
from .t5 import merge_t5

__all__ = [
    "STATIC_MERGE_METHODS",
    "convert",
    "default_image_processor",
    "load_image_processor",
    "magnitude_keep_mask",
    "merge_clip",
    "merge_t5",
    "save_artifact",
    "task_arithmetic",
]
