"""Scoring models on labeled task data, and recording the scores in a model card; the library behind `wemoe-eval`
(`wemoe.cli.evaluate`).

Which model family a directory holds (a WEMoE artifact's `backbone`, a plain model's `model_type`) decides how it
is scored (`Backbone.evaluate`): classifiers by accuracy, text-to-text models by exact match or Spearman.
"""

import logging
import os
from pathlib import Path

import torch
from accelerate.utils import parse_flag_from_env
from huggingface_hub import EvalResult, ModelCard
from transformers import AutoConfig, PreTrainedConfig

from .artifact import load_config
from .backbones import backbone_for_config
from .data import TaskData, load_data_config, load_task_dataset
from .model_card import add_eval_results, model_index_of, set_model_index
from .outputs import push_folder, write_file_atomically
from .results import EvaluationResults, task_model_dirs

logger = logging.getLogger(__name__)

# `datasets` loaders for local files: not a dataset's identity, so results name the task instead.
PACKAGED_BUILDERS = {"parquet", "imagefolder", "csv", "json", "arrow", "webdataset", "text"}


def model_config(model_dir: str | os.PathLike) -> PreTrainedConfig:
    """The model's config; for a PEFT adapter, which has none of its own, its base model's; for a directory of
    per-task models, the first one's."""
    per_task = task_model_dirs(model_dir)
    if per_task:
        return AutoConfig.from_pretrained(next(iter(per_task.values())))
    try:
        return load_config(model_dir)
    except (OSError, ValueError) as error:
        from peft import PeftConfig

        try:
            base = PeftConfig.from_pretrained(str(model_dir)).base_model_name_or_path
        except (OSError, ValueError):
            raise error from None
        if not base:
            raise ValueError(f"{str(model_dir)!r} is a PEFT adapter that does not say its base model.") from None
        return AutoConfig.from_pretrained(base, trust_remote_code=True)


def resolve_device(device: str | None = None) -> torch.device:
    """The device to evaluate on: `device` when given, checked before anything loads (a typo or a GPU this machine
    lacks fails at once, not after minutes of loading), else CUDA, then Apple's MPS, then the CPU, whichever this
    machine has first, as accelerate picks for training (and the CPU under `ACCELERATE_USE_CPU=true`, as there)."""
    if device is None:
        if parse_flag_from_env("ACCELERATE_USE_CPU"):
            return torch.device("cpu")
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"--device {device!r} is not a torch device ({error}).") from None
    if resolved.type == "meta":
        raise ValueError("--device meta holds no weights; give a device that computes (cpu, cuda, mps, ...).")
    missing = {
        "cuda": not torch.cuda.is_available() or (resolved.index or 0) >= torch.cuda.device_count(),
        "mps": not torch.backends.mps.is_available(),
    }.get(resolved.type, False)
    if missing:
        raise ValueError(f"--device {device!r}: this machine has no such {resolved.type} device; try --device cpu.")
    return resolved


def evaluate(
    model_dir: str | os.PathLike,
    data,
    *,
    split: str | None = None,
    batch_size: int = 64,
    max_new_tokens: int = 16,
    device: str | None = None,
    base: str | None = None,
) -> EvaluationResults:
    """Scores per task and their average (`"average"`) on labeled data (a DATA.yaml path, dict or `DataConfig`):
    accuracy for classifiers; exact match (or Spearman for float labels) for text-to-text models, which generate up
    to `max_new_tokens` tokens per answer. The model runs on `device` (default: `resolve_device`'s choice). A
    checkpoint that holds only part of a model (a fine-tuned CLIP vision tower saved alone) is scored inside `base`,
    the model it was fine-tuned from (default: the one its config names)."""
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"--batch-size and --max-new-tokens must be positive, got {batch_size} and {max_new_tokens}.")
    device = resolve_device(device)
    logger.info("Evaluating %s on %s", model_dir, device)
    data_config = load_data_config(data)
    config = model_config(model_dir)
    backbone = backbone_for_config(config)
    if base is not None and config.model_type not in backbone.partial_model_types:
        raise ValueError(
            f"--base completes a checkpoint that holds only part of a model (a CLIPVisionModel); {str(model_dir)!r} is "
            f"a whole {config.model_type!r} model, scored as it is."
        )
    datasets = {
        task: load_task_dataset(task, spec, split=split, need_labels=True, input_kind=backbone.input_kind)
        for task, spec in data_config.tasks.items()
    }
    return backbone.evaluate(
        str(model_dir), datasets, data_config, batch_size, max_new_tokens, device=device, base=base
    )


def update_model_card(
    model_dir: Path,
    results: EvaluationResults,
    data_config,
    split: str | None,
    *,
    push_to_hub: str | None = None,
    private: bool = False,
    upload: bool = True,
) -> None:
    """Add the scores to the artifact's README.md (replaced atomically) as model-index results of the model the card
    names, or of the Hub repo `push_to_hub`, which `model_dir` is then uploaded to (unless `upload` is false: a
    caller recording several runs uploads once, with the last). Results of other models (the unadapted model's, in
    an adapted artifact's card) are kept; only this model's results for the same task, dataset and metric are
    replaced. Corrupted data is a dataset of its own (`card_dataset_fields`)."""
    card_path = model_dir / "README.md"
    card = ModelCard.load(card_path) if card_path.is_file() else ModelCard("---\n---\n")
    recorded_name, entries = model_index_of(card_path)
    model_name = push_to_hub or recorded_name or model_dir.name  # the directory: for a card no command wrote
    scores = [
        EvalResult(
            task_type=results.task_type,
            dataset_type=task if spec.path in PACKAGED_BUILDERS else spec.path,
            **card_dataset_fields(task, spec),
            dataset_split=split or spec.split,
            metric_type=results.metrics[task],
            metric_value=results[task],
        )
        for task, spec in data_config.tasks.items()
    ]
    set_model_index(card, model_name, add_eval_results(entries, model_name, scores))
    write_file_atomically(card_path, str(card).encode())
    if push_to_hub and upload:
        push_folder(model_dir, push_to_hub, "Add evaluation results to the model card", private=private)


def card_dataset_fields(task: str, spec: TaskData) -> dict:
    """How the model-index names a task's data: by the task and its dataset's config. Corrupted data gets a config
    of its own (`motion_blur-3`, after the dataset's config if it has one), so its results are kept beside the clean
    ones instead of replacing them, and the corruption in full (seed included) as the dataset's arguments."""
    corruption = spec.corruption
    if corruption is None:
        return {"dataset_name": task, "dataset_config": spec.config_name}
    return {
        "dataset_name": f"{task} ({corruption.name}, severity {corruption.severity})",
        "dataset_config": "-".join(filter(None, [spec.config_name, corruption.label])),
        "dataset_args": corruption.model_dump(),
    }
