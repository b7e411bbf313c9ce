"""The base of every YAML file the library reads (recipes, data configs, benchmark task files): strict pydantic
models whose problems are reported by key path (`tasks.1.classnames: ...`), and the dataset spec they share."""

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class RecipeError(ValueError):
    """A recipe, data config or other YAML spec that cannot be used; the message names every offending key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetSource(Strict):
    """A dataset as `datasets.load_dataset(path, config_name, data_dir=..., data_files=..., split=...)` and its label
    column (a ClassLabel gives class names)."""

    path: str
    config_name: str | None = None
    data_dir: str | None = None
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    split: str = "test"
    label_column: str = "label"


def format_validation_error(error: ValidationError, what: str) -> str:
    lines = []
    for problem in error.errors():
        parts = [str(part) for part in problem["loc"]]
        if parts[:1] == ["static_merge"] and len(parts) > 1:
            del parts[1]  # the union's tag (`ties`, ...) pydantic puts in the path
        location = ".".join(parts) or "(top)"
        lines.append(f"  {location}: {problem['msg']}")
    return f"Invalid {what}:\n" + "\n".join(lines)


def read_yaml(path: Path, name: str) -> Any:
    """A YAML file's content; a file that cannot be read or parsed is a `RecipeError` of one line naming it."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise RecipeError(f"Cannot read {name}: {error.strerror or error}.") from error
    except UnicodeDecodeError:
        raise RecipeError(f"The {name} is not a text file (it is not UTF-8); give a YAML file.") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(error, "problem", None) or " ".join(str(error).split())
        raise RecipeError(f"The {name} is not valid YAML: {problem}{where}.") from None


def load_validated(schema: type[BaseModel], value: Any, what: str) -> BaseModel:
    """`schema` validated from an instance, a mapping or a YAML file path; every problem named by its key path.
    `what` says what the value is in messages (e.g. "conversion recipe")."""
    if isinstance(value, schema):
        return value
    name = what
    if isinstance(value, (str, os.PathLike)):
        name = f"{what} {str(value)!r}"
        value = read_yaml(Path(value), name)
    if not isinstance(value, dict):
        raise RecipeError(f"The {name} must be a mapping of keys, got {type(value).__name__}.")
    try:
        return schema.model_validate(value)
    except ValidationError as error:
        raise RecipeError(format_validation_error(error, name)) from None


def dataset_paths(source: DatasetSource) -> list[str]:
    """The local files and directories a dataset spec reads."""
    files = source.data_files
    if isinstance(files, dict):
        files = [path for value in files.values() for path in ([value] if isinstance(value, str) else value)]
    elif isinstance(files, str):
        files = [files]
    paths = [source.path, source.data_dir, *(files or [])]
    return [path for path in paths if path and Path(path).expanduser().exists()]
