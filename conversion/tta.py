"""`wemoe-tta`: test-time adaptation of the routers on unlabeled task data (entropy minimisation), on accelerate.

Only router parameters train. Each step draws one batch per task (round-robin over every task, from shuffled,
endlessly cycling data) and minimises the mean Shannon entropy of each task's predicted distribution: over the
task's classes for CLIP; for T5, over the first decoded token, restricted to the task's label words when the model
has them.
Launchable unchanged with `accelerate launch` on several processes (DDP): every process takes an equal share of
each global batch.
"""

import argparse
import contextlib
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list, set_seed
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

from modeling_wemoe.modeling_wemoe import is_router_parameter

from .artifact import load_artifact_model, write_artifact
from .data import (
    TaskData,
    batch_indices,
    check_tasks_known,
    data_inputs,
    load_data_config,
    load_task_dataset,
    pixel_values_of,
)
from .outputs import OutputError, check_output_target, staged_output, write_file_atomically

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"
STEP_FILE = "wemoe_tta_step.json"
CARRIED_FILES = ("README.md", "merge_config.yaml")

EPILOG = """example DATA.yaml (labels are never read):
  tasks:
    eurosat: {path: tanganke/eurosat, split: test, image_column: image}
    shapes: {path: imagefolder, data_dir: ./data/shapes, split: train}
  for a T5 artifact:
  tasks:
    sst2: {path: glue, config_name: sst2, split: validation, text_column: sentence, prefix: "sst2 sentence: "}

examples:
  wemoe-tta ./clip-b32-ewemoe-8task data.yaml --output ./clip-b32-ewemoe-8task-tta
  wemoe-tta ./model data.yaml --output ./adapted --steps 2000 --checkpointing-steps 200 --resume
  accelerate launch --num_processes 4 -m conversion.tta ./model data.yaml --output ./adapted --mixed-precision bf16
"""


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of the softmax over the classes, one value per sample averaged over the batch."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(dim=-1).mean()


class TaskStream:
    """One task's unlabeled samples, served as the batch `batch_indices` picks for each step; a subclass turns rows
    into model inputs and says which logits adaptation takes the entropy of."""

    def __init__(self, dataset, column: str, batch_size: int, task: str):
        if len(dataset) < batch_size:
            raise ValueError(f"Task {task!r} has {len(dataset)} samples, fewer than the batch size {batch_size}.")
        self.dataset = dataset
        self.column = column
        self.batch_size = batch_size
        self.task = task

    def batch(
        self, seed: int, task_index: int, step: int, process_index: int, num_processes: int
    ) -> dict[str, torch.Tensor]:
        rows = batch_indices(len(self.dataset), self.batch_size, seed, task_index, step)[process_index::num_processes]
        return self.encode(self.dataset[rows][self.column], rows)

    def encode(self, values: list, rows: list[int]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def logits(self, model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class ImageTaskStream(TaskStream):
    """Images through the artifact's image processor; the entropy of the task's class distribution."""

    def __init__(self, dataset, spec: TaskData, image_processor, batch_size: int, task: str):
        super().__init__(dataset, spec.image_column, batch_size, task)
        self.image_processor = image_processor

    def encode(self, values: list, rows: list[int]) -> dict[str, torch.Tensor]:
        return {"pixel_values": pixel_values_of(values, rows, self.image_processor, self.task)}

    def logits(self, model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**inputs, task=self.task).logits


def label_token_ids(tokenizer, task: str, label_words: list[str]) -> list[int]:
    """The first token of each label word: what the first decoding step must choose between."""
    first_tokens = [tokenizer(word, add_special_tokens=False)["input_ids"][:1] for word in label_words]
    if any(not tokens for tokens in first_tokens):
        raise ValueError(f"Task {task!r}: a label word in {label_words} tokenizes to nothing.")
    ids = [tokens[0] for tokens in first_tokens]
    if len(set(ids)) != len(ids):
        raise ValueError(
            f"Task {task!r}: label words {label_words} do not differ in their first token ({ids}); the first "
            "decoding step cannot tell them apart."
        )
    return ids


class TextTaskStream(TaskStream):
    """Prompts (`prefix + text`) through the tokenizer; the entropy of the first decoded token, over the task's
    label words when it has them, else over the vocabulary."""

    def __init__(self, dataset, spec: TaskData, tokenizer, batch_size: int, task: str, label_words: list | None):
        super().__init__(dataset, spec.text_column, batch_size, task)
        self.tokenizer = tokenizer
        self.prefix = spec.prefix
        self.label_ids = label_token_ids(tokenizer, task, label_words) if label_words else None

    def encode(self, values: list, rows: list[int]) -> dict[str, torch.Tensor]:
        prompts = [self.prefix + str(value) for value in values]
        encoded = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def logits(self, model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        # A WEMoE config keeps T5's fields in `text_config`; a plain T5's are its own.
        start = (getattr(model.config, "text_config", None) or model.config).decoder_start_token_id
        decoder_input_ids = torch.full((inputs["input_ids"].shape[0], 1), start, device=inputs["input_ids"].device)
        logits = model(**inputs, decoder_input_ids=decoder_input_ids, use_cache=False).logits[:, 0]
        return logits if self.label_ids is None else logits[:, self.label_ids]


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
    trainable: Callable[[str], bool] = is_router_parameter,
    run_settings: Mapping | None = None,
):
    """Train the routers of `model` (or the parameters `trainable` names) on `tasks` (task name -> `TaskStream`) by
    entropy minimisation.

    Returns the unwrapped model. With `checkpoint_dir`, the routers, optimizer and RNG state are saved every
    `checkpointing_steps` and at the end; `resume` continues from the latest such checkpoint and ends with the
    same weights as an uninterrupted run with the same seed. Checkpoints record the learning rate, the seed and
    `run_settings` (batch size, data, ...); resuming with other values is refused.
    """
    run = {"lr": lr, "seed": seed, **(run_settings or {})}
    accelerator = accelerator or Accelerator(mixed_precision=mixed_precision, log_with=report_to)
    set_seed(seed)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(trainable(name))
    model.eval()  # no dropout: the gradient reaches the routers only, the forward stays the inference forward
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_save_state_pre_hook(keep_only(trainable))
    if report_to:
        accelerator.init_trackers("wemoe-tta", config={"steps": steps, "lr": lr, "seed": seed, "tasks": list(tasks)})

    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    start_step = 0
    if resume:
        checkpoint = resumable_checkpoint(checkpoint_dir, run)
        accelerator.load_state(str(checkpoint), strict=False)
        start_step = json.loads((checkpoint / STEP_FILE).read_text())["step"]
        logger.info("Resumed from %s at step %d", checkpoint, start_step)

    def save_checkpoint(step: int) -> None:
        target = checkpoint_dir / f"{CHECKPOINT_PREFIX}{step}"
        accelerator.save_state(str(target))
        if accelerator.is_main_process:
            # Written last and by a rename: a checkpoint with this file is complete, even if the run is killed here.
            write_file_atomically(target / STEP_FILE, json.dumps({"step": step, "run": run}).encode())
        accelerator.wait_for_everyone()

    progress = tqdm(
        range(start_step, steps),
        initial=start_step,
        total=steps,
        desc="TTA",
        unit="step",
        disable=not accelerator.is_local_main_process,
    )
    step_entropy = float("nan")
    for step in progress:
        step_loss = torch.zeros((), device=accelerator.device)
        for task_index, stream in enumerate(tasks.values()):
            inputs = stream.batch(seed, task_index, step, accelerator.process_index, accelerator.num_processes)
            last_task = task_index == len(tasks) - 1
            # One backward per task keeps one task's graph in memory; gradients are synchronised once per step.
            with accelerator.no_sync(model) if not last_task else contextlib.nullcontext():
                with accelerator.autocast():
                    logits = stream.logits(model, {key: value.to(accelerator.device) for key, value in inputs.items()})
                    loss = entropy_loss(logits) / len(tasks)
                accelerator.backward(loss)
            step_loss += loss.detach()
        optimizer.step()
        optimizer.zero_grad()
        # Each process saw its share of every batch: the mean over processes is the whole batch's entropy.
        step_entropy = accelerator.reduce(step_loss, reduction="mean").item()
        progress.set_postfix(entropy=f"{step_entropy:.4f}")
        if report_to:
            accelerator.log({"entropy": step_entropy}, step=step + 1)
        if checkpoint_dir is not None and (
            step + 1 == steps or (checkpointing_steps and (step + 1) % checkpointing_steps == 0)
        ):
            save_checkpoint(step + 1)
    if report_to:
        accelerator.end_training()
    if accelerator.is_main_process:
        logger.info(
            "Adapted for %d steps on %d process(es); mean entropy at the last step %.6f",
            steps,
            accelerator.num_processes,
            step_entropy,
        )
    return accelerator.unwrap_model(model)


def load_task_streams(data_config, model, processor, batch_size: int, num_processes: int) -> dict[str, TaskStream]:
    """A stream per task of the data config: images for a CLIP model (`processor` an image processor), prompts for a
    T5 model (`processor` its tokenizer)."""
    check_batch_size(batch_size, num_processes)
    is_text = model.config.text_config is not None
    datasets = load_task_datasets(data_config, list(model.config.tasks), is_text)
    return task_streams(datasets, processor, batch_size, is_text, model.config.task_labels)


def check_batch_size(batch_size: int, num_processes: int) -> None:
    if batch_size < 1:
        raise ValueError(f"--batch-size must be a positive number of samples per task, got {batch_size}.")
    if batch_size % num_processes:
        raise ValueError(f"--batch-size {batch_size} must be divisible by the number of processes ({num_processes}).")


def load_task_datasets(data_config, tasks: list[str], is_text: bool = False) -> dict[str, tuple]:
    """Each task's checked dataset and its spec (`(dataset, TaskData)`), for the tasks the data config names."""
    data_config = load_data_config(data_config)
    check_tasks_known(list(data_config.tasks), tasks)
    return {task: (load_task_dataset(task, spec, text=is_text), spec) for task, spec in data_config.tasks.items()}


def task_streams(
    datasets: Mapping[str, tuple],
    processor,
    batch_size: int,
    is_text: bool = False,
    label_words: Mapping[str, list[str]] | None = None,
) -> dict[str, TaskStream]:
    """A stream per task of `load_task_datasets`' result: images through an image processor, or prompts through a
    tokenizer with the task's label words."""
    streams = {}
    for task, (dataset, spec) in datasets.items():
        if is_text:
            streams[task] = TextTaskStream(dataset, spec, processor, batch_size, task, (label_words or {}).get(task))
        else:
            streams[task] = ImageTaskStream(dataset, spec, processor, batch_size, task)
    return streams


def data_fingerprint(datasets: Mapping[str, tuple]) -> dict:
    """What identifies the data a run adapts on: each task's spec, row count and `datasets` fingerprint."""
    return {
        task: {"spec": spec.model_dump(mode="json"), "rows": len(dataset), "fingerprint": dataset._fingerprint}
        for task, (dataset, spec) in datasets.items()
    }


def load_processor(model_dir: str | os.PathLike, model):
    """The artifact's tokenizer (T5) or image processor (CLIP)."""
    if model.config.text_config is not None:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)  # a tokenizer may name no class
    return AutoImageProcessor.from_pretrained(model_dir)


def adapt_artifact(
    model_dir: str | os.PathLike,
    data,
    output: str | os.PathLike,
    *,
    steps: int = 1000,
    lr: float = 1e-4,
    batch_size: int = 16,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpointing_steps: int | None = 100,
    resume: bool = False,
    mixed_precision: str = "no",
    report_to: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Adapt the artifact in `model_dir` on `data` (DATA.yaml path, dict or `DataConfig`) and save the result as a
    complete artifact in `output` (atomically, under a lock: see `conversion.outputs`). Checkpoints go to
    `checkpoint_dir` (default: `OUTPUT.checkpoints`). Everything that can be checked without the weights is checked
    before they are loaded: the settings, the output, the data (every image opened), a resume's settings."""
    check_training_settings(steps, lr, checkpointing_steps)
    checkpoint_dir = Path(checkpoint_dir or f"{output}.checkpoints")
    inputs = [model_dir, *data_inputs(data), checkpoint_dir]
    check_output_target(Path(output), overwrite, [path for path in inputs if Path(path).exists()])
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
    if config.model_type != "wemoe":
        raise ValueError(f"{str(model_dir)!r} is a {config.model_type!r} model; wemoe-tta adapts WEMoE artifacts.")
    accelerator = Accelerator(mixed_precision=mixed_precision, log_with=report_to)
    check_batch_size(batch_size, accelerator.num_processes)
    is_text = config.text_config is not None
    datasets = load_task_datasets(data, list(config.tasks), is_text)
    run_settings = {"model": model_identity(model_dir), "batch_size": batch_size, "data": data_fingerprint(datasets)}
    if resume:
        resumable_checkpoint(checkpoint_dir, {"lr": lr, "seed": seed, **run_settings})
    with contextlib.ExitStack() as stack:
        staging = lock_output_on_main_process(stack, accelerator, output, overwrite, inputs)
        model = load_artifact_model(model_dir)
        processor = load_processor(model_dir, model)
        streams = task_streams(datasets, processor, batch_size, is_text, config.task_labels)
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
        )
        if accelerator.is_main_process:
            source = Path(model_dir)
            carried = {name: (source / name).read_text() for name in CARRIED_FILES if (source / name).is_file()}
            write_artifact(model, staging, processor, extra_files=carried)
    accelerator.wait_for_everyone()
    return Path(output)


def check_training_settings(steps: int, lr: float, checkpointing_steps: int | None) -> None:
    if steps < 1:
        raise ValueError(f"--steps must be a positive number of optimizer steps, got {steps}.")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"--lr must be a positive number, got {lr}.")
    if checkpointing_steps is not None and checkpointing_steps < 1:
        raise ValueError(f"--checkpointing-steps must be a positive number of steps, got {checkpointing_steps}.")


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="wemoe-tta",
        description=__doc__.splitlines()[0].removeprefix("`wemoe-tta`: "),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model_dir", help="WEMoE artifact to adapt (local directory or Hub id).")
    parser.add_argument("data", type=Path, help="DATA.yaml: a datasets.load_dataset spec per task.")
    parser.add_argument("--output", required=True, type=Path, help="Directory for the adapted artifact.")
    parser.add_argument("--steps", type=int, default=1000, help="Optimizer steps (default: 1000).")
    parser.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default: 1e-4).")
    parser.add_argument("--batch-size", type=int, default=16, help="Global batch size per task (default: 16).")
    parser.add_argument("--seed", type=int, default=0, help="Seed for data order and router init (default: 0).")
    parser.add_argument(
        "--checkpointing-steps", type=int, default=100, help="Save a checkpoint every N steps (default: 100)."
    )
    parser.add_argument("--checkpoint-dir", default=None, help="Where checkpoints go (default: OUTPUT.checkpoints).")
    parser.add_argument("--resume", action="store_true", help="Continue from the latest checkpoint.")
    parser.add_argument(
        "--mixed-precision", choices=["no", "bf16", "fp16"], default="no", help="Autocast (default: no)."
    )
    parser.add_argument(
        "--report-to", default=None, help="An accelerate tracker (tensorboard, wandb, ...) for the loss."
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace OUTPUT if it exists.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        options = {key: value for key, value in vars(args).items() if key not in ("model_dir", "data", "output")}
        output = adapt_artifact(args.model_dir, args.data, args.output, **options)
    except (ValueError, OSError) as error:  # expected failures (bad input, files); anything else is a bug
        print(f"wemoe-tta: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    if PartialState().is_main_process:
        print(f"Wrote {output}")


if __name__ == "__main__":
    main()
