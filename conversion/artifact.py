"""Writing a WEMoE artifact: config, weights, code files and processor (image processor or tokenizer), all or
nothing."""

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from transformers import AutoImageProcessor, CLIPModel, CLIPVisionConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.image_processing_utils import BaseImageProcessor
from transformers.utils import is_torchvision_available

from .checkpoints import ModelSource

logger = logging.getLogger(__name__)


def default_image_processor(vision_config: CLIPVisionConfig) -> BaseImageProcessor:
    """CLIP's preprocessing (resize, center crop, CLIP mean/std) at the tower's image size, on torchvision when it is
    installed and on PIL otherwise (naming the backend avoids transformers' fallback warning)."""
    if is_torchvision_available():
        from transformers import CLIPImageProcessor
    else:
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    size = vision_config.image_size
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def load_image_processor(base: ModelSource, vision_config: CLIPVisionConfig) -> BaseImageProcessor:
    """The base model's own image processor when it has one, else CLIP's default at the tower's image size."""
    if not isinstance(base, PreTrainedModel):
        try:
            return AutoImageProcessor.from_pretrained(base)
        except OSError:
            logger.warning("No image processor found with %s; using CLIP's default preprocessing.", base)
    elif not isinstance(base, CLIPModel):
        raise TypeError(f"Expected a CLIPModel or a path, got {type(base).__name__}.")
    return default_image_processor(vision_config)


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not overwrite:
        raise FileExistsError(
            f"Output directory {str(output_dir)!r} already exists (pass overwrite=True to replace it)."
        )


def save_artifact(
    model: PreTrainedModel,
    output_dir: str | os.PathLike,
    processor: BaseImageProcessor | PreTrainedTokenizerBase,
    *,
    extra_files: Mapping[str, str] | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
) -> Path:
    """Save a loadable artifact into `output_dir`: written to a temporary sibling directory and renamed into place
    only when complete, so a failure never leaves a partial artifact behind. `extra_files` maps file names to text
    (model card, recipe)."""
    output_dir = Path(output_dir)
    check_output_dir(output_dir, overwrite)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        processor.save_pretrained(staging)
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("Saved WEMoE artifact to %s", output_dir)
    return output_dir
