"""Building WEMoE artifacts: reading checkpoints, merging, adapting, evaluating, saving.

Family-specific knowledge lives in one plug-in per backbone family (`wemoe.backbones`); the command-line
tools are thin layers over this library (`wemoe.cli`).
"""

from importlib.metadata import version

from .adaptation import adapt, adapt_artifact
from .add_task import add_task
from .artifact import load_artifact_model, save_artifact
from .backbones import BACKBONES, get_backbone
from .backbones.clip import default_image_processor
from .convert import convert
from .evaluation import evaluate
from .merge import merge, merge_bert, merge_clip, merge_static, merge_t5
from .merge_methods import STATIC_MERGE_METHODS, magnitude_keep_mask, task_arithmetic
from .recipe import MergeOptions, MergeRecipe, load_recipe

__version__ = version("wemoe")

__all__ = [
    "BACKBONES",
    "STATIC_MERGE_METHODS",
    "MergeOptions",
    "MergeRecipe",
    "adapt",
    "adapt_artifact",
    "add_task",
    "convert",
    "default_image_processor",
    "evaluate",
    "get_backbone",
    "load_artifact_model",
    "load_recipe",
    "magnitude_keep_mask",
    "merge",
    "merge_bert",
    "merge_clip",
    "merge_static",
    "merge_t5",
    "save_artifact",
    "task_arithmetic",
]
