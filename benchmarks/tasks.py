"""Real task data from the shared data folder (GLUE, SuperGLUE, FewGLUE, LM-BFF k-shot splits).

The folder is never copied into the repository: pass `data_dir`, set `PEFT_PROMPT_TRANSFER_DATA`, or keep the
default `../shared/data` beside the repository. Files are read with `datasets`, so every split is a
`datasets.Dataset` with the columns `text`, `text_pair` (or None) and an integer `label`.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import datasets

DATA_ENV = "PEFT_PROMPT_TRANSFER_DATA"
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
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
    """How to read one task: its columns, label names and metric."""

    name: str
    text_column: str
    pair_column: Optional[str]
    label_column: str
    label_names: tuple[str, ...]
    metric: str = "accuracy"  # "accuracy", "f1" or "mcc"

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


TASKS = {
    "sst2": Task("sst2", "sentence", None, "label", ("negative", "positive")),
    "cola": Task("cola", "sentence", None, "label", ("unacceptable", "acceptable"), metric="mcc"),
    "rte": Task("rte", "premise", "hypothesis", "label", ("entailment", "not_entailment")),
}
_COLA_COLUMNS = ["source", "label", "mark", "sentence"]  # CoLA files have no header row
# k-shot folders (LM-BFF) use other names and column names for the same tasks
_KSHOT = {"sst2": ("SST-2", "sentence", None), "cola": ("CoLA", "sentence", None), "rte": ("RTE", "sentence1", "sentence2")}


def _read_tsv(path: Path, column_names: Optional[list[str]] = None) -> datasets.Dataset:
    kwargs = dict(delimiter="\t", quoting=csv.QUOTE_NONE, keep_default_na=False)
    if column_names:
        kwargs.update(header=None, names=column_names)
    return datasets.load_dataset("csv", data_files=str(path), split="train", **kwargs)


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
        task_name: `sst2`, `cola` or `rte`.
        split: `train` / `dev` (the full GLUE/SuperGLUE sets) or `kshot-train` / `kshot-dev` / `kshot-test`
            (the 16-shot LM-BFF splits for `seed`; `kshot-test` is the official dev set).
        seed: The k-shot seed, one of 13, 21, 42, 87, 100.
        root: The shared data folder (see `data_dir`).
    """
    task = TASKS[task_name]
    base = data_dir(root)
    if split.startswith("kshot-"):
        folder, text, pair = _KSHOT[task_name]
        path = base / "k-shot" / folder / f"16-{seed}" / f"{split[len('kshot-'):]}.tsv"
        ds = _read_tsv(path, _COLA_COLUMNS if task_name == "cola" else None)
        return _standardise(ds, task, text, pair, "label")
    if task_name == "rte":
        file = {"train": "train.jsonl", "dev": "val.jsonl"}[split]
        ds = datasets.load_dataset("json", data_files=str(base / "superglue" / "rte" / file), split="train")
        return _standardise(ds, task, "premise", "hypothesis", "label")
    file = {"train": "train.tsv", "dev": "dev.tsv"}[split]
    if task_name == "cola":
        ds = _read_tsv(base / "glue" / "cola" / file, _COLA_COLUMNS)
    else:
        ds = _read_tsv(base / "glue" / task_name / file)
    return _standardise(ds, task, task.text_column, task.pair_column, task.label_column)


def metric(task_name: str, labels, predictions) -> float:
    """The task's metric, computed with scikit-learn."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    kind = TASKS[task_name].metric
    if kind == "mcc":
        return float(matthews_corrcoef(labels, predictions))
    if kind == "f1":
        return float(f1_score(labels, predictions, average="macro"))
    return float(accuracy_score(labels, predictions))
