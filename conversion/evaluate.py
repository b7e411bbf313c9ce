"""`wemoe-eval`: per-task scores of a model on labeled task data, and optionally its model card's model-index.

Image classifiers: accuracy of a WEMoE CLIP artifact (adapted or not: a fresh conversion is task arithmetic), or of a
plain `CLIPModel` directory evaluated zero-shot with class names from each dataset's ClassLabel.
Text-to-text: a WEMoE T5 artifact, a plain T5 directory or a PEFT adapter over a T5 (its tokenizer saved beside it)
generates an answer per prompt (`prefix + text`), scored by exact match against the label (a ClassLabel's name, or
the label's text), or by Spearman correlation when the label column holds floats (regression tasks such as STS-B; an
answer that is not a number counts as 0).
"""

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from huggingface_hub import EvalResult, ModelCard
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    CLIPModel,
    PreTrainedConfig,
)

from .artifact import load_artifact_model
from .data import TaskData, check_tasks_known, load_data_config, load_task_dataset, pixel_values_of
from .heads import ZeroShotCLIP
from .outputs import write_file_atomically

logger = logging.getLogger(__name__)

# `datasets` loaders for local files: not a dataset's identity, so results name the task instead.
PACKAGED_BUILDERS = {"parquet", "imagefolder", "csv", "json", "arrow", "webdataset", "text"}

EPILOG = """example DATA.yaml:
  tasks:
    eurosat: {path: tanganke/eurosat, split: test, image_column: image, label_column: label}

  for a T5 model:
  tasks:
    sst2: {path: glue, config_name: sst2, split: validation, text_column: sentence, prefix: "sst2 sentence: "}
    stsb: {path: parquet, data_files: ./stsb.parquet, text_column: pair, prefix: "stsb ", label_column: score}

examples:
  wemoe-eval ./clip-b32-ewemoe-8task-tta data.yaml --output results.json --update-model-card
  wemoe-eval openai/clip-vit-base-patch32 data.yaml      # zero-shot baseline of a plain CLIPModel
  wemoe-eval ./flan-t5-base-wemoe-glue glue.yaml --max-new-tokens 8
  wemoe-eval ./flan-t5-base-sst2-lora glue.yaml          # one LoRA fine-tune, loaded over its base
"""


class EvaluationResults(dict):
    """Score per task and `"average"`; `metrics` names each task's metric, `task_type` the Hub task."""

    def __init__(self, scores: Mapping[str, float], metrics: Mapping[str, str], task_type: str):
        super().__init__(scores)
        self["average"] = sum(scores.values()) / len(scores)
        self.metrics = dict(metrics)
        self.task_type = task_type


def class_names_of(dataset, spec: TaskData) -> list[str] | None:
    from datasets import ClassLabel

    feature = dataset.features[spec.label_column]
    return list(feature.names) if isinstance(feature, ClassLabel) else None


def check_label_names(task: str, dataset_names: list[str] | None, model_names: list[str]) -> None:
    """Integer labels only mean the same classes when the dataset's ClassLabel names match the model's head."""
    if dataset_names is not None and dataset_names != model_names:
        raise ValueError(
            f"Task {task!r}: the dataset's classes {dataset_names} differ from the model's {model_names}; "
            "labels would be compared against the wrong classes."
        )


@torch.no_grad()
def task_predictions(model, task: str, dataset, spec: TaskData, image_processor, batch_size: int) -> torch.Tensor:
    """The predicted class of every sample, in dataset order."""
    device = next(model.parameters()).device
    predictions = []
    for start in tqdm(range(0, len(dataset), batch_size), desc=f"Evaluating {task}", unit="batch", leave=False):
        rows = list(range(start, min(start + batch_size, len(dataset))))
        pixel_values = pixel_values_of(dataset[rows][spec.image_column], rows, image_processor, task).to(device)
        logits = model(pixel_values, task=task).logits
        if not torch.isfinite(logits).all():
            raise ValueError(
                f"Task {task!r}: the model gives NaN or infinite logits (rows {rows[0]}-{rows[-1]}); its weights are "
                "broken, and its accuracy would mean nothing."
            )
        predictions.append(logits.argmax(dim=-1).cpu())
    return torch.cat(predictions)


def class_indices(task: str, labels: list, class_names: list[str]) -> tuple[torch.Tensor, int]:
    """The labels as class indices, and how many are -1 (the Hub's "no label"), which are left out of the score.
    Class names are accepted for indices; anything else outside the classes is an error."""
    if labels and all(isinstance(label, str) for label in labels):
        unknown = sorted({label for label in labels if label not in class_names})
        if unknown:
            raise ValueError(f"Task {task!r}: labels {unknown[:5]} are not among the classes {class_names}.")
        labels = [class_names.index(label) for label in labels]
    if not all(isinstance(label, int) and not isinstance(label, bool) for label in labels):
        kinds = sorted({type(label).__name__ for label in labels})
        raise ValueError(f"Task {task!r}: labels must be class indices or class names, got {kinds}.")
    indices = torch.tensor(labels, dtype=torch.long)
    out_of_range = indices[(indices < -1) | (indices >= len(class_names))].unique().tolist()
    if out_of_range:
        raise ValueError(
            f"Task {task!r}: labels {out_of_range[:5]} are outside the task's {len(class_names)} classes "
            f"(0-{len(class_names) - 1}, or -1 for unlabelled)."
        )
    return indices, int((indices == -1).sum())


def load_model_for_eval(model_dir: str, datasets: Mapping[str, object], data_config):
    """A WEMoE artifact as it is, or a plain CLIPModel wrapped zero-shot; with its image processor and class names."""
    image_processor = AutoImageProcessor.from_pretrained(model_dir)
    if AutoConfig.from_pretrained(model_dir, trust_remote_code=True).model_type == "clip":
        classnames = {}
        for task, dataset in datasets.items():
            names = class_names_of(dataset, data_config.tasks[task])
            if names is None:
                raise ValueError(f"Task {task!r}: a plain CLIP model needs a ClassLabel label column for class names.")
            classnames[task] = names
        clip = CLIPModel.from_pretrained(model_dir).eval()
        return ZeroShotCLIP(clip, AutoTokenizer.from_pretrained(model_dir), classnames), image_processor, classnames
    model = load_artifact_model(model_dir)
    check_tasks_known(list(datasets), list(model.config.tasks))
    return model, image_processor, model.config.task_labels


def model_config(model_dir: str | os.PathLike) -> PreTrainedConfig:
    """The model's config; for a PEFT adapter, which has none of its own, its base model's."""
    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
    except (OSError, ValueError) as error:
        from peft import PeftConfig

        try:
            base = PeftConfig.from_pretrained(str(model_dir)).base_model_name_or_path
        except (OSError, ValueError):
            raise error from None
        if not base:
            raise ValueError(f"{str(model_dir)!r} is a PEFT adapter that does not say its base model.") from None
        return AutoConfig.from_pretrained(base, trust_remote_code=True)


def is_text_model(config: PreTrainedConfig) -> bool:
    return config.model_type == "t5" or (config.model_type == "wemoe" and config.text_config is not None)


def evaluate(
    model_dir: str | os.PathLike,
    data,
    *,
    split: str | None = None,
    batch_size: int = 64,
    max_new_tokens: int = 16,
) -> EvaluationResults:
    """Scores per task and their average (`"average"`) on labeled data (a DATA.yaml path, dict or `DataConfig`):
    accuracy for image classifiers; exact match (or Spearman for float labels) for text-to-text models, which
    generate up to `max_new_tokens` tokens per answer."""
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"--batch-size and --max-new-tokens must be positive, got {batch_size} and {max_new_tokens}.")
    data_config = load_data_config(data)
    text = is_text_model(model_config(model_dir))
    datasets = {
        task: load_task_dataset(task, spec, split=split, need_labels=True, text=text)
        for task, spec in data_config.tasks.items()
    }
    if text:
        return evaluate_text(str(model_dir), datasets, data_config, batch_size, max_new_tokens)
    model, image_processor, model_labels = load_model_for_eval(str(model_dir), datasets, data_config)
    results = {}
    for task, dataset in datasets.items():
        spec = data_config.tasks[task]
        class_names = list(model_labels[task])
        check_label_names(task, class_names_of(dataset, spec), class_names)
        labels, unlabelled = class_indices(task, dataset[spec.label_column], class_names)
        if unlabelled == len(dataset):
            raise ValueError(f"Task {task!r}: every sample is unlabelled (-1); there is nothing to score.")
        if unlabelled:
            logger.warning("%s: %d unlabelled samples (label -1) left out of the accuracy.", task, unlabelled)
        predictions = task_predictions(model, task, dataset, spec, image_processor, batch_size)
        labelled = labels != -1
        results[task] = int((predictions[labelled] == labels[labelled]).sum()) / int(labelled.sum())
        logger.info("%s: accuracy %.4f on %d samples", task, results[task], int(labelled.sum()))
    return EvaluationResults(results, dict.fromkeys(results, "accuracy"), "image-classification")


@torch.no_grad()
def generated_answers(model, tokenizer, dataset, spec: TaskData, batch_size: int, max_new_tokens: int) -> list[str]:
    """The model's greedy answer to every prompt, in dataset order."""
    device = next(model.parameters()).device
    answers = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="Generating", unit="batch", leave=False):
        prompts = [spec.prefix + str(text) for text in dataset[start : start + batch_size][spec.text_column]]
        inputs = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(device)
        output_ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        answers.extend(answer.strip() for answer in tokenizer.batch_decode(output_ids, skip_special_tokens=True))
    return answers


def is_regression(dataset, spec: TaskData) -> bool:
    from datasets import Value

    feature = dataset.features[spec.label_column]
    return isinstance(feature, Value) and feature.dtype.startswith("float")


def parse_number(answer: str) -> float:
    try:
        return float(answer)
    except ValueError:
        return 0.0


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks from 0, tied values sharing the mean of their ranks (as Spearman's correlation needs)."""
    ranks = torch.empty_like(values)
    ranks[values.argsort()] = torch.arange(len(values), dtype=values.dtype)
    _, groups = values.unique(return_inverse=True)
    rank_sums = torch.zeros(int(groups.max()) + 1, dtype=values.dtype).index_add_(0, groups, ranks)
    return (rank_sums / groups.bincount().to(values.dtype))[groups]


def spearman(answers: list[str], targets: list[float]) -> float:
    """Spearman correlation of the answers read as numbers with the targets; 0 when either side is constant (the
    correlation is undefined there, and a model that always gives the same score has no ranking skill)."""
    predicted = average_ranks(torch.tensor([parse_number(a) for a in answers], dtype=torch.float64))
    expected = average_ranks(torch.tensor(targets, dtype=torch.float64))
    predicted, expected = predicted - predicted.mean(), expected - expected.mean()
    scale = predicted.norm() * expected.norm()
    return 0.0 if scale == 0 else float(predicted @ expected / scale)


def text_targets(dataset, spec: TaskData) -> list[str]:
    names = class_names_of(dataset, spec)
    labels = dataset[spec.label_column]
    return [names[label] for label in labels] if names is not None else [str(label).strip() for label in labels]


def evaluate_text(model_dir: str, datasets: Mapping, data_config, batch_size: int, max_new_tokens: int):
    model = load_artifact_model(model_dir, AutoModelForSeq2SeqLM)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)  # a tokenizer may name no class
    model_tasks = getattr(model.config, "tasks", None)
    if model_tasks is not None:
        check_tasks_known(list(datasets), list(model_tasks))
    label_words = getattr(model.config, "task_labels", None) or {}
    scores, metrics = {}, {}
    for task, dataset in datasets.items():
        spec = data_config.tasks[task]
        if task in label_words:
            check_label_names(task, class_names_of(dataset, spec), list(label_words[task]))
        answers = generated_answers(model, tokenizer, dataset, spec, batch_size, max_new_tokens)
        if is_regression(dataset, spec):
            metrics[task], scores[task] = "spearmanr", spearman(answers, dataset[spec.label_column])
        else:
            targets = text_targets(dataset, spec)
            metrics[task] = "exact_match"
            scores[task] = sum(a == t for a, t in zip(answers, targets, strict=True)) / len(dataset)
        logger.info("%s: %s %.4f on %d samples", task, metrics[task], scores[task], len(dataset))
    return EvaluationResults(scores, metrics, "text2text-generation")


def update_model_card(model_dir: Path, results: EvaluationResults, data_config, split: str | None) -> None:
    """Write the scores into the artifact's README.md as model-index results (replaced atomically)."""
    card_path = model_dir / "README.md"
    card = ModelCard.load(card_path) if card_path.is_file() else ModelCard("---\n---\n")
    card.data.model_name = card.data.model_name or model_dir.name
    card.data.eval_results = [
        EvalResult(
            task_type=results.task_type,
            dataset_type=task if spec.path in PACKAGED_BUILDERS else spec.path,
            dataset_name=task,
            dataset_config=spec.config_name,
            dataset_split=split or spec.split,
            metric_type=results.metrics[task],
            metric_value=results[task],
        )
        for task, spec in data_config.tasks.items()
    ]
    write_file_atomically(card_path, str(card).encode())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="wemoe-eval",
        description=__doc__.splitlines()[0].removeprefix("`wemoe-eval`: "),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "model_dir", help="A WEMoE artifact, a plain CLIPModel (zero-shot) or T5 directory, or a T5's PEFT adapter."
    )
    parser.add_argument("data", type=Path, help="DATA.yaml with a label column per task.")
    parser.add_argument("--split", default=None, help="Override every task's split (e.g. test).")
    parser.add_argument("--batch-size", type=int, default=64, help="Evaluation batch size (default: 64).")
    parser.add_argument(
        "--max-new-tokens", type=int, default=16, help="Text-to-text models: answer length limit (default: 16)."
    )
    parser.add_argument("--output", type=Path, default=None, help="Write the results as JSON here.")
    parser.add_argument("--update-model-card", action="store_true", help="Record the results in MODEL_DIR/README.md.")
    return parser.parse_args(argv)


def check_writable_outputs(args: argparse.Namespace) -> None:
    """Where the results go must be writable before anything is evaluated."""
    if args.output is not None:
        parent = args.output.parent
        if not parent.is_dir():
            raise ValueError(f"--output {str(args.output)!r}: directory {str(parent)!r} does not exist.")
        if args.output.is_dir() or not os.access(parent, os.W_OK):
            raise ValueError(f"--output {str(args.output)!r} cannot be written.")
    if args.update_model_card:
        model_dir = Path(args.model_dir)
        if not model_dir.is_dir():
            raise ValueError(
                f"--update-model-card writes the card of a local artifact; {str(model_dir)!r} is not a directory."
            )
        if not os.access(model_dir, os.W_OK):
            raise ValueError(f"--update-model-card: {str(model_dir)!r} is not writable.")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        check_writable_outputs(args)
        results = evaluate(
            args.model_dir,
            args.data,
            split=args.split,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
        )
        if args.update_model_card:
            update_model_card(Path(args.model_dir), results, load_data_config(args.data), args.split)
    except (ValueError, OSError) as error:  # expected failures (bad input, files); anything else is a bug
        print(f"wemoe-eval: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    for task, accuracy in results.items():
        print(f"{task:<24} {100 * accuracy:6.2f}")
    if args.output:
        args.output.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
