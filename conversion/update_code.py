"""Replacing a WEMoE artifact's model code with this release's; its weights stay as they are. The library behind
`wemoe-update-code` (`wemoe.cli.update_code`).

An artifact carries its modeling code, and is loaded by whatever transformers its users have. Code published by an
older release can stop working with a newer transformers (0.1.0's T5 code generates wrongly with the KV cache on
transformers 5.24). This rewrites the code files and the `auto_map` of `config.json`, in a local directory or in a
Hub repo, and never touches a weight file. The artifact format is unchanged, so weights saved by any release load.
"""

import importlib.metadata
import inspect
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, snapshot_download
from transformers.dynamic_module_utils import get_relative_import_files

from modeling_wemoe import WEMoEConfig
from modeling_wemoe.modeling_wemoe import model_class_for

from .checkpoints import naming_load_errors
from .outputs import write_file_atomically

logger = logging.getLogger(__name__)

# Every code file a release has shipped in artifacts: files of this kind that the current code does not need are
# removed, so that nothing stale is left to import.
CODE_FILE_PATTERNS = ("configuration_wemoe.py", "modeling_wemoe*.py", "pipeline_wemoe*.py")



def code_files_for(config: WEMoEConfig) -> list[Path]:
    """The files an artifact of this config needs: its model class's module, everything that imports relatively,
    and the configuration."""
    model_file = Path(inspect.getfile(model_class_for(config)))
    files = {model_file, Path(inspect.getfile(WEMoEConfig))}
    files.update(Path(name) for name in get_relative_import_files(model_file))
    return sorted(files)


def refreshed_config(config_dict: dict, config: WEMoEConfig) -> dict:
    """`config.json` with `auto_map` (and the custom pipelines) naming this release's classes."""
    model_class = model_class_for(config)
    model_name = f"{Path(inspect.getfile(model_class)).stem}.{model_class.__name__}"
    config_dict = dict(config_dict)
    config_dict["auto_map"] = {
        "AutoConfig": f"{Path(inspect.getfile(WEMoEConfig)).stem}.{WEMoEConfig.__name__}",
        "AutoModel": model_name,
        model_class._auto_class: model_name,
    }
    config_dict.pop("custom_pipelines", None)
    if model_class.artifact_pipelines:
        config_dict["custom_pipelines"] = model_class.artifact_pipelines
    return config_dict


def update_code_in_directory(directory: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Rewrite the code files and `auto_map` of the artifact in `directory`; returns the files written and the
    stale code files removed (names)."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{str(directory)!r} has no config.json: not a model artifact.")
    with naming_load_errors(directory, "The artifact"):
        config_dict = json.loads(config_path.read_text())
        if config_dict.get("model_type") != WEMoEConfig.model_type:
            raise ValueError(
                f"{str(config_path)!r} is a {config_dict.get('model_type')!r} model, not a WEMoE artifact; only WEMoE "
                "artifacts carry WEMoE code."
            )
        config = WEMoEConfig.from_dict(config_dict)
    files = code_files_for(config)
    for file in files:
        write_file_atomically(directory / file.name, file.read_bytes())
    written = [file.name for file in files]
    stale = sorted(
        {path.name for pattern in CODE_FILE_PATTERNS for path in directory.glob(pattern)} - set(written)
    )
    for name in stale:
        (directory / name).unlink()
    write_file_atomically(config_path, (json.dumps(refreshed_config(config_dict, config), indent=2) + "\n").encode())
    logger.info("Updated %s: wrote %s and config.json, removed %s", directory, written, stale or "nothing")
    return [*written, "config.json"], stale


def release_version() -> str:
    try:
        return importlib.metadata.version("wemoe")
    except importlib.metadata.PackageNotFoundError:
        return "unreleased"


def push_code(directory: Path, repo_id: str, written: list[str], stale: list[str]) -> str:
    """One commit to `repo_id` with the new code files and config.json, deleting stale code files."""
    commit = HfApi().upload_folder(
        folder_path=directory,
        repo_id=repo_id,
        repo_type="model",
        allow_patterns=written,
        delete_patterns=stale or None,
        commit_message=f"Update WEMoE model code to wemoe {release_version()}",
    )
    logger.info("Pushed the updated code of %s to %s", directory, repo_id)
    return commit.commit_url


def update_code(artifact: str | os.PathLike, push_to_hub: str | None = None) -> str:
    """Update the code of a local artifact directory (then upload it to `push_to_hub` if given), or of a Hub repo
    (only its config.json and code files are downloaded, and one commit writes them back). Returns where."""
    if Path(artifact).is_dir():
        written, stale = update_code_in_directory(artifact)
        if push_to_hub:
            return push_code(Path(artifact), push_to_hub, written, stale)
        return str(artifact)
    with tempfile.TemporaryDirectory(prefix="wemoe-update-code-") as workspace:
        try:
            snapshot_download(str(artifact), allow_patterns=["config.json", "*.py"], local_dir=workspace)
        except Exception as error:  # huggingface_hub raises many types: offline, not found, gated, network
            raise ValueError(
                f"{str(artifact)!r} is not a local directory and could not be fetched from the Hub ({error})."
            ) from error
        shutil.rmtree(Path(workspace) / ".cache", ignore_errors=True)
        written, stale = update_code_in_directory(workspace)
        return push_code(Path(workspace), push_to_hub or str(artifact), written, stale)
