"""Shared multi-task pieces: `task_ids` validation, a collator that carries them, and mixing several datasets into one
training set."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Optional, Union

import torch

if TYPE_CHECKING:  # imported where it is used, so that the package itself does not need `datasets`
    import datasets

TASK_IDS_HELP = (
    "Pass `task_ids` (a LongTensor of shape [batch_size] with one task index per example) to forward() and "
    "generate(), or fix one task for calls without them (pipelines) with set_active_task(model, task). The "
    "transformers Trainer and TRL's trainers keep a dataset's `task_ids` column and carry it through their collator "
    "once `peft_prompt_transfer` is imported; in your own loop, a collator that keeps only the keys it knows drops "
    "it, so wrap it: TaskIdsCollator(your_collator)."
)


class TaskIdsCollator:
    """
    Carries a `task_ids` column through any data collator.

    Many collators build the batch from the keys they know (TRL's language-modelling collator keeps `input_ids`
    and its masks) and so drop `task_ids`. This wrapper collates the examples with `collator` and, if the batch
    came back without `task_ids`, adds the examples' `task_ids` as a tensor `[batch_size]` (stacked as given, so
    that the model's check names a wrong dtype rather than this collator rounding it). A collator that keeps
    `task_ids` (or examples without them) passes through unchanged. The Trainer (and TRL's trainers, which build on
    it) wrap their collator like this by themselves for adapters that take `task_ids`; use it in your own loop.

    Args:
        collator (`Callable`): The collator to wrap, e.g. `DataCollatorWithPadding(tokenizer)`.
    """

    def __init__(self, collator: Callable[[list], Any]):
        self.collator = collator.collator if isinstance(collator, TaskIdsCollator) else collator

    def __call__(self, features: list) -> Any:
        has_task_ids = bool(features) and isinstance(features[0], Mapping) and "task_ids" in features[0]
        task_ids = torch.stack([torch.as_tensor(feature["task_ids"]) for feature in features]) if has_task_ids else None
        batch = self.collator(features)
        if task_ids is not None and "task_ids" not in batch:
            batch["task_ids"] = task_ids
        return batch


def check_task_ids(task_ids: Optional[torch.Tensor], batch_size: int, num_tasks: int, method: str) -> torch.Tensor:
    """Validate the `task_ids` of one batch and return them.

    Raises a `ValueError` that says what is wrong and how to fix it when `task_ids` is missing, not an integer
    tensor, not of shape `[batch_size]`, or names a task outside `[0, num_tasks)`.
    """
    if task_ids is None:
        raise ValueError(f"{method} needs task_ids, but none were given. {TASK_IDS_HELP}")
    if not isinstance(task_ids, torch.Tensor):
        raise ValueError(f"task_ids must be a torch.LongTensor, got {type(task_ids).__name__}. {TASK_IDS_HELP}")
    if task_ids.dtype in (torch.bool,) or task_ids.is_floating_point() or task_ids.is_complex():
        raise ValueError(
            f"task_ids must hold integer task indices (torch.long), got dtype {task_ids.dtype}; "
            "convert them with task_ids.long()."
        )
    if task_ids.dim() != 1 or task_ids.shape[0] != batch_size:
        raise ValueError(
            f"task_ids must have shape [batch_size] = [{batch_size}] (one task index per example), got "
            f"{list(task_ids.shape)}."
        )
    if batch_size and (int(task_ids.min()) < 0 or int(task_ids.max()) >= num_tasks):
        bad = sorted({int(t) for t in task_ids.tolist() if not 0 <= t < num_tasks})
        raise ValueError(
            f"task_ids {bad} are out of range: this adapter has {num_tasks} tasks (ids 0..{num_tasks - 1}). "
            "Check the task order of the config's task_names."
        )
    return task_ids.long()


def sampling_probabilities(
    sizes: Sequence[int], sampling: str = "proportional", temperature: float = 2.0
) -> list[float]:
    """Per-task sampling probabilities.

    `proportional`: p_k ~ n_k. `equal`: p_k = 1/K. `temperature`: p_k ~ n_k^(1/T), which moves from proportional
    (T = 1) towards equal (T -> inf), as in multilingual and multi-task training.
    """
    if not sizes or any(n <= 0 for n in sizes):
        raise ValueError(f"every task needs at least one example, got sizes {list(sizes)}")
    if sampling == "proportional":
        weights = [float(n) for n in sizes]
    elif sampling == "equal":
        weights = [1.0] * len(sizes)
    elif sampling == "temperature":
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        weights = [float(n) ** (1.0 / temperature) for n in sizes]
    else:
        raise ValueError(f"sampling must be 'proportional', 'equal' or 'temperature', got {sampling!r}")
    total = sum(weights)
    return [w / total for w in weights]


def _largest_remainder(total: int, probabilities: Sequence[float]) -> list[int]:
    raw = [total * p for p in probabilities]
    counts = [math.floor(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - counts[i], reverse=True)[: total - sum(counts)]:
        counts[i] += 1
    return counts


def combine_tasks(
    datasets: Union[Mapping[str, datasets.Dataset], Sequence[datasets.Dataset]],
    sampling: str = "proportional",
    temperature: float = 2.0,
    num_examples: Optional[int] = None,
    seed: int = 0,
    task_names: Optional[Sequence[str]] = None,
) -> datasets.Dataset:
    """Mix several tokenised `datasets.Dataset`s into one shuffled training set with a `task_ids` column.

    Args:
        datasets: One dataset per task, as a mapping `{task_name: dataset}` or a sequence (task `i` is the `i`-th
            dataset). All must have the same columns. A mapping's order gives the task ids, unless `task_names` is
            given.
        sampling: How many examples each task contributes: `"proportional"` to its size, `"equal"`, or
            `"temperature"` (sizes to the power 1/`temperature`).
        temperature: The sampling temperature for `"temperature"`.
        num_examples: Size of the mixed set; defaults to the sum of the dataset sizes. A task that must contribute
            more examples than it has is repeated (every example once before any twice).
        seed: Seed for the choice of examples and the shuffle.
        task_names: A config's `task_names`. With a mapping, each task's id is its position in `task_names`, so a
            subset of the tasks (such as a task added with `add_tasks`) gets the ids the adapter expects. With a
            sequence, checks that there is one dataset per name.

    Returns:
        A `datasets.Dataset` with the input columns and an int64 `task_ids` column, shuffled.
    """
    try:
        import datasets as hf_datasets
    except ImportError as err:
        raise ImportError(
            "combine_tasks works on datasets.Dataset objects and needs the datasets package: "
            "pip install 'peft-prompt-transfer[data]'"
        ) from err

    if isinstance(datasets, Mapping):
        names, parts = list(datasets), list(datasets.values())
        positions = {name: i for i, name in enumerate(task_names if task_names is not None else names)}
        unknown = [name for name in names if name not in positions]
        if unknown:
            raise ValueError(
                f"task(s) {unknown} are not in task_names {list(task_names)}; add them to the config "
                "(or to a trained ComPT adapter with add_tasks) first."
            )
        task_ids = [positions[name] for name in names]
    else:
        parts = list(datasets)
        if task_names is not None and len(task_names) != len(parts):
            raise ValueError(f"{len(parts)} datasets for {len(task_names)} task names.")
        task_ids = range(len(parts))
    if not parts:
        raise ValueError("combine_tasks needs at least one dataset.")
    columns = set(parts[0].column_names)
    for i, part in enumerate(parts):
        if set(part.column_names) != columns:
            raise ValueError(f"dataset {i} has columns {sorted(part.column_names)}, dataset 0 has {sorted(columns)}.")
        if "task_ids" in columns:
            raise ValueError("the datasets already have a task_ids column; combine_tasks adds it.")
    sizes = [len(part) for part in parts]
    probabilities = sampling_probabilities(sizes, sampling, temperature)
    total = sum(sizes) if num_examples is None else int(num_examples)
    if total <= 0:
        raise ValueError(f"num_examples must be positive, got {num_examples}")
    generator = torch.Generator().manual_seed(seed)
    selected = []
    for task_id, part, count in zip(task_ids, parts, _largest_remainder(total, probabilities)):
        if count == 0:
            continue
        order = torch.cat([torch.randperm(len(part), generator=generator) for _ in range(math.ceil(count / len(part)))])
        chosen = part.select(order[:count].tolist())
        selected.append(chosen.add_column("task_ids", [task_id] * count))
    mixed = hf_datasets.concatenate_datasets(selected)
    return mixed.shuffle(seed=seed)
