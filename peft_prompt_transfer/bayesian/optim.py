"""Separate learning rates for a decomposed Bayesian target prompt's full-rank and low-rank parts."""

from __future__ import annotations

from typing import Optional

from peft import PeftModel

from ..optim import adapter_encoder, parameter_groups
from .config import BayesianPromptConfig


def bayesian_parameter_groups(
    model: PeftModel,
    shared_lr: float,
    task_lr: float,
    other_lr: Optional[float] = None,
    weight_decay: float = 0.0,
    adapter_name: Optional[str] = None,
) -> list[dict]:
    """Optimizer parameter groups that train a target prompt `S ⊙ (U V)` (`target_prompt="decomposed"`) as the
    paper does, each part at its own learning rate.

    Groups (only trainable parameters, each listed once): `shared` (`S`, the full-rank prompt from the posterior;
    for a plain target or a source stage, the prompt or the particles), `task` (`U` and `V`, the low-rank factors)
    and `other` (anything else trainable, e.g. a classification head from `modules_to_save`, at `other_lr`, default
    `shared_lr`). Empty groups are left out.

    ```py
    >>> optimizer = torch.optim.AdamW(bayesian_parameter_groups(model, shared_lr=3e-1, task_lr=1e-4))
    >>> trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None))
    ```

    The Trainer's learning-rate schedule then scales every group by the same factor.
    """
    encoder = adapter_encoder(model, adapter_name, BayesianPromptConfig, "bayesian_parameter_groups")
    task = [p for p in (encoder.task_cols, encoder.task_rows) if p is not None]
    parts = {"shared": [encoder.embedding.weight], "task": task}
    lrs = {"shared": shared_lr, "task": task_lr}
    return parameter_groups(model, parts, lrs, shared_lr if other_lr is None else other_lr, weight_decay)
