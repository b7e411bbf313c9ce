"""Writing a WEMoE artifact: config, weights, code files and processor (image processor or tokenizer), all or
nothing."""

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.image_processing_utils import BaseImageProcessor

from modeling_wemoe.modeling_wemoe import loading_problems

from .checkpoints import naming_load_errors
from .outputs import staged_output

logger = logging.getLogger(__name__)


def is_artifact(config: PreTrainedConfig | None) -> bool:
    """Whether a config is a WEMoE artifact's: its files load with the artifact's own code (`trust_remote_code`)."""
    return config is not None and config.model_type == "wemoe"


def load_config(model_dir: str | os.PathLike, what: str = "The model") -> PreTrainedConfig:
    """A model's config, an artifact's read with its own code; a damaged config.json is an error naming it."""
    with naming_load_errors(model_dir, what):
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=True)


def load_artifact_model(model_dir: str | os.PathLike, auto_class: type = AutoModel) -> PreTrainedModel:
    """A WEMoE artifact's model with its own code, refused unless its tensors match its config exactly (transformers
    would only report it, and leave missing tensors uninitialised). Checked here as well as in the model code, so
    that artifacts whose code predates that check are refused too."""
    try:
        with naming_load_errors(model_dir, "The model"):
            model, loading_info = auto_class.from_pretrained(
                model_dir, trust_remote_code=True, output_loading_info=True
            )
    except OSError as error:
        raise ValueError(f"Cannot load the model {str(model_dir)!r}: {error}") from None
    problems = loading_problems(loading_info)
    if problems:
        raise ValueError(f"The artifact {str(model_dir)!r} does not match its config.json: {problems}.")
    return model.eval()


def check_max_shard_size(max_shard_size: str | int) -> int:
    """The shard size in bytes, checked before anything is merged (`"5GB"`, `"500MB"` or an int)."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        size = convert_file_size_to_int(max_shard_size)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"--max-shard-size {max_shard_size!r} is not a size; give e.g. 5GB, 500MB or a number of bytes ({error})."
        ) from None
    if size <= 0:
        raise ValueError(f"--max-shard-size must be positive, got {max_shard_size!r}.")
    return size


# The file a lone tokenizer or image processor saves its settings in, and the field naming its class.
PROCESSOR_CLASS_FIELDS = {
    "tokenizer_config.json": "tokenizer_class",
    "preprocessor_config.json": "image_processor_type",
}


def name_processor_class(directory: Path) -> None:
    """Name the saved tokenizer's or image processor's stock class as `processor_class`. Without it, AutoProcessor
    looks for the class in config.json, whose `auto_map` names the artifact's own code, and stops at transformers'
    "Do you wish to run the custom code?" prompt unless given `trust_remote_code`; the preprocessing needs none."""
    for file_name, class_field in PROCESSOR_CLASS_FIELDS.items():
        path = directory / file_name
        if not path.is_file():
            continue
        settings = json.loads(path.read_text())
        if class_field in settings and "processor_class" not in settings:
            settings["processor_class"] = settings[class_field]
            path.write_text(json.dumps(settings, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def write_artifact(
    model: PreTrainedModel,
    directory: Path,
    processor: BaseImageProcessor | PreTrainedTokenizerBase,
    *,
    extra_files: Mapping[str, str] | None = None,
    max_shard_size: str | int = "5GB",
) -> None:
    """Write a loadable artifact into the (staging) `directory`: config, weights, code files, processor, and
    `extra_files` (file name -> text: model card, recipe)."""
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    processor.save_pretrained(directory)
    if is_artifact(model.config):
        name_processor_class(directory)
    for name, text in (extra_files or {}).items():
        (directory / name).write_text(text)


def save_artifact(
    model: PreTrainedModel,
    output_dir: str | os.PathLike,
    processor: BaseImageProcessor | PreTrainedTokenizerBase,
    *,
    extra_files: Mapping[str, str] | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
) -> Path:
    """Save a loadable artifact as `output_dir`, all or nothing (see `wemoe.outputs.staged_output`)."""
    check_max_shard_size(max_shard_size)
    with staged_output(output_dir, overwrite=overwrite) as staging:
        write_artifact(model, staging, processor, extra_files=extra_files, max_shard_size=max_shard_size)
    logger.info("Saved WEMoE artifact to %s", output_dir)
    return Path(output_dir)
