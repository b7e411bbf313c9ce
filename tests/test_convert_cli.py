"""`wemoe-convert`'s options around a conversion: `--dry-run` (the same checks from metadata alone, and a plan),
`--list-methods`, the wording of its errors, its verbosity flags, and every command's `--help` description."""

import copy
import json
import logging
import re
import struct
from pathlib import Path

import pytest
import yaml
from peft import LoraConfig, get_peft_model
from test_bert import lora_bert_expert
from test_checkpoints import lora_expert
from test_convert import BAD_RECIPES, write_recipe
from toy_bert import TASK_LABELS, build_toy_bert_base, build_toy_bert_expert, toy_bert_tokenizer
from toy_t5 import build_toy_t5_base, build_toy_t5_expert, toy_t5_tokenizer

from wemoe import convert
from wemoe.cli.convert import main
from wemoe.convert import plan_conversion
from wemoe.merge_methods import STATIC_MERGE_METHODS
from wemoe.recipe import STATIC_MERGE_SPECS

CONVERTING_GUIDE = Path(__file__).parent.parent / "docs" / "converting.md"


def stored_tensor_bytes(directory: Path) -> int:
    """The bytes of tensor data in a directory's safetensors files, from their headers."""
    total = 0
    for file in directory.glob("*.safetensors"):
        with open(file, "rb") as handle:
            header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
        header.pop("__metadata__", None)
        total += sum(end - start for start, end in (entry["data_offsets"] for entry in header.values()))
    return total


def fails_with(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code != 0
    return capsys.readouterr().err


# --dry-run ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_dry_run_refuses_what_the_conversion_refuses_with_the_same_message(
    recipe, saved_checkpoints, tmp_path, capsys, case
):
    break_recipe, message = BAD_RECIPES[case]
    break_recipe(recipe, tmp_path, saved_checkpoints)
    assert re.search(message, fails_with(capsys, ["--dry-run", write_recipe(recipe, tmp_path)])), case


@pytest.fixture
def no_tensor_data(monkeypatch):
    """Any read of tensor data fails: a safetensors tensor, a model's weights, an adapter's weights."""
    import peft.utils
    from transformers import PreTrainedModel

    import wemoe.checkpoints as checkpoints

    real_safe_open = checkpoints.safe_open

    class HeaderOnly:
        def __init__(self, *args, **kwargs):
            self.handle = real_safe_open(*args, **kwargs)

        def __enter__(self):
            self.opened = self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def keys(self):
            return self.opened.keys()

        def get_slice(self, key):
            return self.opened.get_slice(key)

        def get_tensor(self, key):
            raise AssertionError(f"read tensor {key}")

    def refuse(*args, **kwargs):
        raise AssertionError("loaded weights")

    monkeypatch.setattr(checkpoints, "safe_open", HeaderOnly)
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(peft.utils, "load_peft_weights", refuse)


def test_dry_run_reads_only_metadata_prints_the_plan_and_writes_nothing(
    base, recipe, tmp_path, capsys, no_tensor_data
):
    lora, _ = lora_expert(base, rslora=False)
    lora.save_pretrained(tmp_path / "adapter")
    recipe["tasks"][1]["model"] = str(tmp_path / "adapter")
    recipe["tasks"][2] = {"name": "scenes", "model": recipe["tasks"][2]["model"], "dataset": {"path": "x/scenes"}}
    recipe_file = write_recipe(recipe, tmp_path)
    before = sorted(tmp_path.rglob("*"))
    main(["--dry-run", recipe_file, str(tmp_path / "artifact")])
    printed = capsys.readouterr().out
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, not even a lock or a staging directory
    assert "Base model: " in printed and "(CLIP, " in printed
    assert "shapes: " in printed and "full fine-tune (1 safetensors file); 3 classes, listed" in printed
    assert "PEFT LoRA adapter (rank 2/4 on 8 weights)" in printed
    assert "classes from dataset 'x/scenes' (test), read when converting" in printed
    assert re.search(r"Artifact: WEMoEForImageClassification, weights about [\d.]+ KiB in float32", printed)
    assert re.search(r"Peak memory: about [\d.]+ KiB above the Python process itself \(base model", printed)
    assert f"Output: {tmp_path / 'artifact'} (can be written)" in printed


def test_output_dir_is_optional_only_with_dry_run(recipe, tmp_path, capsys):
    assert "output_dir (optional only with --dry-run)" in fails_with(capsys, [write_recipe(recipe, tmp_path)])
    (tmp_path / "artifact").mkdir()
    error = fails_with(capsys, ["--dry-run", write_recipe(recipe, tmp_path), str(tmp_path / "artifact")])
    assert "already exists" in error  # checked, as the conversion would


CLIP_OPTIONS = {
    "wemoe": {"variant": "wemoe"},
    "e-wemoe": {"variant": "e-wemoe", "keep": 0.3},
    "lowrank-top-k": {"variant": "e-wemoe", "expert_format": "lowrank", "rank": 3, "router": {"top_k": 2}},
    "static-ties": {"variant": "static", "static_merge": {"method": "ties"}},
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("options", sorted(CLIP_OPTIONS))
def test_dry_run_artifact_size_is_the_written_weights(recipe, tmp_path, options, dtype):
    recipe |= CLIP_OPTIONS[options]
    plan = plan_conversion(recipe, dtype=dtype)
    assert plan.artifact_bytes == stored_tensor_bytes(convert(recipe, tmp_path / "artifact", dtype=dtype))


def t5_or_bert_recipe(architecture: str, tmp_path: Path, tied: bool = False) -> dict:
    """Two full fine-tunes and a LoRA adapter of a toy T5 or BERT, saved with their base."""
    if architecture == "t5":
        base, tokenizer = build_toy_t5_base(seed=0, tied=tied), toy_t5_tokenizer()
        experts = {task: build_toy_t5_expert(base, seed=i + 1) for i, task in enumerate(["sst2", "topic"])}
        adapter = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["wo"]))
        labels = ["yes", "no"]
    else:
        base, tokenizer = build_toy_bert_base(seed=0), toy_bert_tokenizer()
        experts = {task: build_toy_bert_expert(base, task, seed=i + 1) for i, task in enumerate(["sentiment", "topic"])}
        adapter, _ = lora_bert_expert(base, "formality", seed=3)
        labels = TASK_LABELS["formality"]
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    for task, expert in experts.items():
        expert.save_pretrained(tmp_path / task)
    adapter.save_pretrained(tmp_path / "adapter")
    tasks = [{"name": task, "model": str(tmp_path / task)} for task in experts]
    tasks.append({"name": "lora", "model": str(tmp_path / "adapter"), "classnames": labels})
    return {"base_model": str(tmp_path / "base"), "architecture": architecture, "tasks": tasks}


@pytest.mark.parametrize(
    ("architecture", "tied"), [("t5", False), ("t5", True), ("bert", False)], ids=["flan-t5", "t5-tied", "bert"]
)
def test_dry_run_of_t5_and_bert_plans_what_is_written(architecture, tied, tmp_path):
    # The T5 base decides whether lm_head is tied: the dry run must build it so, from metadata alone.
    recipe = t5_or_bert_recipe(architecture, tmp_path, tied)
    plan = plan_conversion(recipe)
    assert plan.artifact_bytes == stored_tensor_bytes(convert(recipe, tmp_path / "artifact"))
    assert re.fullmatch(r"PEFT LoRA adapter \(rank \d on \d+ weights\)", plan.experts["lora"][1])


def test_dry_run_of_hub_ids_downloads_no_weights(saved_checkpoints, classnames, tmp_path, monkeypatch):
    """Hub checkpoints: their configs and tokenizer files are downloaded, their safetensors headers read remotely."""
    from safetensors import safe_open

    import wemoe.checkpoints as checkpoints

    repos = {f"org/{name}": Path(path) for name, path in saved_checkpoints.items()}
    downloads = []

    def snapshot_download(repo_id, allow_patterns, dry_run=False):
        if dry_run:
            files = sorted(repos[repo_id].glob("*.safetensors"))
            return [type("File", (), {"filename": file.name, "commit_hash": "abc"}) for file in files]
        downloads.append(allow_patterns)
        snapshot = tmp_path / "hub" / repo_id
        snapshot.mkdir(parents=True, exist_ok=True)
        for file in repos[repo_id].iterdir():
            if file.suffix in (".json", ".txt"):
                (snapshot / file.name).write_bytes(file.read_bytes())
        return str(snapshot)

    class HfApi:
        def parse_safetensors_file_metadata(self, repo_id, filename, revision):
            assert revision == "abc"
            with safe_open(str(repos[repo_id] / filename), framework="pt") as handle:
                tensors = {key: type("Info", (), {"shape": handle.get_slice(key).get_shape()}) for key in handle.keys()}
            return type("Metadata", (), {"tensors": tensors})

    monkeypatch.setattr(checkpoints, "snapshot_download", snapshot_download)
    monkeypatch.setattr(checkpoints, "HfApi", HfApi)
    recipe = {
        "base_model": "org/base",
        "tasks": [{"name": task, "model": f"org/{task}", "classnames": names} for task, names in classnames.items()],
    }
    plan = plan_conversion(recipe)
    assert downloads and all(patterns == ["*.json", "*.txt"] for patterns in downloads)
    local = {"base_model": saved_checkpoints["base"]} | {
        "tasks": [{"name": task, "model": saved_checkpoints[task], "classnames": names}
                  for task, names in classnames.items()]
    }
    assert plan.artifact_bytes == plan_conversion(local).artifact_bytes
    assert plan.experts["shapes"][:2] == ("org/shapes", "full fine-tune (1 safetensors file)")


# --list-methods -------------------------------------------------------------------------------------------------


def test_list_methods_shows_every_method_with_its_parameters_and_the_converting_guide_lists_them(capsys):
    main(["--list-methods"])
    listed = capsys.readouterr().out
    guide = CONVERTING_GUIDE.read_text()
    for spec in STATIC_MERGE_SPECS:
        name = spec.model_fields["method"].annotation.__args__[0]
        assert re.search(rf"^  {name}: \S.*\.", listed, re.MULTILINE), name
        assert f"`{name}`" in guide, name
        for field in spec.model_fields.keys() - {"method"}:
            assert re.search(rf"^  {name}: .*\n(      .*\n)*      {field} \(", listed, re.MULTILINE), (name, field)
    assert "      density (float, > 0, < 1, default 0.5)" in listed  # bounds and defaults from the schema
    assert "(https://arxiv.org/abs/2311.03099)" in listed
    assert set(STATIC_MERGE_METHODS) < {spec.model_fields["method"].annotation.__args__[0] for spec in
                                         STATIC_MERGE_SPECS}


# Errors name the flag ---------------------------------------------------------------------------------------------


def test_an_existing_output_is_named_by_the_flag_on_the_command_line_and_by_the_argument_in_python(
    recipe, tmp_path, capsys
):
    (tmp_path / "artifact").mkdir()
    error = fails_with(capsys, [write_recipe(recipe, tmp_path), str(tmp_path / "artifact")])
    assert "already exists; pass --overwrite to replace it." in error and "overwrite=True" not in error
    with pytest.raises(ValueError, match=r"already exists; pass overwrite=True to replace it\.$") as error_info:
        convert(recipe, tmp_path / "artifact")
    assert "--overwrite" not in str(error_info.value)


def test_wemoe_tta_names_its_flag_too(tmp_path, capsys):
    from wemoe.cli.tta import main as tta_main

    (tmp_path / "adapted").mkdir()
    data = tmp_path / "data.yaml"
    data.write_text(yaml.safe_dump({"tasks": {"a": {"path": "parquet", "data_files": "a.parquet"}}}))
    with pytest.raises(SystemExit):
        tta_main([str(tmp_path / "model"), str(data), "--output", str(tmp_path / "adapted")])
    error = capsys.readouterr().err
    assert "already exists; pass --overwrite to replace it." in error and "overwrite=True" not in error


# Verbosity --------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def restore_log_levels():
    """The commands set logger levels for the process: put them back after each test."""
    loggers = [logging.getLogger(), logging.getLogger("wemoe")]
    levels = [logger.level for logger in loggers]
    yield
    for logger, level in zip(loggers, levels, strict=True):
        logger.setLevel(level)


@pytest.mark.parametrize(
    ("flags", "debug", "info"), [([], False, True), (["-v"], True, True), (["-q"], False, False)]
)
def test_verbosity_flags_change_what_is_logged(recipe, tmp_path, caplog, flags, debug, info):
    caplog.set_level(logging.NOTSET)  # capture whatever the command lets through
    main([*flags, write_recipe(recipe, tmp_path), str(tmp_path / "artifact")])
    records = [record for record in caplog.records if record.name.startswith("wemoe")]
    assert any(r.levelno == logging.DEBUG and "full fine-tune" in r.getMessage() for r in records) == debug
    assert any(r.levelno == logging.INFO and "Merging 3 CLIP experts" in r.getMessage() for r in records) == info


# --help -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["convert", "tta", "evaluate", "demo", "update_code"])
def test_every_command_describes_itself_in_a_full_sentence(command, capsys):
    module = __import__(f"wemoe.cli.{command}", fromlist=["parse_args"])
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    help_text = capsys.readouterr().out
    description = help_text.split("\n\n")[1]
    assert re.fullmatch(r"[A-Z][^`]*\.", " ".join(description.split())), description
    if command != "update_code":  # it keeps its own -v (files written and removed)
        assert "-q, --quiet" in help_text and "-v, --verbose" in help_text

