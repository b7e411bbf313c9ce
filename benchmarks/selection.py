"""What the accuracy benchmarks choose, and how: on the validation splits, never on test scores.

- `choose_adaptation`: the learning rate and the number of steps of an adapted row. Its artifact is adapted, as
  `wemoe-tta` runs, on the validation split's unlabeled inputs at each candidate learning rate, with checkpoints
  along the way; each checkpoint is scored on the validation labels (`diagnostics.adaptation_curve`); the best
  (learning rate, steps) is the row's setting for its adaptation on the test inputs. `TaskRoutingChoices` makes
  that choice once per router normalization for the task-routing rows.
- `recommend`: the row the README recommends, the merged row with the best validation average, written to
  `recommended.json` under the benchmark's name.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from accuracy_common import TASK_ROUTING_ARGS, Adaptation, converted_model, evaluate_dir, method_slug, write_yaml
from diagnostics import adaptation_curve

from wemoe.cli.tta import main as wemoe_tta

logger = logging.getLogger("selection")

RECOMMENDED = "recommended.json"


def choose_adaptation(
    cache: Path,
    method: str,
    converted: Path,
    validation: dict,
    lrs: list[float],
    steps: list[int],
    adaptation: Adaptation,
) -> dict:
    """The `lrs` x `steps` setting of `method`'s adaptation (`adaptation` gives the batch size, seed and objective)
    with the best validation accuracy, each candidate run on `converted` (the unadapted artifact) over the validation
    inputs; ties go to fewer steps, then the smaller learning rate. Cached as JSON with every candidate's score."""
    output = cache / "eval" / f"{method_slug(method)}_adaptation_on_validation.json"
    if output.is_file():
        return json.loads(output.read_text())
    data_yaml = write_yaml(validation, cache / "data_validation.yaml")
    scores = {}
    for lr in lrs:
        run = cache / "selection" / f"{method_slug(method)}_lr_{lr:g}"
        checkpoints = Path(f"{run}.checkpoints")
        if not run.is_dir():
            wemoe_tta([str(converted), str(data_yaml), "--output", str(run), "--steps", str(max(steps)),
                       "--lr", str(lr), "--batch-size", str(adaptation.batch_size), "--seed", str(adaptation.seed),
                       "--checkpointing-steps", str(min(steps)), *adaptation.tta_args])  # fmt: skip
        curve = adaptation_curve(converted, checkpoints, validation)
        for point in curve:
            if point["step"] in steps:
                scores[f"{lr:g}@{point['step']}"] = point["accuracy"]
                logger.info("%s, lr %g, %d steps: validation accuracy %.4f", method, lr, point["step"],
                            point["accuracy"])  # fmt: skip
    best = max(scores, key=lambda key: (scores[key], -int(key.split("@")[1]), -float(key.split("@")[0])))
    lr, step = best.split("@")
    choice = {"lr": float(lr), "steps": int(step), "validation_accuracy": scores[best], "candidates": scores}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(choice, indent=2))
    return choice


PAPER, TASK_ROUTING = "paper", "task routing"  # how a benchmark row adapts (None: it does not)

# The task-routing rows' learning rate: the one the benchmarks' earlier grid of two (1e-3, 3e-3) chose on validation
# in five of its six choices (three benchmarks, two normalizations; the sixth, the T5's softmax routing, was within
# 0.2 points at its longest run) and `wemoe-tta`'s default for the objective. Their step counts are still chosen on
# validation; a second rate doubled the runs that choice takes and put the benchmarks over their time budgets.
TASK_ROUTING_LRS = (3e-3,)


@dataclass(frozen=True)
class TaskRoutingGrid:
    """The learning rates and step counts a benchmark's task-routing rows choose from, on validation. Each
    candidate learning rate is one run checkpointed every `min(steps)` steps, so every step count must be a multiple
    of the smallest."""

    lrs: tuple[float, ...]
    steps: tuple[int, ...]

    def __post_init__(self) -> None:
        if any(step % min(self.steps) for step in self.steps):
            raise ValueError(f"Step counts {self.steps}: each must be a multiple of the smallest (checkpoint step).")


class TaskRoutingChoices:
    """The task-routing rows' adaptation: per router normalization (raw or softmax routing weights learn at their own
    rates), chosen on validation (`choose_adaptation`) by the first row that asks (the benchmark lists WEMoE first),
    and used by every task-routing row of that normalization (E-WEMoE, other expert formats)."""

    def __init__(self, cache: Path, validation: dict, grid: TaskRoutingGrid, batch_size: int, seed: int):
        self.cache, self.validation, self.grid = cache, validation, grid
        self.batch_size, self.seed = batch_size, seed
        self.chosen: dict[str, Adaptation] = {}

    def adaptation(self, method: str, recipe: dict) -> Adaptation:
        normalization = recipe.get("router", {}).get("normalization", "none")
        if normalization not in self.chosen:
            trial = Adaptation(max(self.grid.steps), self.batch_size, seed=self.seed, tta_args=TASK_ROUTING_ARGS)
            converted = converted_model(self.cache, method, recipe)
            choice = choose_adaptation(self.cache, method, converted, self.validation, list(self.grid.lrs),
                                       list(self.grid.steps), trial)  # fmt: skip
            self.chosen[normalization] = Adaptation(choice["steps"], self.batch_size, lr=choice["lr"], seed=self.seed,
                                                    tta_args=TASK_ROUTING_ARGS)  # fmt: skip
        return self.chosen[normalization]


class RowAdaptations:
    """How each row of a benchmark adapts, as its `methods` say: `PAPER` (the paper's entropy minimisation at the
    paper's settings, and AdaMerging's training) or `TASK_ROUTING` (at the settings chosen on `validation`)."""

    def __init__(self, cache: Path, validation: dict, grid: TaskRoutingGrid, paper: Adaptation):
        self.paper = paper
        self.routing = TaskRoutingChoices(cache, validation, grid, paper.batch_size, paper.seed)

    def __call__(self, method: str, recipe: dict, adapts: str | None) -> Adaptation:
        return self.routing.adaptation(method, recipe) if adapts == TASK_ROUTING else self.paper


def recommend(
    benchmark: str,
    results: dict,
    validation_yaml: Path,
    cache: Path,
    directory: Path,
    excluded: tuple[str, ...],
    eval_args: tuple[str, ...] = (),
) -> dict:
    """The merged row with the best validation average (rows in `excluded`, and rows without one model, are not
    candidates: the fine-tunes, the zero-shot base, the oracle), written into `directory/recommended.json` under
    `benchmark` beside the other benchmarks' choices; `eval_args` are `wemoe-eval`'s options (a T5's generation)."""
    validation = {}
    for method, result in results.items():
        if method in excluded or "model" not in result:
            continue
        output = cache / "eval" / "validation" / f"{method_slug(method)}.json"
        validation[method] = evaluate_dir(Path(result["model"]), validation_yaml, output, eval_args)["average"]
    row = max(validation, key=validation.get)
    choice = {
        "row": row,
        "validation_average": validation[row],
        "test_average": results[row]["scores"]["average"],
        "validation_averages": validation,
    }
    path = directory / RECOMMENDED
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**recorded, benchmark: choice}, indent=2, sort_keys=True) + "\n")
    logger.info("%s: recommended row %r (validation average %.4f)", benchmark, row, validation[row])
    return choice


def recommended_line(choice: dict) -> str:
    return (f"\nrecommended (the merged row with the best validation average): {choice['row']} "
            f"({100 * choice['validation_average']:.1f} on validation, {100 * choice['test_average']:.1f} on test)")
