"""Particle assignment: which particle each row of a batch gets, and the batches (and data collator) that repeat
every example once per particle."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Optional

import torch


def assign_particles(batch_size: int, num_particles: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """The particle of each row of a batch: row `b` goes to particle `b mod M`.

    Round robin (rather than contiguous blocks) keeps the assignment the same when a batch is split into
    micro-batches whose size is a multiple of M (gradient accumulation, data parallelism), and it is exactly
    the layout of [`expand_for_particles`], whose row `b * M + m` is example `b` for particle `m`.
    """
    return torch.arange(batch_size, device=device) % num_particles


def _check_num_particles(num_particles: int) -> None:
    if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles <= 0:
        raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}.")


def expand_for_particles(batch: Mapping[str, Any], num_particles: int) -> dict[str, Any]:
    """Repeat every example of a batch M times in a row, so that every particle sees every example.

    Row `b * M + m` of the result is example `b`, and the encoder gives it to particle `m`
    ([`assign_particles`]), so one forward pass over the expanded batch evaluates all M particles on all
    examples. Every tensor whose first dimension is the batch size (`input_ids`, `attention_mask`, `labels`,
    `task_ids`, `decoder_input_ids`, ...) is expanded; other values are kept as they are.
    """
    _check_num_particles(num_particles)
    reference = batch.get("input_ids", batch.get("inputs_embeds"))
    if reference is None:
        raise ValueError(
            f"expand_for_particles needs input_ids or inputs_embeds in the batch, got keys {sorted(batch)}."
        )
    batch_size = reference.shape[0]
    return {
        key: value.repeat_interleave(num_particles, dim=0)
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch_size
        else value
        for key, value in batch.items()
    }


class ParticleReplicationCollator:
    """
    A data collator for `particle_assignment="replicated"`: collates a batch, then expands it M times
    ([`expand_for_particles`]).

    With `per_device_train_batch_size=B` the model sees `B * M` rows per step and every particle is trained on all
    B examples. peft calls the prompt encoder with the batch size only, so the expansion must happen before the
    model: in the collator, where the Trainer's saving, checkpointing and resuming are untouched.

    Args:
        num_particles (`int`): M, the config's `num_particles`.
        collator (`Callable`, *optional*): The collator to wrap; defaults to transformers' `default_data_collator`.
    """

    def __init__(self, num_particles: int, collator: Optional[Callable] = None):
        _check_num_particles(num_particles)
        if collator is None:
            from transformers import default_data_collator

            collator = default_data_collator
        self.num_particles = num_particles
        self.collator = collator

    def __call__(self, features: list) -> dict[str, Any]:
        return expand_for_particles(self.collator(features), self.num_particles)
