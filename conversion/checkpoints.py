"""Reading base models and fine-tuned experts, and checking up front that they can be merged.

An expert is read as a `TensorSource`: a mapping from merge key (what the family's `Backbone.key_of` makes of a
checkpoint key, e.g. CLIP's vision-tower key `encoder.layers.0.mlp.fc1.weight` in either key layout) to the
fine-tuned tensor, whose shapes are known before any tensor is read. The family's plug-in (`wemoe.backbones`)
says how its checkpoints are laid out; nothing here knows a family. Checkpoint directories are read lazily, one
tensor at a time (safetensors through `safe_open`, `.bin` memory-mapped), so a merge holds one tensor per expert at a
time rather than every expert model. Every problem is reported with the task, the file or tensor, and what was
expected.

Under `metadata_only()` (`wemoe-convert --dry-run`) the same code opens checkpoints without reading any weights:
configs and safetensors headers only, a Hub repo's headers read remotely, the base model built on the meta device.
"""

import json
import logging
import math
import os
import pickle
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Protocol

import torch
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoConfig,
    AutoTokenizer,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from modeling_wemoe.modeling_wemoe import damaged_weight_files

logger = logging.getLogger(__name__)


ModelSource = PreTrainedModel | str | os.PathLike

PEFT_ADAPTER_CONFIG = "adapter_config.json"
METADATA_PATTERNS = ["*.json", "*.txt"]  # configs, shard indexes, tokenizer files
CHECKPOINT_PATTERNS = [*METADATA_PATTERNS, "*.safetensors"]

# None when checkpoints are read in full. Under `metadata_only()`: the tensor shapes of Hub safetensors files, read
# from their remote headers, by the path each file would have in its (JSON-only) local snapshot.
_remote_headers: ContextVar[dict[Path, dict[str, torch.Size]] | None] = ContextVar("remote_headers", default=None)


@contextmanager
def metadata_only() -> Iterator[None]:
    """Open checkpoints for their metadata only: configs and tensor shapes, never tensor data. Tensor sources know
    their shapes but hold no tensors, adapters' tensors are meta tensors, and `load_base_model` builds the base on the
    meta device; a Hub repo's JSON files are downloaded and its safetensors headers read remotely."""
    token = _remote_headers.set({})
    try:
        yield
    finally:
        _remote_headers.reset(token)


def reading_metadata_only() -> bool:
    return _remote_headers.get() is not None


def is_weight_file(path: Path) -> bool:
    """Whether a weight file is there: on disk, or on the Hub for a snapshot opened under `metadata_only()`."""
    return path.is_file() or path in (_remote_headers.get() or {})


def safetensors_shapes(path: Path) -> dict[str, torch.Size]:
    """The tensor shapes a safetensors file holds, from its header alone."""
    remote = _remote_headers.get() or {}
    if path in remote:
        return remote[path]
    with safe_open(str(path), framework="pt") as handle:
        return {key: torch.Size(handle.get_slice(key).get_shape()) for key in handle.keys()}


def damaged_files(directory: Path) -> list[str]:
    """What is broken in a checkpoint directory, file by file, in words: safetensors files whose header cannot be read
    (truncated or corrupt) and JSON files that do not parse."""
    problems = damaged_weight_files(directory)
    for file in sorted(directory.glob("*.json")):
        try:
            json.loads(file.read_text())
        except (ValueError, UnicodeDecodeError) as error:
            problems.append(f"{str(file)!r} is not valid JSON ({error})")
    return problems


@contextmanager
def naming_load_errors(source: "ModelSource", what: str) -> Iterator[None]:
    """Turn what safetensors, json and huggingface_hub raise for a damaged checkpoint, which names no file, into one
    `ValueError` that names it: a truncated or corrupt weights file, a JSON file that does not parse, a config.json
    whose values its config class refuses. `what` says what `source` is (`"base_model"`, `"The artifact"`)."""
    try:
        yield
    except (SafetensorError, json.JSONDecodeError) as error:
        local = isinstance(source, (str, os.PathLike)) and Path(source).is_dir()
        problems = damaged_files(Path(source)) if local else []
        found = "; ".join(problems) or f"a file cannot be read ({error})"
        raise ValueError(f"{what} {str(source)!r}: {found}.") from None
    except StrictDataclassError as error:
        raise ValueError(f"{what} {str(source)!r}: its config.json is refused: {error.__cause__ or error}") from None


def hub_metadata_snapshot(repo_id: str) -> Path:
    """A Hub repo opened without its weights: its configs and tokenizer files downloaded, its safetensors headers
    read remotely (for `safetensors_shapes`). A repo with `.bin` weights only has them downloaded: a pickle has no
    header to read."""
    directory = Path(snapshot_download(repo_id, allow_patterns=METADATA_PATTERNS))
    weight_files = snapshot_download(repo_id, allow_patterns=["*.safetensors"], dry_run=True)
    if not weight_files:
        return Path(snapshot_download(repo_id, allow_patterns=[*METADATA_PATTERNS, "*.bin"]))
    api = HfApi()
    for file in weight_files:
        header = api.parse_safetensors_file_metadata(repo_id, file.filename, revision=file.commit_hash)
        shapes = {name: torch.Size(info.shape) for name, info in header.tensors.items()}
        _remote_headers.get()[directory / file.filename] = shapes
    return directory


class TensorSource(Mapping[str, torch.Tensor]):
    """Vision-tower tensors of one model, by key; `shapes` is known without reading any tensor."""

    owner: str
    shapes: dict[str, torch.Size]
    # Tensor entries held in memory for the whole merge, beyond the one tensor of each expert read at a time.
    held_numel: int = 0

    def describe(self) -> str:
        """What the tensors come from, for a conversion plan (`wemoe-convert --dry-run`)."""
        return "a model in memory"

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


class InMemoryTensors(TensorSource):
    def __init__(self, state_dict: Mapping[str, torch.Tensor], owner: str):
        self.owner = owner
        self._state_dict = state_dict
        self.shapes = {key: tensor.shape for key, tensor in state_dict.items()}

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._state_dict[key]


class CheckpointLayout(Protocol):
    """How a family's checkpoints are read and compared (`wemoe.backbones.Backbone` provides it)."""

    display_name: str
    architecture_fields: tuple[str, ...]
    tensor_hints: Mapping[str, str]

    def key_of(self, checkpoint_key: str) -> str | None: ...

    def config_of(self, config: PreTrainedConfig) -> PreTrainedConfig | None: ...

    def model_tensors(self, model: PreTrainedModel) -> tuple[Mapping[str, torch.Tensor], PreTrainedConfig] | None: ...


class CheckpointTensors(TensorSource):
    """The tensors of a full fine-tune saved as safetensors (single or sharded) or `.bin` whose keys `key_of` maps
    to a merge key (`what` names them in errors: "CLIP backbone")."""

    def __init__(self, directory: Path, owner: str, key_of: Callable[[str], str | None], what: str):
        self.owner = owner
        self.directory = directory
        self._bin_state_dicts: dict[Path, dict[str, torch.Tensor]] = {}  # memory-mapped by torch.load
        self._location: dict[str, tuple[Path, str]] = {}
        self.shapes = {}
        for file in checkpoint_files(directory, owner):
            for checkpoint_key, shape in self._read_header(file).items():
                key = key_of(checkpoint_key)
                if key is not None:
                    self._location[key] = (file, checkpoint_key)
                    self.shapes[key] = shape
        if not self.shapes:
            raise ValueError(f"{owner}: no {what} tensors found in {str(directory)!r}.")

    def describe(self) -> str:
        files = {file for file, _ in self._location.values()}
        kinds = sorted({"safetensors" if file.suffix == ".safetensors" else ".bin" for file in files})
        return f"full fine-tune ({len(files)} {'/'.join(kinds)} file{'s' if len(files) > 1 else ''})"

    def _read_header(self, file: Path) -> dict[str, torch.Size]:
        try:
            if file.suffix == ".safetensors":
                return safetensors_shapes(file)
            state_dict = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        except (SafetensorError, RuntimeError, OSError, EOFError, pickle.UnpicklingError) as error:
            # An unsafe pickle (arbitrary code) is refused by `weights_only` as an UnpicklingError.
            raise ValueError(f"{self.owner}: cannot read checkpoint file {str(file)!r} ({error}).") from error
        self._bin_state_dicts[file] = state_dict
        return {key: tensor.shape for key, tensor in state_dict.items()}

    def __getitem__(self, key: str) -> torch.Tensor:
        file, checkpoint_key = self._location[key]
        if file.suffix != ".safetensors":
            return self._bin_state_dicts[file][checkpoint_key]
        try:
            # Opened per read so the file's pages are unmapped again: a mapping held open for every expert would
            # keep all of them resident, which is the memory streaming is meant to save.
            with safe_open(str(file), framework="pt") as handle:
                return handle.get_tensor(checkpoint_key)
        except SafetensorError as error:
            raise ValueError(
                f"{self.owner}: cannot read tensor {checkpoint_key!r} from {str(file)!r} ({error})."
            ) from error


def checkpoint_files(directory: Path, owner: str) -> list[Path]:
    """The weight files of a checkpoint directory, preferring safetensors over `.bin`, following shard indexes."""
    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if is_weight_file(directory / single):
            return [directory / single]
        if (directory / index).is_file():
            weight_map = json.loads((directory / index).read_text())["weight_map"]
            return [directory / name for name in sorted(set(weight_map.values()))]
    raise ValueError(
        f"{owner}: {str(directory)!r} holds no model.safetensors, pytorch_model.bin or shard index "
        f"(and no {PEFT_ADAPTER_CONFIG} for a LoRA adapter)."
    )


class LoraExpertTensors(TensorSource):
    """A PEFT LoRA adapter read as the fine-tuned tensors it stands for: W0 + scale * B @ A for adapted weights,
    the saved value for fully trained tensors (`bias`, `modules_to_save`), W0 elsewhere. Keys are the merge keys
    `key_of` gives (`what` names them in messages)."""

    def __init__(
        self,
        directory: str | os.PathLike,
        base: TensorSource,
        owner: str,
        key_of: Callable[[str], str | None],
        what: str,
    ):
        from peft import PeftConfig, PeftType

        self.owner = owner
        self.directory = Path(directory)
        self.base = base
        self.key_of = key_of
        self.what = what
        self.shapes = dict(base.shapes)
        config = PeftConfig.from_pretrained(str(directory))
        if config.peft_type != PeftType.LORA:
            raise ValueError(
                f"{owner}: {str(directory)!r} is a {config.peft_type.value} adapter; only LoRA is supported."
            )
        unsupported = {
            "use_dora": "DoRA (weight-decomposed LoRA) is not supported: its update is not a fixed task vector",
            "fan_in_fan_out": "fan_in_fan_out (Conv1D layers) is not supported",
            "lora_bias": "lora_bias is not supported",
        }
        for field, reason in unsupported.items():
            if getattr(config, field, False):
                raise ValueError(f"{owner}: adapter {str(directory)!r} sets {field}: {reason}.")
        self.config = config
        self._deltas: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self._replaced: dict[str, torch.Tensor] = {}
        self._read_adapter(adapter_weights(self.directory), directory)
        factors = [tensor for pair in self._deltas.values() for tensor in pair[:2]]
        self.held_numel = sum(tensor.numel() for tensor in [*factors, *self._replaced.values()])

    def describe(self) -> str:
        ranks = "/".join(str(rank) for rank in sorted({lora_a.shape[0] for _, lora_a, _ in self._deltas.values()}))
        trained = f", {len(self._replaced)} tensors trained fully" if self._replaced else ""
        return f"PEFT LoRA adapter (rank {ranks} on {len(self._deltas)} weights{trained})"

    def _read_adapter(self, weights: dict[str, torch.Tensor], directory) -> None:
        from peft.utils.other import get_pattern_key

        factors: dict[str, dict[str, torch.Tensor]] = {}
        for saved_key, tensor in weights.items():
            model_key = saved_key.removeprefix("base_model.model.")
            for part in ("lora_A", "lora_B"):
                if f".{part}." in model_key:
                    module, _, _ = model_key.partition(f".{part}.")
                    factors.setdefault(module, {})[part] = tensor
                    break
            else:
                key = self.key_of(model_key)
                if key is None:
                    logger.debug("%s: adapter tensor %r is not a %s tensor.", self.owner, saved_key, self.what)
                    continue
                self._check_shape(key, tensor.shape, saved_key)
                self._replaced[key] = tensor
        for module, pair in factors.items():
            key = self.key_of(f"{module}.weight")
            if key is None:
                logger.debug("%s: LoRA on %r is not on a %s tensor.", self.owner, module, self.what)
                continue
            if set(pair) != {"lora_A", "lora_B"}:
                raise ValueError(
                    f"{self.owner}: adapter {str(directory)!r} has an incomplete LoRA pair for {module!r}."
                )
            lora_a, lora_b = pair["lora_A"], pair["lora_B"]
            if lora_a.dim() != 2:
                raise ValueError(
                    f"{self.owner}: LoRA on {module!r} is not on a Linear layer; only Linear LoRA is supported."
                )
            rank_key = get_pattern_key(self.config.rank_pattern.keys(), module)
            alpha_key = get_pattern_key(self.config.alpha_pattern.keys(), module)
            rank = self.config.rank_pattern.get(rank_key, self.config.r)
            alpha = self.config.alpha_pattern.get(alpha_key, self.config.lora_alpha)
            if lora_a.shape[0] != rank:
                raise ValueError(
                    f"{self.owner}: LoRA on {module!r} has rank {lora_a.shape[0]}, its config says {rank}."
                )
            self._check_shape(key, torch.Size((lora_b.shape[0], lora_a.shape[1])), module)
            scale = alpha / math.sqrt(rank) if self.config.use_rslora else alpha / rank
            self._deltas[key] = (lora_b, lora_a, scale)

    def _check_shape(self, key: str, shape: torch.Size, saved_as: str) -> None:
        if key not in self.base.shapes:
            raise ValueError(
                f"{self.owner}: adapter tensor {saved_as!r} targets {key!r}, which the base model does not have."
            )
        if shape != self.base.shapes[key]:
            raise ValueError(
                f"{self.owner}: adapter tensor {saved_as!r} implies shape {tuple(shape)} for {key!r}, "
                f"the base model's is {tuple(self.base.shapes[key])}."
            )

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self._replaced:
            return self._replaced[key]
        pretrained = self.base[key]
        if key not in self._deltas:
            return pretrained
        lora_b, lora_a, scale = self._deltas[key]
        return pretrained + scale * (lora_b.float() @ lora_a.float()).to(pretrained.dtype)


def adapter_weights(directory: Path) -> dict[str, torch.Tensor]:
    """A PEFT adapter's saved tensors; under `metadata_only()`, meta tensors of their shapes."""
    from peft.utils import load_peft_weights
    from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

    if not reading_metadata_only():
        return load_peft_weights(str(directory))
    if is_weight_file(directory / SAFETENSORS_WEIGHTS_NAME):
        shapes = safetensors_shapes(directory / SAFETENSORS_WEIGHTS_NAME)
        return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    return torch.load(directory / WEIGHTS_NAME, map_location="meta", weights_only=True)


def resolve_checkpoint_dir(name_or_path: str | os.PathLike, owner: str) -> Path:
    """A local directory as is; anything else as a Hub repo id, downloaded (weights as safetensors when the repo has
    them, else `.bin`; under `metadata_only()`, without them where their headers can be read remotely)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    try:
        if reading_metadata_only():
            return hub_metadata_snapshot(str(name_or_path))
        directory = Path(snapshot_download(str(name_or_path), allow_patterns=CHECKPOINT_PATTERNS))
        if not any(directory.glob("*.safetensors")) and not (directory / PEFT_ADAPTER_CONFIG).exists():
            directory = Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.bin"]))
    except Exception as error:  # huggingface_hub raises many types: offline, not found, gated, network
        raise ValueError(
            f"{owner}: {str(name_or_path)!r} is not a local directory and could not be fetched from the Hub ({error})."
        ) from error
    return directory


def read_backbone_config(directory: Path, owner: str, layout: CheckpointLayout) -> PreTrainedConfig:
    if not (directory / "config.json").is_file():
        raise ValueError(f"{owner}: {str(directory)!r} has no config.json.")
    with naming_load_errors(directory, owner):
        config = AutoConfig.from_pretrained(directory)
    backbone_config = layout.config_of(config)
    if backbone_config is None:
        raise ValueError(
            f"{owner}: {str(directory)!r} is a {config.model_type!r} checkpoint; expected a "
            f"{layout.display_name} model."
        )
    return backbone_config


def load_base_model(source: ModelSource, model_class: type[PreTrainedModel], what: str) -> PreTrainedModel:
    """The base model as `model_class`, in memory, a local dir or a Hub id; `what` describes it in errors. Under
    `metadata_only()`, built on the meta device from its config (`meta_base_model`)."""
    if isinstance(source, model_class):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"The base model must be a {model_class.__name__} ({what}), a local directory or a Hub id, "
            f"got {type(source).__name__}."
        )
    if reading_metadata_only():
        return meta_base_model(resolve_checkpoint_dir(source, "base_model"), model_class, what)
    try:
        with naming_load_errors(source, "base_model"):
            model, loading_info = model_class.from_pretrained(source, output_loading_info=True)
    except OSError as error:  # missing path, unknown or unreachable Hub id, no weights
        raise ValueError(f"base_model {str(source)!r} cannot be loaded: {error}") from None
    # transformers 5 leaves tensors absent from a checkpoint uninitialised: that would be a silently wrong model.
    missing = sorted(loading_info.get("missing_keys", ()))
    if missing:
        raise ValueError(f"The base model checkpoint {str(source)!r} is missing tensors {missing}.")
    return model.eval()


def meta_base_model(directory: Path, model_class: type[PreTrainedModel], what: str) -> PreTrainedModel:
    """The base model as `from_pretrained` would build it, on the meta device, from its config and its weights'
    headers: an output embedding that the checkpoint saves apart from the input embedding (Flan-T5's `lm_head`) is
    untied, as transformers does for a separately saved one."""
    if not (directory / "config.json").is_file():
        raise ValueError(f"base_model: {str(directory)!r} has no config.json.")
    with naming_load_errors(directory, "base_model"):
        config = AutoConfig.from_pretrained(directory)
    if not isinstance(config, model_class.config_class):
        raise ValueError(
            f"base_model {str(directory)!r} is a {config.model_type!r} checkpoint; expected a "
            f"{model_class.__name__} ({what})."
        )
    with torch.device("meta"):
        model = model_class(config)
    output = model.get_output_embeddings()
    if output is not None and output.weight is model.get_input_embeddings().weight:
        name = next(name for name, module in model.named_modules() if module is output)
        if f"{name}.weight" in CheckpointTensors(directory, "base_model", lambda key: key, "model").shapes:
            output.weight = torch.nn.Parameter(torch.empty_like(output.weight))
    return model.eval()


def load_tokenizer(source: str | os.PathLike, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The base model's tokenizer, refused when it has no vocabulary: transformers 5 builds a tokenizer of special
    tokens only from a directory without tokenizer files, and every class name would then read the same."""
    try:
        with naming_load_errors(source, "base_model"):
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ValueError(f"base_model {str(source)!r}: cannot load its tokenizer ({error}).") from None
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        raise ValueError(
            f"base_model {str(source)!r} has no tokenizer files (its tokenizer knows only the special tokens "
            f"{tokenizer.all_special_tokens}); save the base model's tokenizer next to its weights."
        )
    return tokenizer


def open_expert(
    source: ModelSource, task: str, base: TensorSource, layout: CheckpointLayout
) -> tuple[TensorSource, PreTrainedConfig | None]:
    """An expert's tensors and its backbone config (None for a LoRA adapter, which has the base's architecture)."""
    owner = f"Expert {task!r}"
    if isinstance(source, PreTrainedModel):
        tensors = layout.model_tensors(source)
        if tensors is None:
            raise TypeError(f"{owner} must be a {layout.display_name} model, got {type(source).__name__}.")
        state_dict, config = tensors
        return InMemoryTensors(state_dict, owner), config
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"{owner} must be a {layout.display_name} model, a local directory or a Hub id, "
            f"got {type(source).__name__}."
        )
    directory = resolve_checkpoint_dir(source, owner)
    what = f"{layout.display_name} backbone"
    if (directory / PEFT_ADAPTER_CONFIG).is_file():
        tensors, config = LoraExpertTensors(directory, base, owner, layout.key_of, what), None
    else:
        tensors = CheckpointTensors(directory, owner, layout.key_of, what)
        config = read_backbone_config(directory, owner, layout)
    logger.debug("%s: %s in %s, %d %s tensors", owner, tensors.describe(), directory, len(tensors), what)
    return tensors, config


def check_same_architecture(
    base: PreTrainedConfig, expert: PreTrainedConfig, task: str, layout: CheckpointLayout
) -> None:
    differences = [
        f"{field}: base {getattr(base, field, None)!r}, expert {getattr(expert, field, None)!r}"
        for field in layout.architecture_fields
        if getattr(base, field, None) != getattr(expert, field, None)
    ]
    if differences:
        raise ValueError(f"Expert {task!r} does not share the base model's architecture: {'; '.join(differences)}.")


def check_matching_tensors(base: TensorSource, expert: TensorSource, layout: CheckpointLayout) -> None:
    where = f" checkpoint {str(expert.directory)!r}" if isinstance(expert, CheckpointTensors) else ""
    missing = sorted(base.shapes.keys() - expert.shapes.keys())
    extra = sorted(expert.shapes.keys() - base.shapes.keys())
    hints = "".join(f" {layout.tensor_hints[key]}" for key in missing + extra if key in layout.tensor_hints)
    if missing:
        raise ValueError(f"{expert.owner}{where} is missing tensors that the base model has: {missing}.{hints}")
    if extra:
        raise ValueError(f"{expert.owner}{where} has tensors that the base model does not: {extra}.{hints}")
    for key, shape in base.shapes.items():
        if expert.shapes[key] != shape:
            raise ValueError(
                f"Tensor {key!r} of {expert.owner}{where} has shape {tuple(expert.shapes[key])}, "
                f"the base model's has {tuple(shape)}."
            )


def check_finite(key: str, tensor: torch.Tensor, owner: str) -> None:
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise ValueError(f"{owner}: tensor {key!r} contains NaN or inf values.")
