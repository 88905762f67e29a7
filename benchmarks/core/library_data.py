"""Source training sets for the prompt-library transfer suite, with every target's held-out text removed.

The suite trains one prompt per source task and scores it on target tasks. Several sources share text with the
targets: SST-2 and MR are both sentences from Rotten Tomatoes reviews, tokenised differently (SST-2's `it 's` and
`do n't` are MR's `it's` and `don't`). A source example whose text is a target's dev or test text would let a
prompt see what it is scored on, so `source_training_set` drops it. Texts are compared after `normalise`.

- `held_out_texts(targets)`: the normalised texts of the targets' `kshot-test` and `kshot-dev` examples (all five
  seeds);
- `source_training_set(task, targets)`: the source's full `train` split where it has one, otherwise its k-shot
  `train` and `dev` files of all five seeds pooled, less the held-out texts and the pieces of them (a source text
  of at least `MIN_FRAGMENT` letters and digits found inside a held-out text), with the counts of what was removed;
- `dedup_report(sources, targets)`: those counts for several sources, one flat row per source;
- `kept_rows_digest(data)`: a digest of the rows a source keeps, which `SOURCE_DATA_VERSION` answers for.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Iterable
from typing import Optional

import datasets

from benchmarks.core.tasks import KSHOT_SEEDS, TASKS, load_split

# The version of the rows the sources keep (this module's rule and the shared data it reads). Source stages and runs
# that hold targets out are keyed by it (`SourceSpec.data_version`, `RunSpec.source_data_version`), so that sources
# trained on other rows are trained anew and their runs recorded anew, never mixed with the old ones. Bump it with
# any change to what a source keeps: tests/test_library_data.py pins the library suite's kept rows at this version.
SOURCE_DATA_VERSION = 1


def kept_rows_digest(data: datasets.Dataset) -> str:
    """A short digest of a source training set's rows (text, pair and label, in order)."""
    rows = "\n".join(
        f"{text}\t{pair}\t{label}" for text, pair, label in zip(data["text"], data["text_pair"], data["label"])
    )
    return hashlib.sha1(rows.encode()).hexdigest()[:12]


def normalise(text: str) -> str:
    """The form in which two texts count as the same text: their letters and digits, in order, nothing else.

    Compatibility forms are unified and accents dropped (Unicode NFKD, then combining marks removed: MR spells
    the same review `clichés` and `cliches`), case is folded, and every character that is not a letter or digit
    is deleted, whitespace included. Deleting whitespace, not collapsing it, is what makes tokenisations agree:
    PTB-style `it 's` / `do n't` (SST-2, CR) and `it's` / `don't` (MR) both become `its` / `dont`, which no
    rule that keeps word boundaries gets without knowing every clitic. Two different texts may rarely share a
    form (`a bout` and `about`); that only removes a source example more, the safe side for a leakage filter.
    """
    return "".join(char for char in unicodedata.normalize("NFKD", text).casefold() if char.isalnum())


def _held_out_by_target(targets: Iterable[str], root: Optional[str]) -> dict[str, set[str]]:
    """Per target, the normalised texts (and pairs) of its `kshot-test` and `kshot-dev` examples, all seeds."""
    held = {}
    for target in targets:
        splits = [split for split in ("kshot-test", "kshot-dev") if split in TASKS[target].splits]
        if not splits:
            raise ValueError(f"Target {target!r} has no k-shot dev or test split to hold out.")
        texts = set()
        for split in splits:
            for seed in KSHOT_SEEDS:  # kshot-test is one file copied per seed here; a task file's may differ
                data = load_split(target, split, seed=seed, root=root)
                texts.update(normalise(text) for text in data["text"])
                texts.update(normalise(pair) for pair in data["text_pair"] if pair is not None)
        texts.discard("")  # a text of punctuation only would match every other such text
        held[target] = texts
    return held


def held_out_texts(targets: Iterable[str], root: Optional[str] = None) -> set[str]:
    """The normalised texts of every target's test examples (`kshot-test`) and its dev examples of all five
    k-shot seeds (`kshot-dev`); a target's `text_pair`, where it has one, counts as a text too.

    Args:
        targets: Keys of `TASKS` with k-shot splits.
        root: The shared data folder (see `benchmarks.core.tasks.data_dir`).
    """
    return set().union(*_held_out_by_target(targets, root).values())


def _pooled(task: str, root: Optional[str]) -> tuple[datasets.Dataset, int]:
    """The task's training examples before the held-out filter, and how many exact duplicates were dropped.

    A task with a full training set gives it whole. Otherwise the k-shot `train` and `dev` files of every seed are
    concatenated (seed by seed, train before dev); LM-BFF drew each seed's examples from the same training set, so
    one example can appear under several seeds: only its first appearance is kept.
    """
    if "train" in TASKS[task].splits:
        return load_split(task, "train", root=root), 0
    parts = [
        load_split(task, split, seed=seed, root=root) for seed in KSHOT_SEEDS for split in ("kshot-train", "kshot-dev")
    ]
    data = datasets.concatenate_datasets(parts)
    seen, first = set(), []
    for index, row in enumerate(zip(data["text"], data["text_pair"], data["label"])):
        if row not in seen:
            seen.add(row)
            first.append(index)
    return data.select(first), len(data) - len(first)


# a source text this long (letters and digits) found inside a held-out text is a fragment of it: SST-2's training
# set holds phrases cut from its sentences, with their sentiment labels, and a quarter of its rows are pieces of MR
# or SUBJ test and dev texts; shorter pieces are common phrases more than leaks
MIN_FRAGMENT = 20


class _Fragments:
    """Finds source texts that occur inside a held-out text: candidates by their first `MIN_FRAGMENT` characters
    (an index of every such window of the held-out texts), confirmed by a search of the held-out texts."""

    def __init__(self, texts: set[str]):
        self.joined = "\0".join(sorted(texts))  # normalised texts hold no NUL, so no match spans two texts
        self.windows = {text[i : i + MIN_FRAGMENT] for text in texts for i in range(len(text) - MIN_FRAGMENT + 1)}

    def __contains__(self, form: str) -> bool:
        return len(form) >= MIN_FRAGMENT and form[:MIN_FRAGMENT] in self.windows and form in self.joined


def _without_held_out(
    task: str, held: dict[str, set[str]], root: Optional[str]
) -> tuple[datasets.Dataset, dict[str, object]]:
    """`source_training_set` against targets already read (`dedup_report` reads them once for all sources)."""
    if task in held:
        raise ValueError(f"Source {task!r} is also a target; a prompt is not transferred to its own task.")
    data, duplicates = _pooled(task, root)
    forms = [
        {normalise(text)} | ({normalise(pair)} if pair is not None else set())
        for text, pair in zip(data["text"], data["text_pair"])
    ]
    overlaps = {target: sum(1 for form in forms if form & texts) for target, texts in held.items()}
    everything = set().union(*held.values())
    exact = [bool(form & everything) for form in forms]
    fragments = _Fragments(everything)
    piece = [not whole and any(text in fragments for text in form) for form, whole in zip(forms, exact)]
    keep = [index for index in range(len(forms)) if not (exact[index] or piece[index])]
    counts = {
        "data": "train" if "train" in TASKS[task].splits else "kshot train+dev, all seeds",
        "before": len(data) + duplicates,
        "duplicates": duplicates,
        "held_out": sum(exact),
        "fragments": sum(piece),
        "after": len(keep),
        "overlaps": overlaps,
    }
    kept = data.select(keep)
    counts["digest"] = kept_rows_digest(kept)
    return kept, counts


def source_training_set(
    task: str, targets: Iterable[str], root: Optional[str] = None
) -> tuple[datasets.Dataset, dict[str, object]]:
    """A source task's training examples, without any example whose text is held out by a target.

    The examples are the task's full `train` split where it has one (sst2, cola, rte), otherwise the k-shot
    `train` and `dev` files of all five seeds pooled, exact duplicates across seeds removed. Every example whose
    normalised `text` or `text_pair` is in `held_out_texts(targets)`, or is a piece of one (`MIN_FRAGMENT`
    letters and digits or more, found inside it), is then dropped. The order is the files'
    (seed by seed for pooled sets) and the same on every call: the caller shuffles with its own seed.

    Args:
        task: The source, a key of `TASKS`; not one of `targets`.
        targets: The tasks the source's prompt is transferred to.
        root: The shared data folder (see `benchmarks.core.tasks.data_dir`).

    Returns:
        The examples (columns `text`, `text_pair`, `label`) and their counts: `data` (which files), `before` (rows
        read), `duplicates` (exact duplicates across seeds removed), `held_out` (removed as held-out texts),
        `fragments` (removed as pieces of held-out texts), `after`, `overlaps` (per target, how many of the
        deduplicated examples share a text with it; an example can overlap several targets) and `digest` (the kept
        rows' `kept_rows_digest`).
    """
    return _without_held_out(task, _held_out_by_target(targets, root), root)


def dedup_report(
    sources: Iterable[str], targets: Iterable[str], root: Optional[str] = None
) -> dict[str, dict[str, object]]:
    """`source_training_set`'s counts for every source, the targets read once: one flat row per source, with the
    per-target overlaps as `overlap_<target>` columns (`pandas.DataFrame.from_dict(report, orient="index")`)."""
    held = _held_out_by_target(targets, root)
    report = {}
    for source in sources:
        counts = _without_held_out(source, held, root)[1]
        overlaps = counts.pop("overlaps")
        report[source] = {**counts, **{f"overlap_{target}": n for target, n in overlaps.items()}}
    return report
