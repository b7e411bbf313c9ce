"""Test-time adaptation of the routers on unlabeled task data, on accelerate; the library behind `wemoe-tta`
(`wemoe.cli.tta`) and AdaMerging.

Only router parameters train. Each step draws one batch per task (round-robin over every task, from shuffled,
endlessly cycling data) and minimises the objective's loss (`wemoe.streams`): the paper's mean Shannon entropy of
each task's predicted distribution, over what the family's task stream (`Backbone.task_stream`) says (a task's
classes, or a T5's first decoded token), or the task-routing loss, which pulls each input's routing weights toward
its own task's expert. Runs unchanged on several processes (DDP): every process takes an equal share of each global
batch.
"""

import contextlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from tqdm.auto import tqdm

from modeling_wemoe.modeling_wemoe import is_router_parameter

from .artifact import load_artifact_model, load_config, write_artifact
from .backbones import Backbone, backbone_for_config
from .corruptions import Corruption
from .data import data_inputs, load_task_datasets, with_corruption
from .model_card import model_index_of, render_model_card, set_model_index
from .outputs import OutputError, check_output_target, push_folder, staged_output, write_file_atomically
from .recipe import RECIPE_FILE, MergeRecipe, artifact_recipe, recipe_file_text
from .streams import (
    DEFAULT_OBJECTIVE,
    ENTROPY_OBJECTIVES,
    LABEL_WORDS,
    TASK_ROUTING,
    AdaptationLoss,
    TaskStream,
    adaptation_loss,
    check_entropy_weight,
    check_objective_name,
    default_lr,
)

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"
STEP_FILE = "wemoe_tta_step.json"
# The adapted model's card reports its final loss as the mean over this many last steps (one step's is noisy).
FINAL_LOSS_STEPS = 10


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    steps = [p for p in checkpoint_dir.glob(f"{CHECKPOINT_PREFIX}*") if (p / STEP_FILE).is_file()]
    return max(steps, key=lambda p: json.loads((p / STEP_FILE).read_text())["step"], default=None)


def resumable_checkpoint(checkpoint_dir: str | os.PathLike | None, run: Mapping) -> Path:
    """The latest checkpoint, if it was written by a run with the same settings (`run`: learning rate, seed, batch
    size, data, model). Resuming with others would silently break the promise that a resumed run ends as an
    uninterrupted one would: refused, naming what differs."""
    checkpoint = latest_checkpoint(Path(checkpoint_dir)) if checkpoint_dir is not None else None
    if checkpoint is None:
        raise ValueError(f"--resume: no checkpoint found in {str(checkpoint_dir)!r}.")
    saved = json.loads((checkpoint / STEP_FILE).read_text()).get("run")
    if saved is None:
        logger.warning("%s records no run settings (an older release wrote it); resuming unchecked.", checkpoint)
        return checkpoint
    current = json.loads(json.dumps(dict(run)))  # as it will be stored
    saved.setdefault("objective", LABEL_WORDS)  # releases before task routing recorded none: theirs was the paper's
    differences = [
        f"{key}: checkpoint {saved.get(key)!r}, this run {current.get(key)!r}"
        for key in sorted(saved.keys() | current.keys())
        if saved.get(key) != current.get(key)
    ]
    if differences:
        raise ValueError(
            f"--resume: {str(checkpoint)!r} was written by a run with other settings, so resuming would not end as "
            f"that run would ({'; '.join(differences)}). Resume with the same settings, or start over without "
            "--resume."
        )
    return checkpoint


def remove_old_checkpoints(saved: list[Path], keep: int | None) -> None:
    """Delete all but the newest `keep` of `saved` (a run's checkpoints, oldest first; None keeps all), as transformers'
    `save_total_limit` does. The step file goes first, so a checkpoint deleted halfway never looks complete."""
    while keep is not None and len(saved) > keep:
        old = saved.pop(0)
        (old / STEP_FILE).unlink()
        shutil.rmtree(old)


def keep_only(trainable: Callable[[str], bool]):
    """An accelerate save-state hook: checkpoints hold the trained parameters (plus optimizer and RNG), not the frozen
    model."""

    def hook(models, weights, output_dir) -> None:
        for i, state in enumerate(weights):
            weights[i] = {key: value for key, value in state.items() if trainable(key)}

    return hook


def adapt(
    model,
    tasks: Mapping[str, TaskStream],
    *,
    steps: int = 1000,
    lr: float = 1e-4,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpointing_steps: int | None = None,
    resume: bool = False,
    mixed_precision: str = "no",
    report_to: str | None = None,
    accelerator: Accelerator | None = None,
    keep_checkpoints: int | None = None,
    trainable: Callable[[str], bool] = is_router_parameter,
    run_settings: Mapping | None = None,
    loss_log: list[float] | None = None,
    loss: AdaptationLoss | None = None,
    adaptation_routing: str = "sample",
    lr_schedule: str = "constant",
):
    """Train the routers of `model` (or the parameters `trainable` names) on `tasks` (task name -> `TaskStream`) to
    minimise `loss` (default: the paper's entropy; `wemoe.streams.adaptation_loss`).

    Returns the unwrapped model. With `checkpoint_dir`, the routers, optimizer and RNG state are saved every
    `checkpointing_steps` and at the end; `resume` continues from the latest such checkpoint and ends with the
    same weights as an uninterrupted run with the same seed. Checkpoints record the learning rate, the seed and
    `run_settings` (batch size, data, ...); resuming with other values is refused. `loss_log`, if given, receives
    each step's mean loss. With `keep_checkpoints`, only that many of the newest checkpoints stay on disk (the one
    resumed from included): older ones are deleted as new ones are complete. `adaptation_routing` "batch" merges one
    weight per task batch from its mean routing weights (`check_adaptation_routing`) instead of one per sample;
    `lr_schedule` "cosine" decays the learning rate to 0 over `steps` (the authors' script), "constant" keeps it.
    """
    run = {"lr": lr, "seed": seed, **(run_settings or {})}
    loss = loss or adaptation_loss()
    accelerator = accelerator or Accelerator(mixed_precision=mixed_precision, log_with=report_to)
    check_adaptation_routing(model, adaptation_routing, accelerator.num_processes)
    check_lr_schedule(lr_schedule)
    set_seed(seed)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(trainable(name))
    gradients_through_experts(model, loss.through_experts)
    if adaptation_routing == "batch":
        model.route_each_batch_as_one(True)
    model.eval()  # no dropout: the gradient reaches the routers only, the forward stays the inference forward
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model, optimizer = accelerator.prepare(model, optimizer)  # places the model on the process's device
    # Stepped here once per optimizer step (accelerate's wrapper would step it once per process) and checkpointed.
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps) if lr_schedule == "cosine" else None
    if scheduler is not None:
        accelerator.register_for_checkpointing(scheduler)
    logger.info(
        "Process %d of %d adapts on %s", accelerator.process_index, accelerator.num_processes, accelerator.device
    )
    accelerator.register_save_state_pre_hook(keep_only(trainable))
    if report_to:
        accelerator.init_trackers("wemoe-tta", config={"steps": steps, "lr": lr, "seed": seed, "tasks": list(tasks)})

    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    start_step, saved = 0, []
    if resume:
        checkpoint = resumable_checkpoint(checkpoint_dir, run)
        saved.append(checkpoint)
        accelerator.load_state(str(checkpoint), strict=False)
        start_step = json.loads((checkpoint / STEP_FILE).read_text())["step"]
        logger.info("Resumed from %s at step %d", checkpoint, start_step)

    def save_checkpoint(step: int) -> None:
        target = checkpoint_dir / f"{CHECKPOINT_PREFIX}{step}"
        accelerator.save_state(str(target))
        if accelerator.is_main_process:
            # Written last and by a rename: a checkpoint with this file is complete, even if the run is killed here.
            write_file_atomically(target / STEP_FILE, json.dumps({"step": step, "run": run}).encode())
            saved.append(target)
            remove_old_checkpoints(saved, keep_checkpoints)
        accelerator.wait_for_everyone()

    progress = tqdm(
        range(start_step, steps),
        initial=start_step,
        total=steps,
        desc="TTA",
        unit="step",
        disable=not accelerator.is_local_main_process,
    )
    step_mean = float("nan")
    for step in progress:
        step_loss = torch.zeros((), device=accelerator.device)
        for task_index, stream in enumerate(tasks.values()):
            inputs = stream.batch(seed, task_index, step, accelerator.process_index, accelerator.num_processes)
            last_task = task_index == len(tasks) - 1
            # One backward per task keeps one task's graph in memory; gradients are synchronised once per step.
            with accelerator.no_sync(model) if not last_task else contextlib.nullcontext():
                with accelerator.autocast():
                    inputs = {key: value.to(accelerator.device) for key, value in inputs.items()}
                    task_loss = loss(stream, model, inputs) / len(tasks)
                accelerator.backward(task_loss)
            step_loss += task_loss.detach()
        optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()
        # Each process saw its share of every batch: the mean over processes is the whole batch's loss.
        step_mean = accelerator.reduce(step_loss, reduction="mean").item()
        progress.set_postfix({loss.name: f"{step_mean:.4f}"})
        if loss_log is not None:
            loss_log.append(step_mean)
        if report_to:
            accelerator.log({loss.name: step_mean}, step=step + 1)
        if checkpoint_dir is not None and (
            step + 1 == steps or (checkpointing_steps and (step + 1) % checkpointing_steps == 0)
        ):
            save_checkpoint(step + 1)
    if report_to:
        accelerator.end_training()
    gradients_through_experts(accelerator.unwrap_model(model), True)
    if adaptation_routing == "batch":
        accelerator.unwrap_model(model).route_each_batch_as_one(False)
    if accelerator.is_main_process:
        logger.info(
            "Adapted for %d steps on %d process(es); mean %s at the last step %.6f",
            steps,
            accelerator.num_processes,
            loss.name,
            step_mean,
        )
    return accelerator.unwrap_model(model)


def gradients_through_experts(model, enabled: bool) -> None:
    """Let (or stop) gradients reach the routers through the experts, where the model can say: artifacts saved by
    earlier releases, and the static models AdaMerging trains, always pass them."""
    route = getattr(model, "route_gradients_through_experts", None)
    if route is not None:
        route(enabled)


def load_task_streams(
    data_config, model, processor, batch_size: int, num_processes: int, objective: str = LABEL_WORDS
) -> dict[str, TaskStream]:
    """A stream per task of the data config, as the model's family reads its task data (`processor`: the artifact's
    image processor or tokenizer), giving the logits of `objective` (see `wemoe.streams.OBJECTIVES`)."""
    check_batch_size(batch_size, num_processes)
    backbone = backbone_for_config(model.config)
    check_objective(backbone, objective)
    datasets = load_task_datasets(data_config, list(model.config.tasks), backbone.input_kind)
    return task_streams(backbone, datasets, processor, batch_size, model.config.task_labels, objective)


def check_objective(backbone: Backbone, objective: str) -> None:
    """`objective` is one of `wemoe.streams.OBJECTIVES` that the family offers."""
    check_objective_name(objective)
    if objective not in backbone.objectives:
        raise ValueError(
            f"--objective {objective} is not available for {backbone.display_name} models (it counts the probability "
            f"of tokens outside a text-to-text model's label words); {backbone.display_name} offers "
            f"{', '.join(backbone.objectives)}."
        )


ADAPTATION_ROUTINGS = ("sample", "batch")  # the first of each is the default
LR_SCHEDULES = ("constant", "cosine")


def check_adaptation_routing(model, adaptation_routing: str, num_processes: int) -> None:
    """"batch" needs a WEMoE model, and one process: each process would average the routing of its own share of the
    batch, so several would not end as one does."""
    if adaptation_routing not in ADAPTATION_ROUTINGS:
        raise ValueError(
            f"--adaptation-routing must be one of {', '.join(ADAPTATION_ROUTINGS)}, got {adaptation_routing!r}."
        )
    if adaptation_routing == "sample":
        return
    if not hasattr(model, "route_each_batch_as_one"):
        raise ValueError(
            f"--adaptation-routing batch routes a WEMoE model's batches; {type(model).__name__} has no routers."
        )
    if num_processes > 1:
        raise ValueError(
            f"--adaptation-routing batch averages the routing of each batch; on {num_processes} processes each would "
            "average its own share, and the run would not end as a single-process run: run it on one process."
        )


def check_lr_schedule(lr_schedule: str) -> None:
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {lr_schedule!r}.")


def check_batch_size(batch_size: int, num_processes: int) -> None:
    if batch_size < 1:
        raise ValueError(f"--batch-size must be a positive number of samples per task, got {batch_size}.")
    if batch_size % num_processes:
        raise ValueError(f"--batch-size {batch_size} must be divisible by the number of processes ({num_processes}).")


def task_streams(
    backbone: Backbone,
    datasets: Mapping[str, tuple],
    processor,
    batch_size: int,
    task_labels: Mapping[str, list[str]] | None = None,
    objective: str = LABEL_WORDS,
) -> dict[str, TaskStream]:
    """A stream per task of `load_task_datasets`' result, as the family turns its data into model inputs; its logits
    are those of the adaptation `objective` (checked with `check_objective`; only a family that offers another entropy
    than the default is passed it: the task-routing objective's entropy term is the default's)."""
    check_objective(backbone, objective)
    extra = {"objective": objective} if objective in ENTROPY_OBJECTIVES[1:] else {}
    return {
        task: backbone.task_stream(dataset, spec, processor, batch_size, task, (task_labels or {}).get(task), **extra)
        for task, (dataset, spec) in datasets.items()
    }


def data_fingerprint(datasets: Mapping[str, tuple]) -> dict:
    """What identifies the data a run adapts on: each task's spec, row count and `datasets` fingerprint."""
    return {
        task: {"spec": spec.model_dump(mode="json"), "rows": len(dataset), "fingerprint": dataset._fingerprint}
        for task, (dataset, spec) in datasets.items()
    }


def adapt_artifact(
    model_dir: str | os.PathLike,
    data,
    output: str | os.PathLike,
    *,
    steps: int = 1000,
    lr: float | None = None,
    batch_size: int = 16,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpointing_steps: int | None = 100,
    resume: bool = False,
    mixed_precision: str = "no",
    report_to: str | None = None,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
    cpu: bool = False,
    keep_checkpoints: int | None = None,
    corruption: Corruption | None = None,
    objective: str = DEFAULT_OBJECTIVE,
    entropy_weight: float = 0.0,
    adaptation_routing: str = "sample",
    lr_schedule: str = "constant",
) -> Path:
    """Adapt the artifact in `model_dir` on `data` (DATA.yaml path, dict or `DataConfig`) and save the result as a
    complete artifact in `output` (atomically, under a lock: see `wemoe.outputs`), its card and
    `merge_config.yaml` recording the run; then upload it to the Hub repo `push_to_hub` (created `private` if
    asked). Checkpoints go to `checkpoint_dir` (default: `OUTPUT.checkpoints`). Everything that can be checked
    without the weights is checked before they are loaded: the settings, the output, the data (every image opened),
    a resume's settings, the artifact's recipe. The model runs on the device accelerate gives each process (a GPU
    where there is one), or on the CPU with `cpu` (as `accelerate launch --cpu` or `ACCELERATE_USE_CPU=true`).
    `keep_checkpoints`: see `adapt`. `corruption` corrupts every task's images (`wemoe.corruptions`); the run
    records it with the data. `objective` (`wemoe.streams.OBJECTIVES`): `"task-routing"` (the default), which pulls
    each input's routing weights toward its own task's expert, plus `entropy_weight` times the paper's entropy; the
    paper's entropy over each task's classes or label words (`"label-words"`); or, for T5, over the label words plus
    one bin for every other token (`"label-words-and-rest"`); recorded with the run. `lr`: Adam's learning rate
    (default: the objective's, `wemoe.streams.DEFAULT_LRS`). `adaptation_routing` and `lr_schedule`: see `adapt`."""
    lr = default_lr(objective) if lr is None else lr
    check_training_settings(steps, lr, checkpointing_steps, keep_checkpoints)
    check_entropy_weight(objective, entropy_weight)
    checkpoint_dir = Path(checkpoint_dir or f"{output}.checkpoints")
    inputs = [model_dir, *data_inputs(data), checkpoint_dir]
    check_output_target(Path(output), overwrite, [path for path in inputs if Path(path).exists()])
    config = load_config(model_dir, "The artifact")
    if config.model_type != "wemoe":
        raise ValueError(f"{str(model_dir)!r} is a {config.model_type!r} model; wemoe-tta adapts WEMoE artifacts.")
    backbone = backbone_for_config(config)
    check_objective(backbone, objective)
    accelerator = Accelerator(mixed_precision=mixed_precision, log_with=report_to, cpu=cpu)
    check_batch_size(batch_size, accelerator.num_processes)
    data_config = data if corruption is None else with_corruption(data, corruption)
    datasets = load_task_datasets(data_config, list(config.tasks), backbone.input_kind)
    run_settings = {"model": model_identity(model_dir), "batch_size": batch_size, "data": data_fingerprint(datasets)}
    run_settings["objective"] = objective
    if objective == TASK_ROUTING:
        run_settings["entropy_weight"] = entropy_weight
    # Recorded only when not the default: checkpoints of releases without these options still resume.
    run_settings.update(non_default_schedule(adaptation_routing, lr_schedule))
    if resume:
        resumable_checkpoint(checkpoint_dir, {"lr": lr, "seed": seed, **run_settings})
    recipe = source_recipe(model_dir)
    losses: list[float] = []
    with contextlib.ExitStack() as stack:
        staging = lock_output_on_main_process(stack, accelerator, output, overwrite, inputs)
        model = load_artifact_model(model_dir)
        processor = backbone.load_processor(model_dir, config)
        streams = task_streams(backbone, datasets, processor, batch_size, config.task_labels, objective)
        model = adapt(
            model,
            streams,
            steps=steps,
            lr=lr,
            seed=seed,
            checkpoint_dir=checkpoint_dir,
            checkpointing_steps=checkpointing_steps,
            resume=resume,
            report_to=report_to,
            accelerator=accelerator,
            run_settings=run_settings,
            loss_log=losses,
            keep_checkpoints=keep_checkpoints,
            loss=adaptation_loss(objective, model.config, entropy_weight),
            adaptation_routing=adaptation_routing,
            lr_schedule=lr_schedule,
        )
        if accelerator.is_main_process:
            record = adaptation_record(
                model_dir, datasets, steps, lr, batch_size, seed, losses, objective, entropy_weight
            ) | non_default_schedule(adaptation_routing, lr_schedule)
            files = adapted_files(model_dir, recipe, record, model, backbone, push_to_hub)
            write_artifact(model, staging, processor, extra_files=files)
    accelerator.wait_for_everyone()
    if push_to_hub and accelerator.is_main_process:
        push_folder(Path(output), push_to_hub, "Upload test-time adapted WEMoE model", private=private)
    return Path(output)


def non_default_schedule(adaptation_routing: str, lr_schedule: str) -> dict[str, str]:
    """The adaptation-routing and learning-rate-schedule settings that differ from the defaults, as recorded."""
    chosen = {
        "adaptation_routing": (adaptation_routing, ADAPTATION_ROUTINGS),
        "lr_schedule": (lr_schedule, LR_SCHEDULES),
    }
    return {key: value for key, (value, options) in chosen.items() if value != options[0]}


def source_recipe(model_dir: str | os.PathLike) -> MergeRecipe | None:
    """The recipe a local artifact was converted with (its `merge_config.yaml`, less an earlier adaptation's record:
    this run records its own), which the adapted model's card is rendered from; read before any weight. None where
    there is none."""
    return artifact_recipe(model_dir)[0]


def adaptation_record(
    model_dir: str | os.PathLike,
    datasets: Mapping[str, tuple],
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    losses: list[float],
    objective: str = LABEL_WORDS,
    entropy_weight: float = 0.0,
) -> dict:
    """What the adapted artifact says about its run: which model it adapted (the name its card gives it, under which
    its results are filed), the settings, the data, and where the loss ended (`final_entropy` for the entropy
    objectives, `final_loss` for task-routing, with its `entropy_weight`)."""
    last = losses[-FINAL_LOSS_STEPS:]
    source = model_identity(model_dir)
    final = "final_loss" if objective == TASK_ROUTING else "final_entropy"
    return {
        "adapted_from": model_index_of(Path(model_dir) / "README.md")[0] or source,
        "source": source,
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "seed": seed,
        "objective": objective,
        **({"entropy_weight": entropy_weight} if objective == TASK_ROUTING else {}),
        # None when a resumed run had no step left to take.
        final: sum(last) / len(last) if last else None,
        f"{final}_steps": len(last),
        "data": {task: spec.model_dump(mode="json", exclude_none=True) for task, (_, spec) in datasets.items()},
    }


def adapted_files(
    model_dir: str | os.PathLike,
    recipe: MergeRecipe | None,
    record: dict,
    model,
    backbone: Backbone,
    repo_id: str | None,
) -> dict[str, str]:
    """The adapted artifact's `merge_config.yaml` (the recipe, plus the run under `adaptation`) and `README.md` (the
    card rendered for the adapted model, named `repo_id` if it is pushed, keeping the unadapted model's model-index
    entries). An artifact without a recipe keeps its card, if any, as it was."""
    card_path = Path(model_dir) / "README.md"
    files = {RECIPE_FILE: recipe_file_text(recipe, record)}
    if recipe is not None:
        card = render_model_card(model, recipe, backbone, repo_id=repo_id, adaptation=record)
        set_model_index(card, card.data.model_name, model_index_of(card_path)[1])
        files["README.md"] = str(card)
    elif card_path.is_file():
        files["README.md"] = card_path.read_text()
    return files


def check_training_settings(
    steps: int, lr: float, checkpointing_steps: int | None, keep_checkpoints: int | None = None
) -> None:
    if steps < 1:
        raise ValueError(f"--steps must be a positive number of optimizer steps, got {steps}.")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"--lr must be a positive number, got {lr}.")
    if checkpointing_steps is not None and checkpointing_steps < 1:
        raise ValueError(f"--checkpointing-steps must be a positive number of steps, got {checkpointing_steps}.")
    if keep_checkpoints is not None and keep_checkpoints < 1:
        raise ValueError(
            f"--keep-checkpoints must keep at least the newest checkpoint (1, for --resume), got {keep_checkpoints}."
        )


def model_identity(model_dir: str | os.PathLike) -> str:
    """A local artifact by its absolute path (however it was written), a Hub artifact by its id."""
    return str(Path(model_dir).resolve()) if Path(model_dir).exists() else str(model_dir)


def lock_output_on_main_process(
    stack: contextlib.ExitStack, accelerator: Accelerator, output, overwrite: bool, inputs: list
) -> Path | None:
    """The main process takes the output's lock and a staging directory for the run (the others write nothing); if
    it cannot, every process stops with its reason rather than waiting for it."""
    staging, error = None, None
    if accelerator.is_main_process:
        try:
            staging = stack.enter_context(staged_output(output, overwrite=overwrite, inputs=inputs))
        except OutputError as failure:
            error = str(failure)
    error = broadcast_object_list([error])[0]
    if error is not None:
        raise OutputError(error)
    return staging
