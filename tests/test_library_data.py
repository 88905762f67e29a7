"""The prompt-library suite's data: the MNLI / SNLI / QQP source tasks and source sets without the targets' held-out
text. Tests that read the shared data folder skip where it is absent."""

from collections import Counter

import datasets
import pytest

from benchmarks.core import library_data
from benchmarks.core.library_data import (
    SOURCE_DATA_VERSION,
    dedup_report,
    held_out_texts,
    kept_rows_digest,
    normalise,
    source_training_set,
)
from benchmarks.core.tasks import TASKS, data_dir, load_split
from benchmarks.suites.budgets import suite_budget

TARGETS = ("mr", "subj", "trec", "cr")


def _have_data() -> bool:
    try:
        data_dir()
    except FileNotFoundError:
        return False
    return True


needs_data = pytest.mark.skipif(not _have_data(), reason="the shared data folder (../shared/data) is absent")


@pytest.mark.parametrize(
    "a, b",
    [
        ("it 's a charming journey . ", "it's a charming journey ."),  # SST-2 / MR tokenisation
        ("they do n't make movies", "They don't make movies"),
        ("stock clichés", "stock cliches"),
        ("\u201cquoted\u201d  text", '"quoted" text'),
        ("ﬁne", "fine"),  # the ligature's NFKC form
    ],
)
def test_normalise_ignores_tokenisation_case_accents_and_punctuation(a, b):
    assert normalise(a) == normalise(b)


def test_normalise_keeps_words_and_digits_apart():
    assert normalise("a good film") != normalise("a bad film")
    assert normalise("top 10") != normalise("top 100")
    assert normalise("...") == ""


@needs_data
@pytest.mark.parametrize("name, num_labels", [("mnli", 3), ("snli", 3), ("qqp", 2)])
def test_new_source_tasks_load_balanced_k_shot_splits_without_a_test(name, num_labels):
    task = TASKS[name]
    assert task.num_labels == num_labels and task.splits == ("kshot-train", "kshot-dev")
    for split in task.splits:  # MNLI's dev split is its dev_matched.tsv
        data = load_split(name, split, seed=13)
        assert Counter(data["label"]) == dict.fromkeys(range(num_labels), 16), split
        assert all(data["text"]) and all(data["text_pair"])
    with pytest.raises(ValueError, match="no 'kshot-test' split"):
        load_split(name, "kshot-test", seed=13)


@needs_data
def test_snli_rows_with_five_annotator_labels_read_their_gold_label():
    # label1 ... label5 make this row four fields longer than the header; label1 says neutral, the gold label (the
    # last field) entailment
    data = load_split("snli", "kshot-dev", seed=13)
    row = data[next(i for i, text in enumerate(data["text"]) if text.startswith("A man is wearing orange shorts"))]
    assert row["text_pair"] == "A graffiti artist is using chalk to draw a portrait of two women." and row["label"] == 0


def test_existing_tasks_keep_their_splits():
    assert TASKS["sst2"].splits == ("train", "dev", "kshot-train", "kshot-dev", "kshot-test")
    assert TASKS["rte"].splits == (
        "train",
        "dev",
        "kshot-train",
        "kshot-dev",
        "kshot-test",
        "fewglue-train",
        "fewglue-test",
    )
    assert TASKS["mr"].splits == ("kshot-train", "kshot-dev", "kshot-test")
    assert TASKS["cb"].splits == ("train", "dev", "fewglue-train", "fewglue-test")


def test_new_label_words_start_with_different_tokens():
    from benchmarks.core.models import load_tokenizer

    try:
        tokenizer = load_tokenizer("smollm2")
    except (ImportError, OSError) as exc:
        pytest.skip(f"SmolLM2's tokenizer is not available: {exc}")
    for name in ("mnli", "snli", "qqp"):
        # as Backbone.label_token_ids takes them: the first token of the word with its leading space
        firsts = [tokenizer(word, add_special_tokens=False).input_ids[0] for word in TASKS[name].label_words]
        assert len(set(firsts)) == len(firsts), name


@needs_data
@pytest.mark.parametrize("source", ["mpqa", "snli"])
def test_pooled_sources_hold_no_duplicate_and_no_held_out_text(source):
    data, counts = source_training_set(source, TARGETS)
    rows = list(zip(data["text"], data["text_pair"], data["label"]))
    assert len(set(rows)) == len(rows) == counts["after"]
    assert counts["before"] == counts["after"] + counts["duplicates"] + counts["held_out"] + counts["fragments"]
    held = held_out_texts(TARGETS)
    assert not {normalise(text) for text in data["text"]} & held
    assert not {normalise(pair) for pair in data["text_pair"] if pair is not None} & held


FEATURES = datasets.Features(
    {"text": datasets.Value("string"), "text_pair": datasets.Value("string"), "label": datasets.Value("int64")}
)


def _fake_load_split(task_name, split, seed=42, root=None):
    """Tiny stand-ins: a QNLI pooled across seeds, an RTE training set and an MR whose test and dev share text."""
    rows = {
        ("qnli", "kshot-train", 13): [("Who wrote it ?", "a question", 0), ("x", "y", 1)],
        ("qnli", "kshot-train", 21): [("Something else", "It 's GREAT .", 1)],
        ("qnli", "kshot-train", 42): [("Keep me", "fine", 0), ("Review whose middle part", "q", 1)],
        ("rte", "train", 42): [("A premise .", "it 's great", 0), ("ok", "ok", 1)],
        ("mr", "kshot-test", seed): [("it's great!", None, 1), ("a long review whose middle part leaks", None, 0)],
        ("mr", "kshot-dev", 87): [("who wrote it?", None, 0)],
    }.get((task_name, split, seed), [])
    if (task_name, split) == ("qnli", "kshot-dev"):
        rows = [("x", "y", 1)]  # the same example in every seed's dev file
    text, pair, label = zip(*rows) if rows else ((), (), ())
    return datasets.Dataset.from_dict({"text": text, "text_pair": pair, "label": label}, features=FEATURES)


def test_a_constructed_overlap_is_removed_and_counted(monkeypatch):
    monkeypatch.setattr(library_data, "load_split", _fake_load_split)
    assert held_out_texts(["mr"]) == {"itsgreat", "whowroteit", "alongreviewwhosemiddlepartleaks"}
    data, counts = source_training_set("qnli", ["mr"])
    assert list(zip(data["text"], data["text_pair"])) == [("x", "y"), ("Keep me", "fine")]  # order of the files
    assert counts == {
        "data": "kshot train+dev, all seeds",
        "before": 10,
        "duplicates": 5,
        "held_out": 2,
        "fragments": 1,  # "reviewwhosemiddlepart": 21 letters inside a held-out text
        "after": 2,
        "overlaps": {"mr": 2},
        "digest": kept_rows_digest(data),
    }
    data, counts = source_training_set("rte", ["mr"])
    assert data["text"] == ["ok"] and counts["data"] == "train" and counts["held_out"] == 1
    report = dedup_report(["qnli", "rte"], ["mr"])
    assert report["qnli"]["overlap_mr"] == 2 and report["rte"]["after"] == 1
    with pytest.raises(ValueError, match="also a target"):
        source_training_set("mr", ["mr"])


# the rows each source of the smollm2-library suite keeps, at each SOURCE_DATA_VERSION (`kept_rows_digest`)
KEPT_ROWS = {
    1: {
        "sst2": "5d793526d74e",
        "cola": "bc6d094d10e6",
        "rte": "d1aab70a7617",
        "qnli": "11ea10c205c2",
        "mnli": "3d94d125ce45",
        "snli": "8838fcace18a",
        "qqp": "723d84c69782",
        "mpqa": "131dfe390727",
    }
}


@needs_data
def test_the_library_sources_keep_the_rows_of_their_data_version():
    """The cached source stages and the recorded runs of the library suite are keyed by SOURCE_DATA_VERSION, not by
    the rows: a change to the held-out rule, the pooling or the shared data that changes what a source keeps must come
    with a new version, or the suite would reuse prompts trained on other rows and mix their runs with new ones."""
    budget = suite_budget("smollm2-library")
    found = {
        source: row["digest"] for source, row in dedup_report(budget.library_sources, budget.library_targets).items()
    }
    assert found == KEPT_ROWS[SOURCE_DATA_VERSION], (
        "The rows the library sources keep have changed: bump SOURCE_DATA_VERSION in benchmarks/core/library_data.py "
        f"and record these digests under the new version here: {found}"
    )
