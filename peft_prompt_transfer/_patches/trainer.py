"""The transformers Trainer (and TRL's trainers, which inherit it): keep and carry the `task_ids` column."""

from __future__ import annotations

from typing import Any

from .._compat import is_ours
from ..multitask import TaskIdsCollator
from .patching import Patch, PatchGroup


def _takes_task_ids(model: Any) -> bool:
    peft_config = getattr(model, "peft_config", None)
    return isinstance(peft_config, dict) and any(
        is_ours(config) and config.takes_task_ids for config in peft_config.values()
    )


def _wrap_trainer_get_dataloader(original):
    def _get_dataloader(self, dataset, *args, **kwargs):
        if not _takes_task_ids(self.model):
            return original(self, dataset, *args, **kwargs)
        # `remove_unused_columns` keeps the columns the trainer's `_set_signature_columns_if_needed` names (the base
        # model's forward arguments; TRL names its own): `task_ids` is a PeftModel argument, so add it
        self._set_signature_columns_if_needed()
        if "task_ids" not in self._signature_columns:
            self._signature_columns = list(self._signature_columns) + ["task_ids"]
        collator = self.data_collator
        self.data_collator = TaskIdsCollator(collator)  # this call only: the trainer's collator stays the user's
        try:
            return original(self, dataset, *args, **kwargs)
        finally:
            self.data_collator = collator

    return _get_dataloader


TRAINER_TASK_IDS = PatchGroup(
    name="the Trainer's task_ids column",
    kind="convenience",
    patches=(Patch("transformers:Trainer._get_dataloader", _wrap_trainer_get_dataloader, ("dataset",)),),
    uses=("transformers:Trainer._set_signature_columns_if_needed",),
    lost=(
        "the transformers Trainer and TRL's trainers drop a dataset's task_ids column, so ComPT and a Bayesian "
        "source with source_tasks get no task_ids: pass TrainingArguments(remove_unused_columns=False) and "
        "data_collator=TaskIdsCollator(your_collator), or train in your own loop with explicit task_ids."
    ),
)
