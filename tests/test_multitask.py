"""The shared multi-task helpers: task_ids validation and combine_tasks."""

from __future__ import annotations

from collections import Counter

import datasets
import pytest
import torch

from peft_prompt_transfer.multitask import check_task_ids, combine_tasks, sampling_probabilities


@pytest.mark.parametrize(
    "task_ids, message",
    [
        (None, "needs task_ids, but none were given.*TaskIdsCollator"),
        ([0, 1], "must be a torch.LongTensor, got list"),
        (torch.tensor([0.0, 1.0]), "integer task indices.*got dtype torch.float32"),
        (torch.tensor([0, 1, 1]), r"shape \[batch_size\] = \[2\].*got \[3\]"),
        (torch.tensor([[0, 1]]), r"shape \[batch_size\] = \[2\].*got \[1, 2\]"),
        (torch.tensor([0, 3]), r"task_ids \[3\] are out of range: this adapter has 3 tasks \(ids 0..2\)"),
        (torch.tensor([-1, 0]), r"task_ids \[-1\] are out of range"),
    ],
)
def test_bad_task_ids_fail_clearly(task_ids, message):
    with pytest.raises(ValueError, match=message):
        check_task_ids(task_ids, batch_size=2, num_tasks=3, method="COMPT")


def test_good_task_ids_pass_as_long():
    out = check_task_ids(torch.tensor([2, 0], dtype=torch.int32), batch_size=2, num_tasks=3, method="COMPT")
    assert out.dtype == torch.long and out.tolist() == [2, 0]


def test_sampling_probabilities():
    assert sampling_probabilities([100, 300]) == [0.25, 0.75]
    assert sampling_probabilities([100, 300], "equal") == [0.5, 0.5]
    low, high = sampling_probabilities([100, 400], "temperature", temperature=2.0)
    assert high / low == pytest.approx(2.0)  # sqrt(400 / 100)
    with pytest.raises(ValueError, match="sampling must be"):
        sampling_probabilities([1], "uniform")
    with pytest.raises(ValueError, match="at least one example"):
        sampling_probabilities([3, 0])


def _task(n, offset):
    return datasets.Dataset.from_dict(
        {"input_ids": [[offset + i] for i in range(n)], "labels": [i % 2 for i in range(n)]}
    )


@pytest.mark.parametrize("sampling, expected", [("proportional", {0: 10, 1: 30}), ("equal", {0: 20, 1: 20})])
def test_combine_tasks_counts_and_ids(sampling, expected):
    mixed = combine_tasks({"a": _task(10, 0), "b": _task(30, 1000)}, sampling=sampling, seed=1)
    assert Counter(mixed["task_ids"]) == expected
    assert set(mixed.column_names) == {"input_ids", "labels", "task_ids"}
    for row in mixed:  # every row keeps its own task's data
        assert (row["input_ids"][0] >= 1000) == (row["task_ids"] == 1)
    # task a was repeated to reach 20 with equal sampling: every example at least once before any twice
    a_rows = Counter(r["input_ids"][0] for r in mixed if r["task_ids"] == 0)
    assert set(a_rows) == set(range(10)) and max(a_rows.values()) - min(a_rows.values()) <= 1
    assert mixed["task_ids"] != sorted(mixed["task_ids"])  # shuffled: tasks are mixed within batches


def test_combine_tasks_is_seeded_and_sized():
    parts = [_task(5, 0), _task(7, 100), _task(9, 200)]
    first = combine_tasks(parts, sampling="temperature", temperature=3.0, num_examples=50, seed=3)
    assert len(first) == 50 and first["task_ids"] == combine_tasks(parts, "temperature", 3.0, 50, seed=3)["task_ids"]


def test_combine_tasks_takes_ids_from_task_names():
    # a mapping's tasks get their positions in the config's task_names, whatever the mapping's order
    mixed = combine_tasks({"a": _task(3, 0), "b": _task(3, 1000)}, task_names=["b", "a"])
    assert all((row["input_ids"][0] >= 1000) == (row["task_ids"] == 0) for row in mixed)
    # only a task added later (add_tasks): its rows get its own id, not 0
    added = combine_tasks({"gamma": _task(4, 0)}, task_names=["a", "b", "gamma"])
    assert added["task_ids"] == [2] * 4


def test_combine_tasks_errors():
    with pytest.raises(ValueError, match=r"task\(s\) \['c'\] are not in task_names \['a', 'b'\]; add them"):
        combine_tasks({"a": _task(2, 0), "c": _task(2, 0)}, task_names=["a", "b"])
    with pytest.raises(ValueError, match="3 datasets for 2 task names"):
        combine_tasks([_task(2, 0)] * 3, task_names=["a", "b"])
    with pytest.raises(ValueError, match="dataset 1 has columns"):
        combine_tasks([_task(2, 0), _task(2, 0).remove_columns("labels")])
    with pytest.raises(ValueError, match="already have a task_ids column"):
        combine_tasks([_task(2, 0).add_column("task_ids", [0, 0])])
