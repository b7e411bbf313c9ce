"""Task data for test-time adaptation and evaluation: a DATA.yaml naming one `datasets.load_dataset` spec per task.

```yaml
tasks:
  eurosat: {path: tanganke/eurosat, split: test, image_column: image, label_column: label}
  shapes: {path: imagefolder, data_dir: ./data/shapes, split: train}
  sst2: {path: glue, config_name: sst2, split: validation, text_column: sentence, prefix: "sst2 sentence: "}
```

Image models (CLIP) read `image_column`; text models read `prefix + text_column`. Adaptation never reads labels;
evaluation does. An image task may be corrupted (`corruption: {name: motion_blur, severity: 3}`, see
`wemoe.corruptions`), as `--corruption` does to every task.
"""

import io
import os
from collections.abc import Mapping
from typing import Annotated, Any

import numpy as np
import torch
from PIL import Image as PILImage
from pydantic import BaseModel, ConfigDict, Field, model_serializer

from .corruptions import Corruption, library
from .specs import DatasetSource, dataset_paths, load_validated


class TaskData(DatasetSource):
    """One task's dataset and its input column: images for CLIP, text (with the task's prompt prefix) for T5, and
    optionally a corruption of its images (`wemoe.corruptions`). Labels are read only by evaluation."""

    image_column: str = "image"
    text_column: str = "text"
    prefix: str = ""
    corruption: Corruption | None = None

    @model_serializer(mode="wrap")
    def omit_no_corruption(self, serialize) -> dict:
        # Clean data dumps as before corruptions existed, so TTA checkpoints that record it still resume.
        dumped = serialize(self)
        if self.corruption is None:
            dumped.pop("corruption", None)
        return dumped

    def input_column(self, input_kind: str) -> str:
        """The column a family reads: `"image"` or `"text"` (`Backbone.input_kind`)."""
        return self.text_column if input_kind == "text" else self.image_column


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tasks: Annotated[dict[str, TaskData], Field(min_length=1)]


def load_data_config(data: DataConfig | Mapping[str, Any] | str | os.PathLike) -> DataConfig:
    """A validated data config from a `DataConfig`, a dict, or a YAML file path."""
    return load_validated(DataConfig, data, "data config")


def with_corruption(
    data: "DataConfig | Mapping[str, Any] | str | os.PathLike", corruption: Corruption | None
) -> DataConfig:
    """The data config with every task's images corrupted by `corruption` (None: every task clean)."""
    data_config = load_data_config(data)
    tasks = {task: spec.model_copy(update={"corruption": corruption}) for task, spec in data_config.tasks.items()}
    return data_config.model_copy(update={"tasks": tasks})


def data_inputs(data: "DataConfig | Mapping[str, Any] | str | os.PathLike") -> list[str]:
    """The local paths a data config reads (itself included, when it is a file)."""
    paths = [str(data)] if isinstance(data, (str, os.PathLike)) else []
    return paths + [path for spec in load_data_config(data).tasks.values() for path in dataset_paths(spec)]


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
    task: str, spec: TaskData, split: str | None = None, need_labels: bool = False, input_kind: str = "image"
):
    """The task's `datasets.Dataset`, checked to be non-empty and to have the input (and label) column;
    `input_kind` says whether the input is the image column or the text column (`Backbone.input_kind`). Every image
    is opened and checked here, before any model is loaded."""
    split = split or spec.split
    if spec.corruption is not None:
        check_corruptible(task, input_kind)
    dataset = open_dataset(task, spec, split)
    required = [spec.input_column(input_kind)] + ([spec.label_column] if need_labels else [])
    for column in required:
        if column not in dataset.column_names:
            raise ValueError(
                f"Task {task!r}: dataset {spec.path!r} split {split!r} has no column {column!r}; "
                f"columns: {dataset.column_names}."
            )
    if input_kind == "image":
        dataset = keep_images_undecoded(dataset, spec.image_column)
        check_images(dataset, spec.image_column, task)
    return dataset


def load_task_datasets(data_config, tasks: list[str], input_kind: str) -> dict[str, tuple]:
    """Each task's checked dataset and its spec (`(dataset, TaskData)`), for the tasks the data config names;
    `input_kind` is what the family reads (`"image"` or `"text"`)."""
    data_config = load_data_config(data_config)
    check_tasks_known(list(data_config.tasks), tasks)
    return {
        task: (load_task_dataset(task, spec, input_kind=input_kind), spec) for task, spec in data_config.tasks.items()
    }


def check_corruptible(task: str, input_kind: str) -> None:
    """Corruptions apply to images, with the library installed: checked with the data, before any model loads."""
    if input_kind != "image":
        raise ValueError(f"Task {task!r}: corruptions apply to images; this model reads {input_kind}.")
    library()


def keep_images_undecoded(dataset, column: str):
    """The dataset with its `Image` column as stored (bytes and path), so that this module decodes it: an image that
    cannot be read is then reported with its task, row and file instead of failing inside `datasets`."""
    from datasets import Image

    feature = dataset.features.get(column)
    if isinstance(feature, Image) and feature.decode:
        return dataset.cast_column(column, Image(decode=False))
    return dataset


def open_image(value: Any, task: str, row: int, load: bool = True) -> PILImage.Image:
    """One stored image (a PIL image, `{"bytes", "path"}` as `datasets` stores them, or a path), decoded; with
    `load=False` only opened and checked for integrity (no pixels decoded)."""
    if isinstance(value, PILImage.Image):
        return value
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        name = value.get("path") or "embedded bytes"
        source = io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]
    elif isinstance(value, (str, os.PathLike)):
        name, source = str(value), value
    else:
        raise ValueError(f"Task {task!r}: row {row} of the image column holds {type(value).__name__}, not an image.")
    try:
        image = PILImage.open(source)
        if load:
            image.load()
        else:
            image.verify()
    except (OSError, SyntaxError, ValueError, PILImage.DecompressionBombError) as error:
        raise ValueError(f"Task {task!r}: the image at row {row} ({name}) cannot be read: {error}.") from None
    return image


def check_images(dataset, column: str, task: str) -> None:
    """Every image of the column opens and passes the format's integrity check (a truncated PNG fails here, before
    any model is loaded, rather than in the middle of a run)."""
    for row, value in enumerate(dataset[column]):
        open_image(value, task, row, load=False)


def to_rgb(image: PILImage.Image) -> PILImage.Image:
    """8-bit RGB for the image processor, keeping the contrast of 16-bit and float images: PIL's own conversion
    saturates 16-bit values at 255 and truncates floats in [0, 1] to 0."""
    if image.mode.startswith("I;16") or image.mode == "I":
        pixels = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or pixels.max(initial=0) > 255:
            pixels = pixels / 257.0  # 0..65535 onto 0..255
        return PILImage.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        pixels = np.nan_to_num(np.asarray(image, dtype=np.float64))
        if pixels.size and pixels.min() >= 0 and pixels.max() <= 1:
            pixels = pixels * 255  # a float image in [0, 1]; otherwise taken as 0..255
        return PILImage.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def pixel_values_of(
    values: list, rows: list[int], image_processor, task: str, corruption: Corruption | None = None
) -> torch.Tensor:
    """The image processor's `pixel_values` for stored images (`rows` name them in errors and seed their
    `corruption`, if any)."""
    images = [to_rgb(open_image(value, task, row)) for value, row in zip(values, rows, strict=True)]
    if corruption is not None:
        images = [corruption.apply(image, task, row) for image, row in zip(images, rows, strict=True)]
    return image_processor(images=images, return_tensors="pt")["pixel_values"]


def batch_indices(num_samples: int, batch_size: int, seed: int, task_index: int, step: int) -> list[int]:
    """The sample indices of one task's batch at `step`: full batches of a fresh seeded permutation every epoch.

    A pure function of its arguments, so a resumed run draws exactly the batches an uninterrupted run would.
    """
    batches_per_epoch = num_samples // batch_size
    epoch, position = divmod(step, batches_per_epoch)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + task_index * 10_007 + epoch)
    permutation = torch.randperm(num_samples, generator=generator)
    return permutation[position * batch_size : (position + 1) * batch_size].tolist()
