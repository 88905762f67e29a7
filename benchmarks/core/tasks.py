"""Real task data from the shared data folder (GLUE, SuperGLUE, FewGLUE, LM-BFF k-shot splits).

The folder is never copied into the repository: pass `data_dir`, set `PEFT_PROMPT_TRANSFER_DATA`, or keep the
default `../shared/data` beside the repository. Files are read with `datasets`, so every split is a
`datasets.Dataset` with the columns `text`, `text_pair` (or None) and an integer `label`.

Splits (not every task has every kind; `Task.splits` lists them):

- `train` / `dev`: the full GLUE / SuperGLUE training and validation sets (sources for transfer);
- `kshot-train` / `kshot-dev` / `kshot-test`: the 16-shot LM-BFF splits for one of `KSHOT_SEEDS`; `kshot-test` is
  the task's official dev set (MNLI, SNLI and QQP have no `kshot-test`: LM-BFF's folders hold no test file for them);
- `fewglue-train` / `fewglue-test`: the FewGLUE 32-shot training set and the SuperGLUE validation set.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import datasets

DATA_ENV = "PEFT_PROMPT_TRANSFER_DATA"
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"
KSHOT_SEEDS = (13, 21, 42, 87, 100)


def data_dir(path: Optional[str] = None) -> Path:
    """The shared data folder: `path`, else $PEFT_PROMPT_TRANSFER_DATA, else ../shared/data."""
    resolved = Path(path or os.environ.get(DATA_ENV) or DEFAULT_DATA_DIR)
    if not (resolved / "README.md").exists():
        raise FileNotFoundError(
            f"No task data at {resolved}. Point --data-dir or ${DATA_ENV} at the shared data folder "
            "(the one whose README.md lists glue/, superglue/, fewglue/ and k-shot/)."
        )
    return resolved


@dataclass(frozen=True)
class Task:
    """How to read one task, score it, and (for causal LMs) phrase it.

    `template` turns an example into the text a causal LM continues (`{text}` and `{text_pair}`); `label_words`
    are the verbalised labels, scored by their first token's next-token log-probability.
    """

    name: str
    label_names: tuple[str, ...]
    template: str
    label_words: tuple[str, ...]
    metric: str = "accuracy"  # "accuracy", "f1" (macro) or "mcc"
    full: Optional[tuple[str, str, Optional[str], str]] = None  # (format, text, pair, label) of train/dev
    kshot: Optional[tuple[str, str, str, Optional[str], str]] = None  # (folder, format, text, pair, label)
    fewglue: Optional[str] = None  # FewGLUE folder; the test split is superglue/<name>/val.jsonl
    full_folder: Optional[str] = None  # a task file's task: the folder of its train/dev files (see `register_tasks`)
    kshot_dev_file: str = "dev"  # the k-shot dev file's name without its suffix (MNLI's is dev_matched)
    kshot_test: bool = True  # whether the k-shot folders hold a test file

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def splits(self) -> tuple[str, ...]:
        return (
            (("train", "dev") if self.full else ())
            + (("kshot-train", "kshot-dev") + (("kshot-test",) if self.kshot_test else ()) if self.kshot else ())
            + (("fewglue-train", "fewglue-test") if self.fewglue else ())
        )


_SENTIMENT = dict(
    label_names=("negative", "positive"), template="Review: {text}\nSentiment:", label_words=(" negative", " positive")
)
_ENTAILMENT = dict(
    label_names=("entailment", "not_entailment"),
    template="{text}\nQuestion: {text_pair} True or false?\nAnswer:",
    label_words=(" true", " false"),
)
# MNLI and SNLI are phrased as CB is (RTE's true / false, plus neither), in GLUE's label order
_THREE_WAY_NLI = dict(
    label_names=("entailment", "neutral", "contradiction"),
    template="{text}\nQuestion: {text_pair} True, false or neither?\nAnswer:",
    label_words=(" true", " neither", " false"),
)
TASKS = {
    "sst2": Task(
        "sst2", **_SENTIMENT, full=("tsv", "sentence", None, "label"), kshot=("SST-2", "tsv", "sentence", None, "label")
    ),
    "cola": Task(
        "cola",
        ("unacceptable", "acceptable"),
        "Sentence: {text}\nIs this sentence grammatical?",
        (" no", " yes"),
        metric="mcc",
        full=("cola", "sentence", None, "label"),
        kshot=("CoLA", "cola", "sentence", None, "label"),
    ),
    "rte": Task(
        "rte",
        **_ENTAILMENT,
        full=("jsonl", "premise", "hypothesis", "label"),
        kshot=("RTE", "tsv", "sentence1", "sentence2", "label"),
        fewglue="RTE",
    ),
    "qnli": Task(
        "qnli",
        ("entailment", "not_entailment"),
        "Question: {text}\nSentence: {text_pair}\nDoes the sentence answer the question?",
        (" yes", " no"),
        kshot=("QNLI", "tsv", "question", "sentence", "label"),
    ),
    "mr": Task("mr", **_SENTIMENT, kshot=("mr", "csv", "text", None, "label")),
    "cr": Task("cr", **_SENTIMENT, kshot=("cr", "csv", "text", None, "label")),
    "mpqa": Task(
        "mpqa",
        ("negative", "positive"),
        "Phrase: {text}\nPolarity:",
        (" negative", " positive"),
        kshot=("mpqa", "csv", "text", None, "label"),
    ),
    "subj": Task(
        "subj",
        ("subjective", "objective"),
        "Sentence: {text}\nThis sentence is",
        (" subjective", " objective"),
        kshot=("subj", "csv", "text", None, "label"),
    ),
    # LM-BFF's TREC labels: 0 description, 1 entity, 2 abbreviation, 3 human, 4 location, 5 number
    "trec": Task(
        "trec",
        ("description", "entity", "abbreviation", "human", "location", "number"),
        "Question: {text}\nAnswer type:",
        (" description", " entity", " abbreviation", " person", " location", " number"),
        kshot=("trec", "csv", "text", None, "label"),
    ),
    "cb": Task(
        "cb",
        ("entailment", "contradiction", "neutral"),
        "{text}\nQuestion: {text_pair} True, false or neither?\nAnswer:",
        (" true", " false", " neither"),
        metric="f1",
        full=("jsonl", "premise", "hypothesis", "label"),
        fewglue="CB",
    ),
    # sources for the prompt-library suite (benchmarks/core/library_data.py): LM-BFF's k-shot folders only
    "mnli": Task(
        "mnli",
        **_THREE_WAY_NLI,
        kshot=("MNLI", "tsv", "sentence1", "sentence2", "gold_label"),
        kshot_dev_file="dev_matched",
        kshot_test=False,
    ),
    "snli": Task(
        "snli", **_THREE_WAY_NLI, kshot=("SNLI", "nli-tsv", "sentence1", "sentence2", "gold_label"), kshot_test=False
    ),
    "qqp": Task(
        "qqp",
        ("not_duplicate", "duplicate"),
        "Question 1: {text}\nQuestion 2: {text_pair}\nDo both questions ask the same thing?",
        (" no", " yes"),
        kshot=("QQP", "tsv", "question1", "question2", "is_duplicate"),
        kshot_test=False,
    ),
}
_BUILT_IN = frozenset(TASKS)
_COLA_COLUMNS = ["source", "label", "mark", "sentence"]  # CoLA files have no header row
_CSV_COLUMNS = ["label", "text"]  # LM-BFF's sentence-task csv files (mr, cr, subj, mpqa) have no header row
_FULL_FILES = {"train": ("train.tsv", "train.jsonl"), "dev": ("dev.tsv", "val.jsonl")}


def _read(path: Path, fmt: str) -> datasets.Dataset:
    if fmt == "jsonl":
        return datasets.load_dataset("json", data_files=str(path), split="train")
    if fmt == "nli-tsv":
        return _read_ragged_tsv(path)
    kwargs = dict(quoting=csv.QUOTE_NONE, keep_default_na=False)
    if fmt == "csv":  # quoted, comma-separated
        kwargs = dict(keep_default_na=False, header=None, names=_CSV_COLUMNS)
    elif fmt == "cola":
        kwargs.update(delimiter="\t", header=None, names=_COLA_COLUMNS)
    else:
        kwargs.update(delimiter="\t")
    return datasets.load_dataset("csv", data_files=str(path), split="train", **kwargs)


def _read_ragged_tsv(path: Path) -> datasets.Dataset:
    """A tsv file whose rows may have more fields than its header and whose label is the last field of each row.

    SNLI rows that carry five annotator labels (label1 ... label5) have four more fields than the header, which
    names only label1; pandas then shifts every column of the file. The leading columns keep their places, and the
    gold label is always the last field (LM-BFF reads it as `line[-1]` too).
    """
    with open(path, encoding="utf-8", newline="\n") as f:
        header, *rows = (line.rstrip("\r\n").split("\t") for line in f)
    columns = {name: [row[i] for row in rows] for i, name in enumerate(header[:-1])}
    columns[header[-1]] = [row[-1] for row in rows]
    return datasets.Dataset.from_dict(columns)


def _standardise(ds: datasets.Dataset, task: Task, text: str, pair: Optional[str], label: str) -> datasets.Dataset:
    names = list(task.label_names)

    def convert(row):
        value = row[label]
        if isinstance(value, str) and not value.lstrip("-").isdigit():
            value = names.index(value)
        return {"text": str(row[text]), "text_pair": str(row[pair]) if pair else None, "label": int(value)}

    features = datasets.Features(
        {"text": datasets.Value("string"), "text_pair": datasets.Value("string"), "label": datasets.Value("int64")}
    )
    return ds.map(convert, remove_columns=ds.column_names, features=features)


def load_split(task_name: str, split: str, seed: int = 42, root: Optional[str] = None) -> datasets.Dataset:
    """Load one split.

    Args:
        task_name: A key of `TASKS`.
        split: One of the task's `splits`: `train` / `dev` (full sets), `kshot-train` / `kshot-dev` /
            `kshot-test` (16-shot LM-BFF splits for `seed`) or `fewglue-train` / `fewglue-test`.
        seed: The k-shot seed, one of 13, 21, 42, 87, 100.
        root: The shared data folder (see `data_dir`).
    """
    if task_name not in TASKS:
        raise ValueError(f"Unknown task {task_name!r}; choose one of {sorted(TASKS)}.")
    task = TASKS[task_name]
    if split not in task.splits:
        raise ValueError(f"Task {task_name!r} has no {split!r} split; it has {list(task.splits)}.")
    if split.startswith("kshot-"):
        folder, fmt, text, pair, label = task.kshot
        if seed not in KSHOT_SEEDS:
            raise ValueError(f"The k-shot splits exist for seeds {KSHOT_SEEDS}, not {seed}.")
        suffix = "csv" if fmt == "csv" else "tsv"
        folder = Path(folder) if Path(folder).is_absolute() else data_dir(root) / "k-shot" / folder
        name = task.kshot_dev_file if split == "kshot-dev" else split[len("kshot-") :]
        ds = _read(_existing(folder / f"16-{seed}" / f"{name}.{suffix}", task_name), fmt)
        return _standardise(ds, task, text, pair, label)
    if split.startswith("fewglue-"):
        base = data_dir(root)
        path = (
            base / "fewglue" / task.fewglue / "train.jsonl"
            if split == "fewglue-train"
            else base / "superglue" / task.name / "val.jsonl"
        )
        return _standardise(_read(path, "jsonl"), task, "premise", "hypothesis", "label")
    fmt, text, pair, label = task.full
    if task.full_folder:
        folder = Path(task.full_folder)
    else:
        folder = data_dir(root) / ("superglue" if fmt == "jsonl" else "glue") / task.name
    ds = _read(_existing(folder / _FULL_FILES[split][fmt == "jsonl"], task_name), fmt)
    return _standardise(ds, task, text, pair, label)


def _existing(path: Path, task_name: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"Task {task_name!r}: no file {path}.")
    return path


# ----------------------------------------------------------------------------------------------- task files ---

_TASK_FILE_KEYS = {"name", "label_names", "template", "label_words", "metric", "kshot", "full"}
_SOURCE_KEYS = {"folder", "format", "text", "pair", "label"}


def register_tasks(path: str) -> list[str]:
    """Add the tasks a JSON task file describes to `TASKS`, so that a suite runs them (`--task-file`); returns
    their names.

    The file holds `{"tasks": [...]}`; each task gives `name`, `label_names`, the causal LM's `template` (with
    `{text}`, and `{text_pair}` for pairs) and one `label_words` entry per label (their first tokens must differ),
    `metric` ("accuracy", the default, "f1" or "mcc"), and its data: `kshot` (a folder in the LM-BFF layout,
    `16-<seed>/train.tsv`, `dev.tsv`, `test.tsv`, or `.csv` without a header row: label, text), `full` (a folder
    holding a GLUE-style `train.tsv` and `dev.tsv` with a header row, or `train.jsonl` and `val.jsonl`), or both.
    Each data entry names its folder (relative to the task file), `format` ("tsv", "csv" or "jsonl"), and the
    columns of the text, the optional pair and the label; labels are integers or the label names.

    ```json
    {"tasks": [{"name": "reviews", "label_names": ["negative", "positive"],
                "template": "Review: {text}\\nSentiment:", "label_words": [" negative", " positive"],
                "kshot": {"folder": "reviews-kshot", "format": "tsv", "text": "sentence", "label": "label"}}]}
    ```
    """
    import json

    file = Path(path)
    try:
        entries = json.loads(file.read_text())["tasks"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"Task file {path}: expected a JSON object with a 'tasks' list ({exc!r}).") from exc
    names = []
    for entry in entries:
        name = entry.get("name") if isinstance(entry, dict) else None
        where = f"Task file {path}, task {name!r}"
        if not isinstance(name, str) or not name:
            raise ValueError(f"Task file {path}: every task needs a 'name'.")
        if name in TASKS:
            raise ValueError(f"{where}: the name is taken by a {'built-in' if name in _BUILT_IN else 'loaded'} task.")
        unknown = set(entry) - _TASK_FILE_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}; a task has {sorted(_TASK_FILE_KEYS)}.")
        labels, words = entry.get("label_names") or [], entry.get("label_words") or []
        if len(labels) < 2 or len(words) != len(labels):
            raise ValueError(f"{where}: give at least two label_names and one label_words entry per label.")
        if "{text}" not in entry.get("template", ""):
            raise ValueError(f"{where}: the template must contain {{text}} (and {{text_pair}} for pairs).")
        if entry.get("metric", "accuracy") not in ("accuracy", "f1", "mcc"):
            raise ValueError(f"{where}: metric must be 'accuracy', 'f1' or 'mcc'.")
        if not (entry.get("kshot") or entry.get("full")):
            raise ValueError(f"{where}: give its data as 'kshot' (LM-BFF layout), 'full' (train/dev files) or both.")
        sources = {}
        for kind in ("kshot", "full"):
            source = entry.get(kind)
            if not source:
                continue
            if set(source) - _SOURCE_KEYS or not {"folder", "format", "text", "label"} <= set(source):
                raise ValueError(f"{where}: '{kind}' needs folder, format, text, label (and optionally pair).")
            if source["format"] not in ("tsv", "csv", "jsonl") or (kind == "full" and source["format"] == "csv"):
                raise ValueError(
                    f"{where}: '{kind}' format must be 'tsv' or " + ("'jsonl'." if kind == "full" else "'csv'.")
                )
            folder = (file.parent / source["folder"]).resolve()
            if not folder.is_dir():
                raise ValueError(f"{where}: '{kind}' folder {folder} does not exist.")
            sources[kind] = (str(folder), source["format"], source["text"], source.get("pair"), source["label"])
        TASKS[name] = Task(
            name,
            tuple(labels),
            entry["template"],
            tuple(words),
            metric=entry.get("metric", "accuracy"),
            full=sources["full"][1:] if "full" in sources else None,
            kshot=sources.get("kshot"),
            full_folder=sources["full"][0] if "full" in sources else None,
        )
        names.append(name)
    return names


def metric(task_name: str, labels, predictions) -> float:
    """The task's metric, computed with scikit-learn."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    kind = TASKS[task_name].metric
    if kind == "mcc":
        return float(matthews_corrcoef(labels, predictions))
    if kind == "f1":
        return float(f1_score(labels, predictions, average="macro"))
    return float(accuracy_score(labels, predictions))
