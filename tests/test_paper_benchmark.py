"""`benchmarks/paper.py` end to end, offline, on tiny stand-ins.

Every repository the two example recipes name (the CLIP base, its eight fine-tunes and their datasets; Flan-T5, its
eight GLUE fine-tunes and GLUE) is served from a local Hub cache under its real id, so the script runs its real code
path, `snapshot_download` included, with `HF_HUB_OFFLINE=1`: every stage, every row, both tables, then a second run
that finds everything cached."""

import hashlib
import json
import os
import string
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CLASSNAMES, write_image_dataset
from datasets import ClassLabel, Dataset, Features, Value, load_dataset
from paper import GLUE_PROMPTS, PUBLISHED
from toy_t5 import build_toy_t5_base, build_toy_t5_expert, toy_t5_tokenizer
from transformers import CLIPModel

from wemoe import default_image_processor
from wemoe.toy import TOY_CHARACTERS, build_toy_expert, toy_clip_config, toy_tokenizer

ROOT = Path(__file__).resolve().parent.parent
CLIP_RECIPE = yaml.safe_load((ROOT / "examples/clip-vit-b32-8task.yaml").read_text())
T5_RECIPE = yaml.safe_load((ROOT / "examples/flan-t5-base-glue.yaml").read_text())
ROWS = 9  # the pre-trained model, the fine-tunes, and seven merges


def publish(cache: Path, repo_id: str, repo_type: str, write: Callable[[Path], None]) -> None:
    """`repo_id` in the Hub cache's layout (refs/main -> snapshots/<commit>), its files written by `write`."""
    folder = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    write(snapshot)


def saved(*parts) -> Callable[[Path], None]:
    def write(directory: Path) -> None:
        for part in parts:
            part.save_pretrained(directory)

    return write


def publish_clip(cache: Path) -> None:
    # The recipe's templates hold quotes and colons: characters of their own, or the prompts would end there.
    tokenizer = toy_tokenizer(TOY_CHARACTERS + ':"')
    config = toy_clip_config()
    config.text_config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    base = CLIPModel(config).eval()
    image_processor = default_image_processor(base.config.vision_config)
    publish(cache, CLIP_RECIPE["base_model"], "model", saved(base, tokenizer, image_processor))
    class_sets = list(CLASSNAMES.values())
    for index, task in enumerate(CLIP_RECIPE["tasks"]):
        publish(cache, task["model"], "model", saved(build_toy_expert(base, seed=index + 1)))
        names = class_sets[index % len(class_sets)]

        def images(directory: Path, names=names, seed=index) -> None:
            (directory / "data").mkdir()
            write_image_dataset(directory / "data" / "test-00000-of-00001.parquet", names, size=6, seed=seed)

        publish(cache, task["dataset"]["path"], "dataset", images)


def glue_split(task: str, classes: int, seed: int) -> Dataset:
    """Six rows with the columns the task's prompt template reads, labelled as GLUE labels it."""
    columns = [field for _, field, _, _ in string.Formatter().parse(GLUE_PROMPTS[task][0]) if field]
    words = ["a good movie", "the ball", "i hate this", "a bad film", "really fun", "the code"]
    content = {column: words[seed % 3 :] + words[: seed % 3] for column in columns}
    if classes:
        label = ClassLabel(names=[f"class_{i}" for i in range(classes)])
        content["label"] = [i % classes for i in range(6)]
    else:
        label, content["label"] = Value("float32"), [0.5, 4.0, 2.5, 1.0, 3.0, 5.0]
    features = Features({**{column: Value("string") for column in columns}, "label": label})
    return Dataset.from_dict(content, features=features)


def publish_t5(cache: Path) -> None:
    label_words = tuple(word for task in T5_RECIPE["tasks"] for word in task.get("classnames", []))
    tokenizer = toy_t5_tokenizer(extra_words=label_words)
    base = build_toy_t5_base(vocab_size=len(tokenizer), num_decoder_layers=2)  # as Flan-T5: equal depths
    publish(cache, T5_RECIPE["base_model"], "model", saved(base, tokenizer))
    for index, task in enumerate(T5_RECIPE["tasks"]):
        publish(cache, task["model"], "model", saved(build_toy_t5_expert(base, seed=index + 1), tokenizer))

    def glue(directory: Path) -> None:
        for index, task in enumerate(T5_RECIPE["tasks"]):
            name, split = task["name"], GLUE_PROMPTS[task["name"]][1]
            (directory / name).mkdir()
            classes = len(task.get("classnames", []))
            glue_split(name, classes, index).to_parquet(directory / name / f"{split}-00000-of-00001.parquet")

    publish(cache, "nyu-mll/glue", "dataset", glue)


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("hub")
    publish_clip(cache)
    publish_t5(cache)
    return cache


def run_paper(hub: Path, workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(workdir / "ds")}
    command = [sys.executable, str(ROOT / "benchmarks" / "paper.py"), "--cache", str(workdir / "cache"),
               "--results", str(workdir / "results"), *args]  # fmt: skip
    return subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)


def test_help_describes_the_run():
    output = subprocess.run([sys.executable, str(ROOT / "benchmarks/paper.py"), "--help"], capture_output=True,
                            text=True, check=True).stdout  # fmt: skip
    for phrase in ("snapshot_download", "--dry-run", "the paper's protocol", "recommends", "resumes",
                   "tiny stand-ins", "1000"):  # fmt: skip
        assert phrase in " ".join(output.split()), phrase


def test_dry_run_names_every_download_and_fetches_nothing(tmp_path):
    run = run_paper(tmp_path / "empty-hub", tmp_path, "--dry-run")
    assert run.returncode == 0, run.stderr
    for recipe in (CLIP_RECIPE, T5_RECIPE):
        for repo in [recipe["base_model"], *(task["model"] for task in recipe["tasks"])]:
            assert f"model {repo}\n" in run.stdout
    assert "dataset tanganke/sun397 (" in run.stdout and "mnli/validation_matched-*.parquet" in run.stdout
    assert "about 2 hours" in run.stdout and not (tmp_path / "empty-hub").exists()


def test_every_stage_runs_on_stand_ins_and_a_second_run_resumes(hub, tmp_path):
    run = run_paper(hub, tmp_path, "--steps", "2", "--batch-size", "2", "--eval-batch-size", "8")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "wemoe.merge" in run.stderr and "TTA" in run.stderr  # what the second run must not do again
    for suite, recipe in (("clip", CLIP_RECIPE), ("t5", T5_RECIPE)):
        tasks = [task["name"] for task in recipe["tasks"]]
        table = json.loads((tmp_path / "results" / f"paper_{suite}.json").read_text())
        assert len(table["results"]) == ROWS
        for row, scores in table["results"].items():
            assert set(scores) == {*tasks, "average"}, row
            assert all(-1 <= value <= 1 for value in scores.values()), row
        assert set(table["published"]) == set(PUBLISHED[suite]) <= set(table["results"])
        markdown = (tmp_path / "results" / f"paper_{suite}.md").read_text()
        assert markdown.count("published (") == len(PUBLISHED[suite])
    models = tmp_path / "cache" / "clip" / "models"
    paper = yaml.safe_load((models / "wemoe__the_paper_s_protocol_tta" / "merge_config.yaml").read_text())
    assert paper["router"]["init"] == "reference"
    assert paper["adaptation"]["objective"] == "label-words" and paper["adaptation"]["steps"] == 2
    assert (paper["adaptation"]["adaptation_routing"], paper["adaptation"]["lr_schedule"]) == ("batch", "cosine")
    recommended = yaml.safe_load((models / "wemoe__recommended__task_routing_tta" / "merge_config.yaml").read_text())
    assert recommended["adaptation"]["objective"] == "task-routing"

    mnli = load_dataset("parquet", data_files=str(tmp_path / "cache/t5/prompts/mnli/prompts.parquet"), split="train")
    assert mnli.features["label"].names == ["entailment", "neutral", "contradiction"]
    glue_row = glue_split("mnli", 3, seed=[task["name"] for task in T5_RECIPE["tasks"]].index("mnli"))[0]
    assert mnli[0]["text"] == GLUE_PROMPTS["mnli"][0].format(**glue_row)

    scores = sorted((tmp_path / "cache").rglob("eval/*.json"))
    stamps = [path.stat().st_mtime_ns for path in scores]
    again = run_paper(hub, tmp_path, "--steps", "2", "--batch-size", "2", "--eval-batch-size", "8")
    assert again.returncode == 0, again.stderr[-3000:]
    assert [path.stat().st_mtime_ns for path in scores] == stamps  # nothing recomputed
    assert "wemoe.merge" not in again.stderr and "TTA" not in again.stderr


def test_the_glue_prompts_are_the_ones_the_fine_tunes_learnt():
    templates = pytest.importorskip("fusion_bench.tasks.flan_t5_text_generation.glue_prompt_templates")
    assert {task: prompt for task, (prompt, _) in GLUE_PROMPTS.items()} == {
        task: template["input_text"] for task, template in templates.glue_prompt_templates.items()
    }
