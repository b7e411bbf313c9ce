"""Task data for test-time adaptation and evaluation: a DATA.yaml naming one `datasets.load_dataset` spec per task.

```yaml
tasks:
  eurosat: {path: tanganke/eurosat, split: test, image_column: image, label_column: label}
  shapes: {path: imagefolder, data_dir: ./data/shapes, split: train}
  sst2: {path: glue, config_name: sst2, split: validation, text_column: sentence, prefix: "sst2 sentence: "}
```

CLIP models read `image_column`; T5 models read `prefix + text_column`. Adaptation never reads labels; evaluation
does.
"""

import os
from collections.abc import Mapping
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from .recipe import DatasetSource, load_validated


class TaskData(DatasetSource):
    """One task's dataset and its input column: images for CLIP, text (with the task's prompt prefix) for T5.
    Labels are read only by evaluation."""

    image_column: str = "image"
    text_column: str = "text"
    prefix: str = ""

    def input_column(self, text: bool) -> str:
        return self.text_column if text else self.image_column


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tasks: Annotated[dict[str, TaskData], Field(min_length=1)]


def load_data_config(data: DataConfig | Mapping[str, Any] | str | os.PathLike) -> DataConfig:
    """A validated data config from a `DataConfig`, a dict, or a YAML file path."""
    return load_validated(DataConfig, data, "data config")


def check_tasks_known(requested: list[str], model_tasks: list[str]) -> None:
    unknown = [task for task in requested if task not in model_tasks]
    if unknown:
        raise ValueError(f"Data config names task(s) {unknown} that the model does not have; its tasks: {model_tasks}.")


def open_dataset(task: str, source: DatasetSource, split: str | None = None):
    """`datasets.load_dataset(...)` for one task, its failures (and empty splits) reported with the task's name."""
    from datasets import load_dataset

    path, split = source.path, split or source.split
    try:
        dataset = load_dataset(
            path, source.config_name, data_dir=source.data_dir, data_files=source.data_files, split=split
        )
    except Exception as error:  # datasets raises many types for a missing or unreadable dataset
        # datasets refuses to build an empty split and says so in these words.
        problem = "is empty" if "corresponds to no data" in str(error) else "cannot be loaded"
        raise ValueError(f"Task {task!r}: dataset {path!r} split {split!r} {problem} ({error}).") from error
    if len(dataset) == 0:
        raise ValueError(f"Task {task!r}: dataset {path!r} split {split!r} is empty.")
    return dataset


def load_task_dataset(
    task: str, spec: TaskData, split: str | None = None, need_labels: bool = False, text: bool = False
):
    """The task's `datasets.Dataset`, checked to be non-empty and to have the input (and label) column; `text`
    says the input is the text column (T5) rather than the image column (CLIP)."""
    split = split or spec.split
    dataset = open_dataset(task, spec, split)
    required = [spec.input_column(text)] + ([spec.label_column] if need_labels else [])
    for column in required:
        if column not in dataset.column_names:
            raise ValueError(
                f"Task {task!r}: dataset {spec.path!r} split {split!r} has no column {column!r}; "
                f"columns: {dataset.column_names}."
            )
    return dataset


def pixel_values_of(images: list, image_processor) -> torch.Tensor:
    return image_processor(images=[image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]


def batch_indices(num_samples: int, batch_size: int, seed: int, task_index: int, step: int) -> list[int]:
    """The sample indices of one task's batch at `step`: full batches of a fresh seeded permutation every epoch.

    A pure function of its arguments, so a resumed run draws exactly the batches an uninterrupted run would.
    """
    batches_per_epoch = num_samples // batch_size
    epoch, position = divmod(step, batches_per_epoch)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + task_index * 10_007 + epoch)
    permutation = torch.randperm(num_samples, generator=generator)
    return permutation[position * batch_size : (position + 1) * batch_size].tolist()
