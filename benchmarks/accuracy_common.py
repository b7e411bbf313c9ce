"""What the two accuracy benchmarks (CLIP on images, T5 on text) share: fixed-step training with transformers'
Trainer, checkpoints saved whole or not at all, and scoring one method through `wemoe-convert`, `wemoe-tta` and
`wemoe-eval` (their `main(argv)`, exactly as a user runs them), each stage cached on disk."""

import argparse
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field
from transformers import Trainer, TrainingArguments

from wemoe.cli.convert import main as wemoe_convert
from wemoe.cli.evaluate import main as wemoe_eval
from wemoe.cli.tta import main as wemoe_tta
from wemoe.data import open_dataset
from wemoe.outputs import staged_output
from wemoe.recipe import DatasetSource
from wemoe.results import scores_from_json
from wemoe.streams import LABEL_WORDS, TASK_ROUTING

logger = logging.getLogger("accuracy")
# Task arithmetic's scaling is chosen from these on the validation splits (the paper's protocol).
LAMBDAS = [round(0.1 * i, 1) for i in range(1, 11)]


# The paper's objective, named: `wemoe-tta`'s default is another.
PAPER_ARGS = ("--objective", LABEL_WORDS)


@dataclass(frozen=True)
class Adaptation:
    """Test-time adaptation (and AdaMerging) settings on each task's unlabeled test inputs: the paper's entropy
    minimisation unless `tta_args` names another objective."""

    steps: int
    batch_size: int
    lr: float = 1e-3
    seed: int = 0
    tta_args: tuple[str, ...] = PAPER_ARGS  # more `wemoe-tta` options; AdaMerging ignores them


# The task-routing objective's `wemoe-tta` options (its learning rate and steps are chosen on validation).
TASK_ROUTING_ARGS = ("--objective", TASK_ROUTING)

# Rows whose experts are the attention projections as well as the MLPs (`upscale`); the oracle rows force each task's
# expert on a converted, unadapted model of the row they name (raw routing): the static part's cost alone.
ATTENTION_FIELDS = {"upscale": ["mlp", "attention"]}
ATTENTION = ", MLP + attention upscaled"
# The same, with every weight it does not upscale (embeddings, norms) kept pre-trained rather than merged by task
# arithmetic (`static_merge.scaling: 0`): an input routed to zero, as task routing routes a task without an expert,
# then sees exactly the base its zero-shot head was built for.
PRETRAINED_REST_FIELDS = {**ATTENTION_FIELDS, "static_merge": {"method": "task_arithmetic", "scaling": 0.0}}
PRETRAINED_REST = f"{ATTENTION}, other weights pre-trained"
ORACLE_ROWS = {
    "WEMoE, oracle routing (diagnostic)": ("WEMoE", "oracle"),
    f"WEMoE{ATTENTION}, oracle routing (diagnostic)": (f"WEMoE, task routing{ATTENTION}", "oracle_attention"),
}


def train(
    model: torch.nn.Module,
    dataset,
    steps: int,
    lr: float,
    batch_size: int,
    output: Path,
    seed: int,
    data_collator=None,
) -> None:
    """transformers' Trainer for a fixed number of steps, constant learning rate after a short warm-up."""
    arguments = TrainingArguments(
        output_dir=str(output),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        warmup_steps=min(100, steps // 10),
        lr_scheduler_type="constant_with_warmup",
        weight_decay=0.0,
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        seed=seed,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    Trainer(model=model, args=arguments, train_dataset=dataset, data_collator=data_collator).train()


def save_atomically(directory: Path, *parts) -> None:
    """`save_pretrained` of every part (model, tokenizer, processor) staged and renamed into place, so an interrupted
    run never leaves a half-written checkpoint that the cache would take as done."""
    with staged_output(directory) as staging:
        for part in parts:
            part.save_pretrained(staging)


def write_yaml(content: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def evaluate_dir(model_dir: Path, data_yaml: Path, output: Path, extra_args: tuple[str, ...] = ()) -> dict[str, float]:
    """`wemoe-eval` scores of a model directory, cached as JSON (files cached by earlier releases read too)."""
    if not output.is_file():
        output.parent.mkdir(parents=True, exist_ok=True)
        wemoe_eval([str(model_dir), str(data_yaml), "--output", str(output), *extra_args])
    return scores_from_json(json.loads(output.read_text()))


def method_slug(method: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in method.lower()).strip("_")


def convert_and_adapt(cache: Path, method: str, recipe: dict, data_yaml: Path, adaptation: Adaptation) -> Path:
    """The model a method is scored with: `wemoe-convert` of its recipe, then `wemoe-tta` for a WEMoE variant (static
    merges are scored as converted; AdaMerging trains with the adaptation's settings). Both outputs are cached under
    `cache/models`."""
    slug = method_slug(method)
    if recipe.get("static_merge", {}).get("method") == "adamerging":  # trained on the same data as wemoe-tta
        recipe = {**recipe, "static_merge": {"method": "adamerging", "data": str(data_yaml), "steps": adaptation.steps,
                                             "lr": adaptation.lr, "batch_size": adaptation.batch_size,
                                             "seed": adaptation.seed}}  # fmt: skip
    converted = converted_model(cache, method, recipe)
    if recipe.get("variant") == "static":
        return converted
    adapted = cache / "models" / f"{slug}_tta"
    if not adapted.is_dir():  # three checkpoints, the last the final step (each one a point of the adaptation curve)
        wemoe_tta([str(converted), str(data_yaml), "--output", str(adapted), "--steps", str(adaptation.steps),
                   "--lr", str(adaptation.lr), "--batch-size", str(adaptation.batch_size), "--seed",
                   str(adaptation.seed), "--checkpointing-steps", str(-(-adaptation.steps // 3)),
                   *adaptation.tta_args])  # fmt: skip
    return adapted


def converted_model(cache: Path, method: str, recipe: dict) -> Path:
    """`wemoe-convert` of a method's recipe, cached under `cache/models`."""
    slug = method_slug(method)
    converted = cache / "models" / slug
    if not converted.is_dir():
        wemoe_convert([str(write_yaml(recipe, cache / f"recipe_{slug}.yaml")), str(converted)])
    return converted


def results_table(results: dict, tasks: list[str]) -> str:
    """Markdown: one row per method, a column per task, the average, and trainable / total parameters."""
    lines = [
        "| method | " + " | ".join(tasks) + " | average | trainable / total params |",
        "|---|" + "---|" * (len(tasks) + 2),
    ]
    for method, result in results.items():
        scores = result["scores"]
        trainable, total = result["parameters"]
        params = "-" if total is None else f"{trainable:,} / {total:,}"
        cells = " | ".join(f"{100 * scores[task]:.1f}" for task in tasks)
        lines.append(f"| {method} | {cells} | **{100 * scores['average']:.1f}** | {params} |")
    return "\n".join(lines)


def write_results(results: dict, tasks: list[str], directory: Path, stem: str) -> str:
    """`stem.md` (the table, returned) and `stem.json` (every score, parameter count and model path) in `directory`."""
    table = results_table(results, tasks)
    (directory / f"{stem}.md").write_text(table + "\n")
    (directory / f"{stem}.json").write_text(json.dumps(results, indent=2))
    return table


def parse_benchmark_args(
    doc: str, default_cache: Path, argv: list[str] | None, extra: Callable[[argparse.ArgumentParser], None] = None
) -> argparse.Namespace:
    """The benchmarks' shared command line (help text from the script's docstring; `extra` adds a script's own
    options), with logging, threads and the cache set up: `--fresh` deletes the cache first."""
    parser = argparse.ArgumentParser(
        description=doc.splitlines()[0],
        epilog=doc.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if extra is not None:
        extra(parser)
    parser.add_argument("--cache", type=Path, default=default_cache, help="Stage cache (default: %(default)s).")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"), help="Tables and plots.")
    parser.add_argument("--tiny", action="store_true", help="CI-sized: checks the pipeline, not the accuracy.")
    parser.add_argument("--fresh", action="store_true", help="Delete the cache first.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2).")
    args = parser.parse_args(argv)
    args.cache = args.cache.resolve()  # recipes and LoRA adapters record absolute paths to what they build on
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    if args.fresh:
        shutil.rmtree(args.cache, ignore_errors=True)
    args.cache.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    return args


# ---------------------------------------------------------------------------------------------------- task files
class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskFiles(Strict):
    """One task of a tasks file: its three splits as `datasets` specs, its columns (images for CLIP, `prefix + text`
    for text models) and, optionally, a domain the benchmark groups tasks by."""

    train: DatasetSource
    validation: DatasetSource
    test: DatasetSource
    image_column: str = "image"
    text_column: str = "text"
    label_column: str = "label"
    prefix: str = ""
    domain: str = ""


class TasksFile(Strict):
    """A benchmark's task set (`--tasks FILE`): `tasks: {NAME: {train: SPEC, validation: SPEC, test: SPEC, ...}}`."""

    tasks: Annotated[dict[str, TaskFiles], Field(min_length=2)]


def load_split(task: str, files: TaskFiles, split: str):
    """A task's split, checked to have ClassLabel labels (their names are the expert's classes)."""
    from datasets import ClassLabel

    dataset = open_dataset(task, getattr(files, split))
    feature = dataset.features.get(files.label_column)
    if not isinstance(feature, ClassLabel):
        raise ValueError(f"Task {task!r}: the {split} split's column {files.label_column!r} must be a ClassLabel.")
    return dataset


def class_names(task: str, files: TaskFiles) -> list[str]:
    return load_split(task, files, "train").features[files.label_column].names


def data_config(tasks: TasksFile, split: str, names: list[str] | None = None) -> dict:
    """The DATA.yaml content `wemoe-tta` and `wemoe-eval` read: the `split` of every task (or of `names`)."""
    columns = ("image_column", "text_column", "label_column", "prefix")
    return {
        "tasks": {
            name: {**getattr(files, split).model_dump(exclude_none=True), **files.model_dump(include=set(columns))}
            for name, files in tasks.tasks.items()
            if names is None or name in names
        }
    }


def recipe_dataset(tasks: TasksFile, task: str) -> dict:
    """A recipe task's `dataset` (where CLIP reads its class names): the task's train split, with its label column."""
    files = tasks.tasks[task]
    return {**files.train.model_dump(exclude_none=True), "label_column": files.label_column}


def score_each_task(
    directories: dict[str, Path], data: dict[str, dict], cache: Path, stem: str, eval_args: tuple[str, ...] = ()
) -> dict[str, float]:
    """Each task's score from its own model directory (`directories[task]`) on its entry of `data` (a DATA.yaml's
    `tasks`), with `wemoe-eval`'s options `eval_args`, and their average; cached as `evaluate_dir` caches."""
    scores = {}
    for task, directory in directories.items():
        one_task = write_yaml({"tasks": {task: data[task]}}, cache / f"data_{task}.yaml")
        scores[task] = evaluate_dir(directory, one_task, cache / "eval" / f"{stem}_{task}.json", eval_args)[task]
    return {**scores, "average": sum(scores.values()) / len(scores)}


def score_each_alone(
    directories: dict[str, Path], tasks: TasksFile, cache: Path, stem: str, eval_args: tuple[str, ...] = ()
) -> dict[str, float]:
    """`score_each_task` on the tasks' test splits."""
    return score_each_task(directories, data_config(tasks, "test")["tasks"], cache, stem, eval_args)


def choose_on_validation(candidates: list[float], validation_average: Callable[[float], float], output: Path) -> dict:
    """The candidate with the best validation average (ties: the first), with every candidate's average; cached as
    JSON. Test accuracy never enters a choice."""
    if output.is_file():
        return json.loads(output.read_text())
    averages = {}
    for candidate in candidates:
        averages[str(candidate)] = validation_average(candidate)
        logger.info("candidate %g: validation average %.4f", candidate, averages[str(candidate)])
    choice = {"lambda": float(max(averages, key=averages.get)), "validation_averages": averages}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(choice, indent=2))
    return choice


def routing_table(report: dict, tasks: list[str]) -> str:
    """Markdown: routing accuracy per layer (mean over the tasks with an expert), before and after adaptation; a row
    with fewer routed layers than others (a T5 decoder routed per token routes no sample as a whole) ends in `-`."""
    rows = []
    for method, entry in report.items():
        if "routing_accuracy_before" not in entry:
            continue
        for when in ("before", "after"):
            per_task = {t: v for t, v in entry[f"routing_accuracy_{when}"].items() if t in tasks and v is not None}
            layers = len(next(iter(per_task.values())))
            means = [sum(values[layer] for values in per_task.values()) / len(per_task) for layer in range(layers)]
            rows.append((f"{method}, {when} adaptation", [f"{m:.2f}" for m in means]))
    layers = max(len(means) for _, means in rows)
    header = ["| method | " + " | ".join(f"layer {i}" for i in range(layers)) + " |", "|---|" + "---|" * layers]
    lines = [f"| {name} | " + " | ".join(means + ["-"] * (layers - len(means))) + " |" for name, means in rows]
    return "\n".join(header + lines)
