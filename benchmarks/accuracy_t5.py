"""Offline T5 accuracy benchmark: the paper's Flan-T5 comparison at small scale, on six real text tasks, end to end.

1. Real corpora that install offline (nothing from the Hub):
   - VADER's ground truth (the vaderSentiment 3.3.2 sdist from PyPI, fetched into the cache by `pip download`):
     human sentiment ratings (-4..+4) of movie-review, tweet, NYT-editorial and Amazon-review snippets;
   - Debian's `fortunes` (quotes in topic files) and `wordnet-base` (noun glosses with their semantic category):
     `apt-get install fortunes wordnet-base`.
2. A unigram tokenizer trained with the `tokenizers` library, and a small Flan-T5-style model (gated-gelu, its own
   lm_head, 4+4 layers, d_model 128) pre-trained with T5's span corruption on the corpora's text outside every
   test split, then instruction-tuned, as Flan-T5 was, on held-out tasks with other label words (other fortune
   topics, other WordNet categories, the domain of a neutral VADER snippet): the base answers a prompt with a word
   but knows none of the benchmark's tasks.
3. One full fine-tune and one LoRA fine-tune (peft, rank 16, every linear layer) per task, text-to-text with short
   label words, saved as an ordinary T5 checkpoint and an ordinary PEFT adapter.
4. `wemoe-convert` (architecture t5), `wemoe-tta` and `wemoe-eval` run on them exactly as a user would (their
   `main(argv)`): task arithmetic, TIES and layer-wise AdaMerging (`variant: static`), WEMoE, E-WEMoE keep 0.1, and
   over the LoRA adapters task arithmetic and WEMoE with low-rank experts (the adapters' own factors). The
   pre-trained model and each fine-tune (full and LoRA) are scored as they are. Answers are greedy generations
   (batched, with the KV cache) compared with the label word: exact match.

Tasks ("prefix text" -> label word):
  movies    movie-review snippet sentiment   negative / positive    VADER (|rating| < 1 dropped as neutral)
  tweets    tweet sentiment                  negative / positive    VADER
  nyt       NYT editorial snippet sentiment  negative / positive    VADER
  amazon    Amazon review snippet sentiment  negative / positive    VADER
  fortunes  fortune-cookie quote topic       computers / politics / science / work / poems     fortunes
  wordnet   noun gloss -> semantic category  animal / artifact / body / food / location / person / plant /
                                             substance (balanced)                                wordnet-base

Every stage is cached under --cache (delete a stage's directory, or pass --fresh, to recompute it).

    pip install -e ".[benchmarks]" && apt-get install -y fortunes wordnet-base
    python benchmarks/accuracy_t5.py --fresh              # about 21 minutes on 2 CPU cores
    python benchmarks/accuracy_t5.py --tiny --cache /tmp/acc_t5 --results /tmp/acc_t5/results   # CI-sized check
"""

import io
import logging
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
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
from transformers import (
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

logger = logging.getLogger("accuracy_t5")

VADER_SDIST = "vaderSentiment==3.3.2"
VADER_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
VADER_FILES = {
    "movies": "movieReviewSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
}
NEUTRAL_BAND = 1.0  # VADER ratings with |mean rating| below this are neither clearly negative nor positive
FORTUNE_DIRS = (Path("/usr/share/games/fortunes"), Path("/usr/share/fortunes"))
FORTUNE_TOPICS = {"computers": "computers", "politics": "politics", "science": "science", "work": "work",
                  "songs-poems": "poems"}  # fmt: skip
WORDNET_NOUNS = Path("/usr/share/wordnet/data.noun")
# WordNet's noun lexicographer files, numbered from 3 (noun.Tops) as in its `lexnames`.
WORDNET_LEXNAMES = ("Tops act animal artifact attribute body cognition communication event feeling food group location "
                    "motive object person phenomenon plant possession process quantity relation shape state substance "
                    "time").split()  # fmt: skip
WORDNET_CATEGORIES = ["animal", "artifact", "body", "food", "location", "person", "plant", "substance"]
# Held-out instruction-tuning tasks (Flan-style): other label words, other categories, no benchmark test text.
INSTRUCTION_FORTUNE_TOPICS = ["art", "drugs", "education", "kids", "law", "literature", "love", "medicine", "pets",
                              "sports"]  # fmt: skip
INSTRUCTION_CATEGORIES = ["act", "attribute", "cognition", "communication", "event", "feeling", "group", "object",
                          "possession", "quantity", "state", "time"]  # fmt: skip
DOMAIN_WORDS = {"movies": "movie", "tweets": "tweet", "nyt": "news", "amazon": "product"}
TRAINER_DIR = Path(tempfile.gettempdir()) / "wemoe_accuracy_t5_trainer"  # Trainer's output_dir; nothing is saved there
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in T5
SENTINELS = [f"<extra_id_{i}>" for i in range(32)]


@dataclass(frozen=True)
class Scale:
    """How much data, model and training each stage gets: the full benchmark or the CI-sized pipeline check."""

    samples_per_task: int  # labeled texts per task (test first, then fine-tuning)
    test_per_task: int
    pretrain_texts: int  # cap on the unlabeled pre-training texts
    vocab_size: int
    d_model: int
    layers: int
    pretrain_steps: int
    instruction_steps: int
    finetune_steps: int
    lora_steps: int
    tta_steps: int
    batch_size: int = 32
    tta_batch_size: int = 8
    max_input_tokens: int = 48
    instruction_per_task: int = 3000


FULL = Scale(samples_per_task=3300, test_per_task=300, pretrain_texts=30000, vocab_size=4000, d_model=128, layers=4,
             pretrain_steps=300, instruction_steps=300, finetune_steps=200, lora_steps=200, tta_steps=100)  # fmt: skip
TINY = Scale(samples_per_task=40, test_per_task=12, pretrain_texts=400, vocab_size=1000, d_model=32, layers=2,
             pretrain_steps=3, instruction_steps=2, finetune_steps=2, lora_steps=2, tta_steps=2, batch_size=4,
             tta_batch_size=4, instruction_per_task=60)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------- data
@dataclass
class TextTask:
    """A labeled text task and the unlabeled text that comes with its corpus (pre-training only)."""

    prefix: str
    label_words: list[str]
    texts: list[str]
    labels: np.ndarray
    unlabeled: list[str]


def one_line(text: str) -> str:
    return " ".join(text.split())


def vader_ratings(downloads: Path) -> dict[str, list[tuple[float, str]]]:
    """(mean human rating, snippet) per VADER domain, read from the sdist (fetched by `pip download` when absent)."""
    sdist = downloads / "vaderSentiment-3.3.2.tar.gz"
    if not sdist.is_file():
        logger.info("Fetching the %s sdist (VADER's rated snippets) from PyPI", VADER_SDIST)
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                   VADER_SDIST, "--dest", str(downloads)]  # fmt: skip
        if subprocess.run(command).returncode != 0 or not sdist.is_file():
            raise RuntimeError(f"`{' '.join(command)}` did not produce {sdist}: the VADER corpus needs PyPI access.")
    with tarfile.open(sdist) as outer:
        inner = outer.extractfile(VADER_ARCHIVE).read()
    ratings = {}
    with tarfile.open(fileobj=io.BytesIO(inner)) as archive:
        for domain, name in VADER_FILES.items():
            lines = archive.extractfile(f"hutto_ICWSM_2014/{name}").read().decode("utf-8", "replace").splitlines()
            rows = [line.split("\t") for line in lines if line.strip()]
            ratings[domain] = [(float(rating), one_line(text)) for _, rating, text in rows]
    return ratings


def sentiment_task(prefix: str, rated: list[tuple[float, str]]) -> TextTask:
    kept = [(rating, text) for rating, text in rated if abs(rating) >= NEUTRAL_BAND]
    neutral = [text for rating, text in rated if abs(rating) < NEUTRAL_BAND]
    labels = np.array([int(rating > 0) for rating, _ in kept])
    return TextTask(prefix, ["negative", "positive"], [text for _, text in kept], labels, neutral)


def installed(candidates: tuple[Path, ...] | Path, package: str) -> Path:
    for path in (candidates,) if isinstance(candidates, Path) else candidates:
        if path.exists():
            return path
    raise FileNotFoundError(f"{candidates} not found: install Debian's `{package}` (apt-get install -y {package}).")


def fortune_quotes() -> list[tuple[str, str]]:
    """(topic file, quote) for every quote of Debian's fortunes."""
    quotes = []
    for path in sorted(installed(FORTUNE_DIRS, "fortunes").iterdir()):
        if path.suffix or not path.is_file():  # the .dat indexes and .u8 links
            continue
        texts = [one_line(q) for q in path.read_text(encoding="utf-8", errors="replace").split("\n%\n")]
        quotes += [(path.name, text) for text in texts if text]
    return quotes


def wordnet_glosses() -> list[tuple[str, str]]:
    """(semantic category, definition) for every noun synset of WordNet."""
    glosses = []
    for line in installed(WORDNET_NOUNS, "wordnet-base").read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith(" ") or " | " not in line:  # the licence header
            continue
        category = WORDNET_LEXNAMES[int(line.split(" ", 2)[1]) - 3]
        glosses.append((category, line.split(" | ", 1)[1].split(";")[0].strip()))  # the gloss before its examples
    return glosses


def category_task(prefix: str, items: list[tuple[str, str]], label_words: dict[str, str]) -> TextTask:
    """The (category, text) items whose category has a label word; the others are the task's unlabeled text."""
    categories = list(label_words)
    labeled = [(categories.index(category), text) for category, text in items if category in label_words]
    unlabeled = [text for category, text in items if category not in label_words]
    labels = np.array([label for label, _ in labeled])
    return TextTask(prefix, list(label_words.values()), [text for _, text in labeled], labels, unlabeled)


TASKS = ["movies", "tweets", "nyt", "amazon", "fortunes", "wordnet"]
PREFIXES = {"movies": "movie review:", "tweets": "tweet:", "nyt": "editorial:", "amazon": "product review:"}
BALANCED = {"fortunes", "wordnet"}  # many classes of very different sizes: sample each class equally


def load_tasks(downloads: Path) -> tuple[dict[str, TextTask], dict[str, TextTask]]:
    """The benchmark's tasks, and the held-out tasks the base model is instruction-tuned on (as Flan-T5 was): other
    fortune topics, other WordNet categories, and which domain a neutral VADER snippet comes from."""
    ratings, quotes, glosses = vader_ratings(downloads), fortune_quotes(), wordnet_glosses()
    tasks = {domain: sentiment_task(PREFIXES[domain], ratings[domain]) for domain in VADER_FILES}
    tasks["fortunes"] = category_task("fortune topic:", quotes, FORTUNE_TOPICS)
    tasks["wordnet"] = category_task("gloss category:", glosses, {name: name for name in WORDNET_CATEGORIES})
    neutral = [(domain, text) for domain, rated in ratings.items() for rating, text in rated
               if abs(rating) < NEUTRAL_BAND]  # fmt: skip
    instruction = {
        "quote topic": category_task("quote topic:", quotes, {name: name for name in INSTRUCTION_FORTUNE_TOPICS}),
        "noun category": category_task("noun category:", glosses, {name: name for name in INSTRUCTION_CATEGORIES}),
        "domain": category_task("domain:", neutral, DOMAIN_WORDS),
    }
    return tasks, instruction


@dataclass
class TaskSplits:
    test: list[int]
    train: list[int]


def balanced_sample(task: TextTask, candidates, count: int, rng: np.random.Generator) -> np.ndarray:
    """Up to `count` of the candidate indices, equally many of each class, in random order."""
    candidates = np.asarray(list(candidates))
    per_class = count // len(task.label_words)
    chosen = [rng.permutation(candidates[task.labels[candidates] == label])[:per_class]
              for label in range(len(task.label_words))]  # fmt: skip
    return rng.permutation(np.concatenate(chosen))


def split_task(task: TextTask, balanced: bool, scale: Scale, rng: np.random.Generator) -> TaskSplits:
    """A seeded sample of `samples_per_task` texts (equally many per class when `balanced`): test first."""
    if balanced:
        order = balanced_sample(task, range(len(task.texts)), scale.samples_per_task, rng)
    else:
        order = rng.permutation(len(task.texts))[: scale.samples_per_task]
    return TaskSplits(order[: scale.test_per_task].tolist(), order[scale.test_per_task :].tolist())


def split_tasks(tasks: dict[str, TextTask], scale: Scale, seed: int) -> dict[str, TaskSplits]:
    return {name: split_task(tasks[name], name in BALANCED, scale, np.random.default_rng(seed + index))
            for index, name in enumerate(TASKS)}  # fmt: skip


def texts_in_test_splits(tasks: dict[str, TextTask], splits: dict[str, TaskSplits]) -> set[str]:
    return {tasks[name].texts[i] for name, split in splits.items() for i in split.test}


def pretraining_texts(tasks: dict[str, TextTask], splits: dict[str, TaskSplits], cap: int, seed: int) -> list[str]:
    """The corpora's text (labels never used) without any text that is in a test split, shuffled, at most `cap`."""
    held_out = texts_in_test_splits(tasks, splits)
    texts = [text for task in tasks.values() for text in task.texts + task.unlabeled if text not in held_out]
    order = np.random.default_rng(seed).permutation(len(texts))[:cap]
    return [texts[i] for i in order]


def write_test_split(path: Path, task: TextTask, indices: list[int]) -> None:
    from datasets import ClassLabel, Dataset, Features, Value

    features = Features({"text": Value("string"), "label": ClassLabel(names=task.label_words)})
    rows = {"text": [task.texts[i] for i in indices], "label": task.labels[indices].tolist()}
    Dataset.from_dict(rows, features=features).to_parquet(path)


# ----------------------------------------------------------------------------------------------------- model
def train_tokenizer(texts: list[str], label_words: list[str], scale: Scale) -> PreTrainedTokenizerFast:
    """A lower-cased unigram tokenizer with T5's special ids (pad 0, eos 1, unk 2), sentinels, `</s>` appended. Each
    label word is one token of its own (a whole-word added token), so that the first decoding step decides the answer
    whatever pieces the small vocabulary would cut it into."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.Unigram())
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=scale.vocab_size, special_tokens=SPECIAL_TOKENS + SENTINELS, unk_token="<unk>"
    )
    backend.train_from_iterator(texts, trainer)
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens=SENTINELS,
        model_max_length=scale.max_input_tokens,
    )
    tokenizer.add_tokens([AddedToken(word, single_word=True, normalized=True) for word in label_words])
    return tokenizer


def small_t5_config(vocab_size: int, scale: Scale) -> T5Config:
    """Flan-T5's layout (gated-gelu, untied lm_head) at small size."""
    return T5Config(
        vocab_size=vocab_size,
        d_model=scale.d_model,
        d_kv=32 if scale.d_model >= 128 else 8,
        d_ff=4 * scale.d_model,
        num_layers=scale.layers,
        num_decoder_layers=scale.layers,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )


def random_segmentation(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """`parts` positive lengths summing to `total`."""
    cuts = np.sort(rng.choice(np.arange(1, total), parts - 1, replace=False)) if parts > 1 else np.array([], int)
    return np.diff(np.concatenate([[0], cuts, [total]]))


def span_corruption(
    ids: list[int], sentinel_ids: list[int], rng: np.random.Generator, density: float = 0.15, mean_span: float = 3.0
) -> tuple[list[int], list[int]]:
    """T5's objective: about `density` of the tokens, in spans of mean length `mean_span`, are each replaced by a
    sentinel in the input; the target lists every sentinel followed by the tokens it hides."""
    noise = min(max(1, round(len(ids) * density)), len(ids) - 1)
    spans = max(1, min(round(noise / mean_span), len(ids) - noise, len(sentinel_ids)))
    noise_lengths = random_segmentation(noise, spans, rng)
    keep_lengths = random_segmentation(len(ids) - noise, spans, rng)
    inputs, targets, position = [], [], 0
    for span, (keep, hide) in enumerate(zip(keep_lengths, noise_lengths, strict=True)):
        inputs += ids[position : position + keep] + [sentinel_ids[span]]
        position += keep
        targets += [sentinel_ids[span]] + ids[position : position + hide]
        position += hide
    return inputs + [1], targets + [1]  # 1: </s>


class SpanCorruptionData(torch.utils.data.Dataset):
    """Pre-training chunks of `length` tokens from the text stream, freshly corrupted each time one is read."""

    def __init__(self, chunks: list[list[int]], sentinel_ids: list[int], seed: int):
        self.chunks, self.sentinel_ids = chunks, sentinel_ids
        self.rng = np.random.default_rng(seed)  # read in order by one process (num_workers=0): reproducible

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        inputs, targets = span_corruption(self.chunks[index], self.sentinel_ids, self.rng)
        return {"input_ids": inputs, "labels": targets}


def token_chunks(texts: list[str], tokenizer, length: int) -> list[list[int]]:
    """The texts' tokens (no `</s>`) concatenated and cut into chunks of `length`: no padding is trained on."""
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]  # long texts are cut here
    stream = [token for text_ids in ids for token in text_ids]
    return [stream[start : start + length] for start in range(0, len(stream) - length + 1, length)]


class PromptAnswers(torch.utils.data.Dataset):
    """Fine-tuning pairs: "prefix text" (truncated as evaluation truncates it) -> the label word."""

    def __init__(self, task: TextTask, indices: list[int], tokenizer):
        prompts = [f"{task.prefix} {task.texts[i]}" for i in indices]
        self.inputs = tokenizer(prompts, truncation=True)["input_ids"]
        answers = tokenizer(task.label_words)["input_ids"]
        self.targets = [answers[task.labels[i]] for i in indices]

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return {"input_ids": self.inputs[index], "labels": self.targets[index]}


def train_text_to_text(model, tokenizer, data, steps: int, lr: float, scale: Scale, seed: int) -> None:
    """Every training stage: (input ids, target ids) pairs padded per batch, padded targets left out of the loss."""
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    train(model, data, steps, lr, scale.batch_size, TRAINER_DIR, seed, collator)


def pretrain(texts: list[str], label_words: list[str], scale: Scale, seed: int):
    """A tokenizer trained on `texts` and a T5 pre-trained on them with span corruption."""
    tokenizer = train_tokenizer(texts, label_words, scale)
    chunks = token_chunks(texts, tokenizer, scale.max_input_tokens)
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(small_t5_config(len(tokenizer), scale))
    logger.info("Pre-training T5 (%s parameters) with span corruption on %d chunks of %d tokens from %d texts",
                f"{model.num_parameters():,}", len(chunks), scale.max_input_tokens, len(texts))  # fmt: skip
    data = SpanCorruptionData(chunks, tokenizer.convert_tokens_to_ids(SENTINELS), seed)
    train_text_to_text(model, tokenizer, data, scale.pretrain_steps, 5e-4, scale, seed)
    return model, tokenizer


def instruction_examples(instruction: dict[str, TextTask], held_out: set[str], per_task: int, seed: int):
    """Each instruction task's chosen examples: a balanced sample of at most `per_task`, no `held_out` text."""
    rng = np.random.default_rng(seed)
    examples = {}
    for name, task in instruction.items():
        candidates = [i for i, text in enumerate(task.texts) if text not in held_out]
        examples[name] = balanced_sample(task, candidates, per_task, rng).tolist()
    return examples


def instruction_tune(model, tokenizer, instruction: dict[str, TextTask], held_out: set[str], scale: Scale, seed: int):
    """Flan's second stage at small scale: prompt -> label word on the held-out tasks, none of the benchmark's test
    texts among them, so the base already answers prompts with a word (as Flan-T5 does) but knows no benchmark task."""
    parts = []
    for name, indices in instruction_examples(instruction, held_out, scale.instruction_per_task, seed).items():
        logger.info("Instruction tuning on %s: %d prompts, label words %s", name, len(indices),
                    instruction[name].label_words)  # fmt: skip
        parts.append(PromptAnswers(instruction[name], indices, tokenizer))
    data = torch.utils.data.ConcatDataset(parts)
    train_text_to_text(model, tokenizer, data, scale.instruction_steps, 1e-3, scale, seed)


def finetune(base_dir: Path, task: TextTask, split: TaskSplits, scale: Scale, directory: Path, lora: bool, seed: int):
    """A full fine-tune (every weight) or a LoRA adapter (rank 16 on every linear layer of the stacks)."""
    from peft import LoraConfig, get_peft_model

    model = T5ForConditionalGeneration.from_pretrained(base_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if lora:
        targets = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets, task_type="SEQ_2_SEQ_LM"))
    steps, lr = (scale.lora_steps, 2e-3) if lora else (scale.finetune_steps, 1e-3)
    train_text_to_text(model, tokenizer, PromptAnswers(task, split.train, tokenizer), steps, lr, scale, seed)
    save_atomically(directory, model.eval(), tokenizer)


# ----------------------------------------------------------------------------------------------------- the runs
SCORED_AS_THEY_ARE = ["pre-trained", "individual fine-tunes", "individual LoRA fine-tunes"]
METHODS = {  # row -> its experts ("full" fine-tunes or "lora" adapters) and the recipe fields it sets
    "task arithmetic": ("full", {"variant": "static", "static_merge": {"method": "task_arithmetic", "scaling": 0.3}}),
    "TIES": ("full", {"variant": "static", "static_merge": {"method": "ties", "scaling": 0.3, "density": 0.2}}),
    "AdaMerging (layer-wise)": ("full", {"variant": "static", "static_merge": {"method": "adamerging"}}),
    "WEMoE": ("full", {"variant": "wemoe"}),
    "E-WEMoE keep=0.1": ("full", {"variant": "e-wemoe", "keep": 0.1}),
    "task arithmetic, LoRA experts": ("lora", {"variant": "static",
                                               "static_merge": {"method": "task_arithmetic", "scaling": 0.3}}),
    "WEMoE, LoRA experts (r=16)": ("lora", {"variant": "wemoe", "expert_format": "lowrank", "rank": 16}),
}  # fmt: skip
EVAL_ARGS = ("--max-new-tokens", "4", "--batch-size", "64")


def count_parameters(model_dir: Path, method: str) -> tuple[int, int]:
    """(trainable at test time, total) parameters of a method's model."""
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir, trust_remote_code=True)
    if hasattr(model, "parameter_report"):
        report = model.parameter_report()
        return report["trainable_parameters"], report["total_parameters"]
    # Layer-wise AdaMerging trains one coefficient per tensor and task (the stacks' embedding copies excepted).
    tensors = sum(1 for key in model.state_dict() if not key.endswith("embed_tokens.weight"))
    return (tensors * len(TASKS) if method.startswith("AdaMerging") else 0), model.num_parameters()


def score_each_alone(checkpoints: dict[str, Path], data: dict, cache: Path, kind: str) -> dict[str, float]:
    """Each task's own fine-tune (or adapter) on its own task."""
    scores = {}
    for task in TASKS:
        one_task = write_yaml({"tasks": {task: data["tasks"][task]}}, cache / f"data_{task}.yaml")
        output = cache / "eval" / f"{kind}_{task}.json"
        scores[task] = evaluate_dir(checkpoints[f"{kind}/{task}"], one_task, output, EVAL_ARGS)[task]
    return {**scores, "average": sum(scores.values()) / len(TASKS)}


def run_methods(cache: Path, checkpoints: dict[str, Path], data: dict, labels: dict, scale: Scale, seed: int) -> dict:
    data_yaml = write_yaml(data, cache / "data.yaml")
    pretrained = evaluate_dir(checkpoints["base"], data_yaml, cache / "eval" / "pretrained.json", EVAL_ARGS)
    results = {"pre-trained": {"scores": pretrained, "parameters": (0, None)}}
    for method, kind in zip(SCORED_AS_THEY_ARE[1:], ("full", "lora"), strict=True):
        results[method] = {"scores": score_each_alone(checkpoints, data, cache, kind), "parameters": (0, None)}
    adaptation = Adaptation(scale.tta_steps, scale.tta_batch_size, seed=seed)
    for method, (kind, fields) in METHODS.items():
        recipe = {
            "base_model": str(checkpoints["base"]),
            "architecture": "t5",
            "router": {"hidden_layers": 2, "init_lambda": 0.3},
            "tasks": [
                {"name": task, "model": str(checkpoints[f"{kind}/{task}"]), "classnames": labels[task]}
                for task in TASKS
            ],  # fmt: skip
            **fields,
        }
        scored = convert_and_adapt(cache, method, recipe, data_yaml, adaptation)
        scores = evaluate_dir(scored, data_yaml, cache / "eval" / f"{method_slug(method)}.json", EVAL_ARGS)
        results[method] = {"scores": scores, "parameters": count_parameters(scored, method), "model": str(scored)}
    return results


# --------------------------------------------------------------------------------------------------------- main
def build_checkpoints(cache: Path, scale: Scale, seed: int) -> tuple[dict[str, Path], dict, dict]:
    """Data splits (test splits written as parquet), the pre-trained T5 and a full and a LoRA fine-tune per task,
    all cached. Returns the checkpoints, the data config and each task's label words."""
    tasks, instruction = load_tasks(cache / "downloads")
    splits = split_tasks(tasks, scale, seed)
    (cache / "data").mkdir(parents=True, exist_ok=True)
    data = {"tasks": {}}
    for name in TASKS:
        path = cache / "data" / f"{name}_test.parquet"
        if not path.is_file():
            write_test_split(path, tasks[name], splits[name].test)
        data["tasks"][name] = {"path": "parquet", "data_files": str(path), "split": "train", "text_column": "text",
                               "label_column": "label", "prefix": tasks[name].prefix + " "}  # fmt: skip
        logger.info("%s: %d fine-tuning, %d test texts; label words %s", name, len(splits[name].train),
                    len(splits[name].test), tasks[name].label_words)  # fmt: skip
    checkpoints = {"base": cache / "checkpoints" / "base"}
    if not checkpoints["base"].is_dir():
        texts = pretraining_texts({**tasks, **instruction}, splits, scale.pretrain_texts, seed)
        label_words = sorted({word for task in [*tasks.values(), *instruction.values()] for word in task.label_words})
        model, tokenizer = pretrain(texts, label_words, scale, seed)
        instruction_tune(model, tokenizer, instruction, texts_in_test_splits(tasks, splits), scale, seed)
        model.generation_config.decoder_start_token_id = model.config.decoder_start_token_id
        save_atomically(checkpoints["base"], model.eval(), tokenizer)
    for kind in ("full", "lora"):
        for name in TASKS:
            checkpoints[f"{kind}/{name}"] = cache / "checkpoints" / kind / name
            if not checkpoints[f"{kind}/{name}"].is_dir():
                logger.info("Fine-tuning (%s) on %s", kind, name)
                checkpoints[f"{kind}/{name}"].parent.mkdir(parents=True, exist_ok=True)
                finetune(checkpoints["base"], tasks[name], splits[name], scale, checkpoints[f"{kind}/{name}"],
                         kind == "lora", seed)  # fmt: skip
    return checkpoints, data, {name: tasks[name].label_words for name in TASKS}


def main(argv: list[str] | None = None) -> dict:
    args = parse_benchmark_args(__doc__, Path("benchmarks/.cache/accuracy_t5"), argv)
    scale = TINY if args.tiny else FULL
    start = time.perf_counter()

    checkpoints, data, labels = build_checkpoints(args.cache, scale, args.seed)
    results = run_methods(args.cache, checkpoints, data, labels, scale, args.seed)
    table = write_results(results, TASKS, args.results, "accuracy_t5")
    print(table)
    print(f"\n{'tiny' if args.tiny else 'full'} run: {time.perf_counter() - start:.0f} s; results in {args.results}")
    return results


if __name__ == "__main__":
    main()
