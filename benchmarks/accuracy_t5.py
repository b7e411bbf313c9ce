"""Offline T5 accuracy benchmark: the paper's Flan-T5 comparison at small scale, on four real text tasks, end to end.

1. Tasks: real labeled text that installs offline (`text_tasks.py`), split by seed into train / validation / test and
   written as parquet with ClassLabel labels whose names are the label words the model answers with:
     langid           chatterbot-corpus utterance -> its language   english / german / dutch / spanish / ...
     emoji_groups     Unicode emoji name -> emoji group             smileys / people / animals / food / ...
     wordnet_nouns    "lemmas: gloss" -> WordNet semantic category  animal / artifact / body / food / ...
     debian_sections  Debian package description -> archive section games / sound / graphics / science / ...
   (VADER sentiment and fortune topics, the previous task set, are left out: this small model learnt them barely
   above their majority class, and a merge of experts that learnt nothing shows nothing.) `--tasks FILE` benchmarks a
   user's own tasks instead: `tasks: {NAME: {train: SPEC, validation: SPEC, test: SPEC, text_column, label_column,
   prefix}}`, `datasets` specs with ClassLabel labels whose names differ in their first token.
2. The base: a unigram tokenizer (each label word one token of its own) and a small Flan-T5-style model (gated-gelu,
   its own lm_head, 4+4 layers, d_model 128) pre-trained with T5's span corruption on the tasks' train and
   validation text (labels unused) and on held-out corpora, then instruction-tuned, as Flan-T5 was, on held-out tasks
   with other label words (other fortune topics, other WordNet categories): it answers a prompt with a word but knows
   none of the benchmark's tasks. No test text is seen before the test.
3. Experts: one full fine-tune per task (text-to-text, the label word as target), saved as an ordinary T5 checkpoint.
   Each must beat its task's majority class by 15 points on validation (first-token accuracy over the whole
   vocabulary) before any merge is scored, or the benchmark stops.
4. Rows, each through `wemoe-convert`, `wemoe-tta` and `wemoe-eval` (their `main(argv)`) on the test splits, scored by
   exact match of greedy generations: the pre-trained model; the individual fine-tunes; task arithmetic with lambda
   chosen from {0.1, ..., 1.0} on validation (the paper's protocol) and at 0.3; TIES; layer-wise AdaMerging; WEMoE and
   E-WEMoE keep 0.1 adapted as in the paper; the diagnostic oracle-routing row; WEMoE and E-WEMoE adapted by task
   routing (`wemoe-tta`'s default), with raw and with softmax routing weights; and WEMoE and E-WEMoE by task routing
   with the option `decoder_routing: prompt` (the decoder routed once per prompt, from the pooled encoder output,
   instead of per token).
5. The paper's adaptation (Adam, lr 1e-4, batch 16 per task, unlabeled test inputs) for WEMoE, E-WEMoE and
   AdaMerging runs 700 of the paper's 1000 steps (`Scale.tta_steps`): with one thread, next to another benchmark on
   a 2-core machine, a WEMoE step (16 prompts of each of the 4 tasks) took 0.57 s and an AdaMerging step 0.43 s.
   Fixed before any merge was scored. The task-routing rows' steps are chosen on the validation splits
   (`selection.choose_adaptation`, once per routing normalization, at `selection.TASK_ROUTING_LRS`);
   `recommended.json` names the merged row with the best validation average. Nothing is chosen by looking at test
   accuracy: task arithmetic's lambda is chosen on validation too.
6. Diagnostics (`diagnostics.py`, shared with `accuracy_text.py`): routing accuracy per encoder layer before and after
   adaptation (the encoder routes each prompt as a whole; a decoder routed per prompt adds its layers after the
   encoder's), the routing weights per layer and task, the task-vector norms per layer, and validation entropy and
   accuracy along adaptation.

The README's T5 section has the results and what the diagnostics show (the experts pass the regime check; the oracle
row shows the static part and the learned routing each costing about half of the gap to the fine-tunes).

Every stage is cached under --cache (delete a stage's directory, or pass --fresh, to recompute it).

    pip install -e ".[benchmarks]" && apt-get install -y fortunes wordnet-base unicode-data
    python benchmarks/accuracy_t5.py --fresh --threads 1    # 43m56s beside the CLIP benchmark, 2-core machine
    python benchmarks/accuracy_t5.py --tiny --cache /tmp/acc_t5 --results /tmp/acc_t5/results   # CI-sized check
"""

import json
import logging
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
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
from text_tasks import DEFAULT_TASKS, build_tasks
from transformers import (
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

from wemoe.backbones.t5 import label_token_ids
from wemoe.merge import merge_static
from wemoe.recipe import load_validated

logger = logging.getLogger("accuracy_t5")

# The benchmark's tasks: text_tasks' readers, their classes renamed to one-word label words (same order).
T5_TASKS = {
    "langid": (["english", "german", "dutch", "spanish", "portuguese", "italian", "indonesian", "turkish"],
               "language: "),
    "emoji_groups": (["smileys", "people", "animals", "food", "travel", "activities", "objects", "symbols"],
                     "emoji group: "),
    "wordnet_nouns": (["animal", "artifact", "body", "food", "location", "person", "plant", "substance"],
                      "noun category: "),
    "debian_sections": (["games", "sound", "graphics", "science", "net", "admin", "mail", "editors"],
                        "package section: "),
}  # fmt: skip
TINY_TASKS = ["emoji_groups", "wordnet_nouns"]
FORTUNE_DIRS = (Path("/usr/share/games/fortunes"), Path("/usr/share/fortunes"))
WORDNET_NOUNS = Path("/usr/share/wordnet/data.noun")
# WordNet's noun lexicographer files, numbered from 3 (noun.Tops) as in its `lexnames`.
WORDNET_LEXNAMES = ("Tops act animal artifact attribute body cognition communication event feeling food group location "
                    "motive object person phenomenon plant possession process quantity relation shape state substance "
                    "time").split()  # fmt: skip
# Held-out instruction-tuning tasks (Flan-style): other label words, other categories, no benchmark text.
INSTRUCTION_FORTUNE_TOPICS = ["art", "drugs", "education", "kids", "law", "literature", "love", "medicine", "pets",
                              "sports"]  # fmt: skip
INSTRUCTION_CATEGORIES = ["act", "attribute", "cognition", "communication", "event", "feeling", "group", "object",
                          "possession", "quantity", "state", "time"]  # fmt: skip
TRAINER_DIR = Path(tempfile.gettempdir()) / "wemoe_accuracy_t5_trainer"  # Trainer's output_dir; nothing is saved there
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in T5
SENTINELS = [f"<extra_id_{i}>" for i in range(32)]
EXPERT_MARGIN = 0.15  # every expert beats its task's majority class on validation by this much


@dataclass(frozen=True)
class Scale:
    """How much data, model and training each stage gets: the full benchmark or the CI-sized pipeline check."""

    pretrain_texts: int  # cap on the unlabeled pre-training texts
    vocab_size: int
    d_model: int
    layers: int
    pretrain_steps: int
    instruction_steps: int
    finetune_steps: int
    tta_steps: int
    batch_size: int = 32
    tta_batch_size: int = 16
    max_input_tokens: int = 48
    instruction_per_task: int = 3000
    rows_per_split: int | None = None  # CI-sized runs keep this many rows of each split


FULL = Scale(pretrain_texts=30000, vocab_size=4000, d_model=128, layers=4, pretrain_steps=300, instruction_steps=300,
             finetune_steps=300, tta_steps=700)  # fmt: skip
TINY = Scale(pretrain_texts=400, vocab_size=1000, d_model=32, layers=2, pretrain_steps=3, instruction_steps=2,
             finetune_steps=2, tta_steps=2, batch_size=4, tta_batch_size=4, instruction_per_task=60,
             rows_per_split=24)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------- data
@dataclass
class TextTask:
    """A labeled text task held in memory (the instruction-tuning tasks) and the unlabeled text of its corpus."""

    prefix: str
    label_words: list[str]
    texts: list[str]
    labels: np.ndarray
    unlabeled: list[str]


def one_line(text: str) -> str:
    return " ".join(text.split())


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


def load_instruction_tasks() -> dict[str, TextTask]:
    """The held-out tasks the base is instruction-tuned on (as Flan-T5 was): other fortune topics, other WordNet
    categories than the benchmark's; their label words are none of the benchmark's."""
    quotes, glosses = fortune_quotes(), wordnet_glosses()
    return {
        "quote topic": category_task("quote topic: ", quotes, {name: name for name in INSTRUCTION_FORTUNE_TOPICS}),
        "gloss category": category_task("gloss category: ", glosses, {name: name for name in INSTRUCTION_CATEGORIES}),
    }


def default_tasks_file(cache: Path, seed: int, tiny: bool, scale: Scale) -> Path:
    """The offline tasks (`text_tasks.build_tasks` with one-word class names), written as a tasks file."""
    names = TINY_TASKS if tiny else list(T5_TASKS)
    sources = {name: replace(DEFAULT_TASKS[name], classes=T5_TASKS[name][0]) for name in names}
    spec = build_tasks(cache / "data", cache / "downloads", seed, names, scale.rows_per_split, sources)
    for name, entry in spec["tasks"].items():
        entry["prefix"] = T5_TASKS[name][1]
    return write_yaml(spec, cache / "tasks.yaml")


def prompts_of(dataset, files: TaskFiles) -> list[str]:
    return [files.prefix + str(text) for text in dataset[files.text_column]]


def texts_in_test_splits(tasks: TasksFile) -> set[str]:
    return {
        str(text) for name, files in tasks.tasks.items() for text in load_split(name, files, "test")[files.text_column]
    }


def pretraining_texts(tasks: TasksFile, instruction: dict[str, TextTask], cap: int, seed: int) -> list[str]:
    """The tasks' train and validation text and the instruction corpora's text (labels never used), without any text
    in a test split, shuffled, at most `cap`."""
    held_out = texts_in_test_splits(tasks)
    texts = [str(text) for name, files in tasks.tasks.items() for split in ("train", "validation")
             for text in load_split(name, files, split)[files.text_column]]  # fmt: skip
    texts += [text for task in instruction.values() for text in task.texts + task.unlabeled]
    texts = [text for text in texts if text not in held_out]
    order = np.random.default_rng(seed).permutation(len(texts))[:cap]
    return [texts[i] for i in order]


def balanced_sample(task: TextTask, candidates, count: int, rng: np.random.Generator) -> np.ndarray:
    """Up to `count` of the candidate indices, equally many of each class, in random order."""
    candidates = np.asarray(list(candidates))
    per_class = count // len(task.label_words)
    chosen = [rng.permutation(candidates[task.labels[candidates] == label])[:per_class]
              for label in range(len(task.label_words))]  # fmt: skip
    return rng.permutation(np.concatenate(chosen))


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
    """Fine-tuning pairs: a prompt (truncated as evaluation truncates it) -> its label word."""

    def __init__(self, prompts: list[str], labels: list[int], label_words: list[str], tokenizer):
        self.inputs = tokenizer(prompts, truncation=True)["input_ids"]
        answers = tokenizer(label_words)["input_ids"]
        self.targets = [answers[label] for label in labels]

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
        task = instruction[name]
        logger.info("Instruction tuning on %s: %d prompts, label words %s", name, len(indices), task.label_words)
        prompts = [task.prefix + task.texts[i] for i in indices]
        parts.append(PromptAnswers(prompts, task.labels[indices].tolist(), task.label_words, tokenizer))
    data = torch.utils.data.ConcatDataset(parts)
    train_text_to_text(model, tokenizer, data, scale.instruction_steps, 1e-3, scale, seed)


def finetune(base_dir: Path, name: str, files: TaskFiles, scale: Scale, directory: Path, seed: int) -> None:
    """A full fine-tune (every weight) on the task's train split."""
    model = T5ForConditionalGeneration.from_pretrained(base_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    dataset = load_split(name, files, "train")
    data = PromptAnswers(prompts_of(dataset, files), list(dataset[files.label_column]), class_names(name, files),
                         tokenizer)  # fmt: skip
    train_text_to_text(model, tokenizer, data, scale.finetune_steps, 1e-3, scale, seed)
    save_atomically(directory, model.eval(), tokenizer)


@torch.no_grad()
def first_token_accuracy(model, tokenizer, name: str, files: TaskFiles, dataset, batch_size: int = 128) -> float:
    """In-process accuracy on a labeled split (for choices made on validation): the first decoded token, chosen over
    the whole vocabulary, is the label word's (each label word is one token here, so this is exact match)."""
    label_ids = torch.tensor(label_token_ids(tokenizer, name, class_names(name, files)))
    prompts, labels = prompts_of(dataset, files), torch.tensor(list(dataset[files.label_column]))
    correct = 0
    for start in range(0, len(prompts), batch_size):
        inputs = tokenizer(prompts[start : start + batch_size], padding=True, truncation=True, return_tensors="pt")
        start_ids = torch.full((inputs["input_ids"].shape[0], 1), model.config.decoder_start_token_id)
        first = model(**inputs, decoder_input_ids=start_ids, use_cache=False).logits[:, 0].argmax(-1)
        correct += int((first == label_ids[labels[start : start + batch_size]]).sum())
    return correct / len(prompts)


def check_experts(checkpoints: dict[str, Path], tasks: TasksFile, margin: float) -> dict:
    """Every expert's validation accuracy and its task's majority class; an expert less than `margin` above its
    majority class stops the benchmark (a merge of experts that learned nothing shows nothing)."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoints["base"])
    report = {}
    for name, files in tasks.tasks.items():
        validation = load_split(name, files, "validation")
        labels = list(validation[files.label_column])
        majority = max(labels.count(label) for label in set(labels)) / len(labels)
        model = T5ForConditionalGeneration.from_pretrained(checkpoints[f"full/{name}"]).eval()
        report[name] = {"majority": majority, "full": first_token_accuracy(model, tokenizer, name, files, validation)}
        logger.info("Expert %s: validation %.3f, majority class %.3f", name, report[name]["full"], majority)
        if margin and report[name]["full"] < majority + margin:
            raise RuntimeError(
                f"The full expert of {name!r} scores {100 * report[name]['full']:.1f} on validation, less than "
                f"{100 * margin:.0f} points above the majority class ({100 * majority:.1f}): replace the task or "
                "train longer."
            )
    return report


def build_checkpoints(cache: Path, tasks: TasksFile, scale: Scale, seed: int) -> dict[str, Path]:
    """The pre-trained, instruction-tuned T5 and a full fine-tune per task, all cached."""
    checkpoints = {"base": cache / "checkpoints" / "base"}
    if not checkpoints["base"].is_dir():
        instruction = load_instruction_tasks()
        texts = pretraining_texts(tasks, instruction, scale.pretrain_texts, seed)
        words = {word for name, files in tasks.tasks.items() for word in class_names(name, files)}
        words |= {word for task in instruction.values() for word in task.label_words}
        model, tokenizer = pretrain(texts, sorted(words), scale, seed)
        instruction_tune(model, tokenizer, instruction, texts_in_test_splits(tasks), scale, seed)
        model.generation_config.decoder_start_token_id = model.config.decoder_start_token_id
        save_atomically(checkpoints["base"], model.eval(), tokenizer)
    for name, files in tasks.tasks.items():
        checkpoints[f"full/{name}"] = cache / "checkpoints" / "full" / name
        if not checkpoints[f"full/{name}"].is_dir():
            logger.info("Fine-tuning on %s (label words %s)", name, class_names(name, files))
            checkpoints[f"full/{name}"].parent.mkdir(parents=True, exist_ok=True)
            finetune(checkpoints["base"], name, files, scale, checkpoints[f"full/{name}"], seed)
    return checkpoints


# ----------------------------------------------------------------------------------------------------- the runs
PAPER_TTA_LR = 1e-4
# Task routing's steps are chosen on validation among these (`selection.TaskRoutingChoices`).
TASK_ROUTING_GRID = TaskRoutingGrid(lrs=TASK_ROUTING_LRS, steps=(100, 200, 400))
TINY_TASK_ROUTING_GRID = TaskRoutingGrid(lrs=(1e-3,), steps=(1, 2))
PROMPT_ROUTING = {"decoder_routing": "prompt"}
EVAL_ARGS = ("--max-new-tokens", "4", "--batch-size", "64")


def choose_lambda(checkpoints: dict[str, Path], tasks: TasksFile, output: Path) -> dict:
    """Task arithmetic's lambda chosen on the validation splits (the paper's protocol), cached as JSON."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoints["base"])
    experts = {name: str(checkpoints[f"full/{name}"]) for name in tasks.tasks}
    validation = {name: load_split(name, files, "validation") for name, files in tasks.tasks.items()}

    def validation_average(scaling: float) -> float:
        model = merge_static("t5", str(checkpoints["base"]), experts, {"method": "task_arithmetic", "scaling": scaling})
        scores = [first_token_accuracy(model.eval(), tokenizer, name, files, validation[name])
                  for name, files in tasks.tasks.items()]  # fmt: skip
        return sum(scores) / len(scores)

    return choose_on_validation(LAMBDAS, validation_average, output)


def methods(lambda_star: float) -> dict[str, tuple[dict, str | None]]:
    """Row -> the recipe fields it sets, and how it adapts: the paper's entropy minimisation (`PAPER`, and
    AdaMerging's training), task routing (`TASK_ROUTING`), or not at all (None)."""

    def task_arithmetic(scaling: float) -> dict:
        return {"variant": "static", "static_merge": {"method": "task_arithmetic", "scaling": scaling}}

    softmax, e_wemoe = {"normalization": "softmax"}, {"variant": "e-wemoe", "keep": 0.1}
    return {
        f"task arithmetic (lambda {lambda_star:g}, chosen on validation)": (task_arithmetic(lambda_star), None),
        "task arithmetic (lambda 0.3)": (task_arithmetic(0.3), None),
        "TIES": ({"variant": "static", "static_merge": {"method": "ties", "scaling": 0.3, "density": 0.2}}, None),
        "AdaMerging (layer-wise)": ({"variant": "static", "static_merge": {"method": "adamerging"}}, PAPER),
        "WEMoE": ({"variant": "wemoe"}, PAPER),
        "E-WEMoE keep=0.1": (e_wemoe, PAPER),
        "WEMoE, task routing": ({"variant": "wemoe"}, TASK_ROUTING),
        "WEMoE, task routing, softmax routing": ({"variant": "wemoe", "router": softmax}, TASK_ROUTING),
        "E-WEMoE keep=0.1, task routing": (e_wemoe, TASK_ROUTING),
        "E-WEMoE keep=0.1, task routing, softmax routing": ({**e_wemoe, "router": softmax}, TASK_ROUTING),
        "WEMoE, task routing, decoder routed per prompt": ({"variant": "wemoe", "router": PROMPT_ROUTING},
                                                           TASK_ROUTING),
        "E-WEMoE keep=0.1, task routing, decoder routed per prompt": ({**e_wemoe, "router": PROMPT_ROUTING},
                                                                      TASK_ROUTING),
        f"WEMoE, task routing{ATTENTION}": ({"variant": "wemoe", **ATTENTION_FIELDS}, TASK_ROUTING),
        f"WEMoE, task routing{PRETRAINED_REST}": ({"variant": "wemoe", **PRETRAINED_REST_FIELDS}, TASK_ROUTING),
    }  # fmt: skip


ADAPTED_ROWS = tuple(row for row, (fields, adapts) in methods(0.3).items() if fields["variant"] != "static")


def recipe(checkpoints: dict[str, Path], tasks: TasksFile, router: dict | None = None, **fields) -> dict:
    """A conversion recipe over the full experts, each task's label words its ClassLabel names; `router` adds to the
    router's fields."""
    return {
        "base_model": str(checkpoints["base"]),
        "architecture": "t5",
        "router": {"hidden_layers": 2, "init_lambda": 0.3, **(router or {})},
        "tasks": [
            {"name": name, "model": str(checkpoints[f"full/{name}"]), "classnames": class_names(name, files)}
            for name, files in tasks.tasks.items()
        ],
        **fields,
    }


def count_parameters(model_dir: Path, method: str, num_tasks: int) -> tuple[int, int]:
    """(trainable at test time, total) parameters of a method's model."""
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir, trust_remote_code=True)
    if hasattr(model, "parameter_report"):
        report = model.parameter_report()
        return report["trainable_parameters"], report["total_parameters"]
    # Layer-wise AdaMerging trains one coefficient per tensor and task (the stacks' embedding copies excepted).
    tensors = sum(1 for key in model.state_dict() if not key.endswith("embed_tokens.weight"))
    return (tensors * num_tasks if method.startswith("AdaMerging") else 0), model.num_parameters()


def run_methods(cache: Path, checkpoints: dict[str, Path], tasks: TasksFile, scale: Scale, seed: int) -> dict:
    data_yaml = write_yaml(data_config(tasks, "test"), cache / "data.yaml")
    pretrained = evaluate_dir(checkpoints["base"], data_yaml, cache / "eval" / "pretrained.json", EVAL_ARGS)
    results = {
        "pre-trained": {"scores": pretrained, "parameters": (0, None)},
        "individual fine-tunes": {
            "scores": score_each_alone({t: checkpoints[f"full/{t}"] for t in tasks.tasks}, tasks, cache, "full",
                                       EVAL_ARGS),
            "parameters": (0, None),
        },
    }
    choice = choose_lambda(checkpoints, tasks, cache / "eval" / "lambda_on_validation.json")
    grid = TINY_TASK_ROUTING_GRID if scale is TINY else TASK_ROUTING_GRID
    paper = Adaptation(scale.tta_steps, scale.tta_batch_size, lr=PAPER_TTA_LR, seed=seed)
    adaptation = RowAdaptations(cache, data_config(tasks, "validation"), grid, paper)
    for method, (fields, adapts) in methods(choice["lambda"]).items():
        started = time.perf_counter()
        row_recipe = recipe(checkpoints, tasks, **fields)
        scored = convert_and_adapt(cache, method, row_recipe, data_yaml, adaptation(method, row_recipe, adapts))
        seconds = time.perf_counter() - started  # conversion and adaptation (0 when cached)
        scores = evaluate_dir(scored, data_yaml, cache / "eval" / f"{method_slug(method)}.json", EVAL_ARGS)
        results[method] = {"scores": scores, "parameters": count_parameters(scored, method, len(tasks.tasks)),
                           "model": str(scored), "seconds": seconds}  # fmt: skip
    results.update(oracle_results(cache, tasks, EVAL_ARGS))
    results["task arithmetic lambda choice"] = choice
    return results


# ------------------------------------------------------------------------------------------------- diagnostics
# The parts of a T5 block, per stack: what follows `STACK.block.N.layer.` (encoder: 0 self-attention, 1 feed-forward;
# decoder: 0 self-attention, 1 cross-attention, 2 feed-forward).
BLOCKS = {
    "encoder": {"encoder feed-forward": ("1.DenseReluDense.",), "encoder attention": ("0.SelfAttention.",)},
    "decoder": {"decoder feed-forward": ("2.DenseReluDense.",),
                "decoder attention": ("0.SelfAttention.", "1.EncDecAttention.")},
}  # fmt: skip


def t5_task_vector_norms(checkpoints: dict[str, Path], tasks: TasksFile) -> dict[str, list[float]]:
    """Per stack, the feed-forward and attention task vectors' L2 norm per layer, averaged over the experts."""
    base = T5ForConditionalGeneration.from_pretrained(checkpoints["base"]).state_dict()
    experts = [T5ForConditionalGeneration.from_pretrained(checkpoints[f"full/{name}"]).state_dict()
               for name in tasks.tasks]  # fmt: skip
    norms = {}
    for stack, blocks in BLOCKS.items():
        norms.update(task_vector_norms(base, experts, stack + ".block.{}.layer.", blocks))
    return norms


def diagnostics(checkpoints: dict[str, Path], tasks: TasksFile, results: dict, output: Path) -> dict:
    """Routing accuracy per encoder layer before and after adaptation, the routing and norm plots, and the
    adaptation curves (validation entropy over the label words, and accuracy)."""
    adapted = {method: Path(results[method]["model"]) for method in ADAPTED_ROWS}
    norms = t5_task_vector_norms(checkpoints, tasks)
    return write_diagnostics(adapted, data_config(tasks, "test"), data_config(tasks, "validation"), norms, output,
                             "accuracy_t5", "encoder routing weight")  # fmt: skip


# --------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    args = parse_benchmark_args(__doc__, Path("benchmarks/.cache/accuracy_t5"), argv, extra=add_tasks_argument)
    scale = TINY if args.tiny else FULL
    start = time.perf_counter()
    if args.tasks is None:
        args.tasks = default_tasks_file(args.cache, args.seed, args.tiny, scale)
    tasks = load_validated(TasksFile, args.tasks, "tasks file")

    checkpoints = build_checkpoints(args.cache, tasks, scale, args.seed)
    experts = check_experts(checkpoints, tasks, margin=0.0 if args.tiny else EXPERT_MARGIN)
    results = run_methods(args.cache, checkpoints, tasks, scale, args.seed)
    choice = results.pop("task arithmetic lambda choice")
    names = list(tasks.tasks)
    table = write_results(results, names, args.results, "accuracy_t5")
    validation = write_yaml(data_config(tasks, "validation"), args.cache / "data_validation.yaml")
    recommended = recommend("accuracy_t5", results, validation, args.cache, args.results, ("pre-trained", *ORACLE_ROWS),
                            EVAL_ARGS)  # fmt: skip
    report = diagnostics(checkpoints, tasks, results, args.results)
    (args.results / "accuracy_t5_experts.json").write_text(json.dumps({**experts, "lambda": choice}, indent=2))
    print(table)
    print(recommended_line(recommended))
    print("\nexperts on validation (first-token accuracy) vs the majority class:")
    for name in names:
        print(f"  {name}: {100 * experts[name]['full']:.1f} vs {100 * experts[name]['majority']:.1f}")
    print(f"task arithmetic's lambda on validation: {choice['lambda']:g}")
    print("\nrouting accuracy per encoder layer (share of test samples whose largest routing weight is their own "
          "task's expert; the rows routing the decoder per prompt add its layers after the encoder's):")  # fmt: skip
    print(routing_table(report, names))
    print(f"\n{'tiny' if args.tiny else 'full'} run: {time.perf_counter() - start:.0f} s; results in {args.results}")
    return {"results": results, "experts": experts, "lambda": choice, "diagnostics": report,
            "recommended": recommended}  # fmt: skip


def add_tasks_argument(parser) -> None:
    parser.add_argument("--tasks", type=Path, default=None, help="A tasks file (default: the offline tasks).")


if __name__ == "__main__":
    main()
