"""Separate learning rates for ComPT's source prompts, private prompts and router/gates."""

from __future__ import annotations

from typing import Optional

import torch
from peft import PeftModel

from ..optim import adapter_encoder, parameter_groups
from .config import ComPTConfig


def compt_parameter_groups(
    model: PeftModel,
    source_lr: float,
    private_lr: float,
    router_lr: float,
    other_lr: Optional[float] = None,
    weight_decay: float = 0.0,
    adapter_name: Optional[str] = None,
) -> list[dict]:
    """Optimizer parameter groups that train ComPT's parts at different speeds, as the paper does.

    Groups (only trainable parameters, each listed once): `source` (source prompts and the prompt MLP),
    `private` (private prompts), `router` (router logits and gates) and `other` (anything else trainable, e.g. a
    classification head from `modules_to_save`, at `other_lr`, default `source_lr`). Empty groups are left out.

    Use them with any torch optimizer, and with the Trainer through `optimizers=`:

    ```py
    >>> optimizer = torch.optim.AdamW(compt_parameter_groups(model, source_lr=3e-1, private_lr=3e-2, router_lr=1e-2))
    >>> trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None))
    ```

    The Trainer's learning-rate schedule then scales every group by the same factor.
    """
    encoder = adapter_encoder(model, adapter_name, ComPTConfig, "compt_parameter_groups")
    parts = {
        "source": [encoder.embedding.weight]
        + ([] if encoder.reparameterization is None else list(encoder.reparameterization.parameters())),
        "private": [] if encoder.private is None else [encoder.private.trainable],
        "router": [encoder.router.trainable] + ([] if encoder.gates is None else [encoder.gates.trainable]),
    }
    lrs = {"source": source_lr, "private": private_lr, "router": router_lr}
    return parameter_groups(model, parts, lrs, source_lr if other_lr is None else other_lr, weight_decay)


def create_compt_optimizer(
    model: PeftModel,
    optimizer_cls: type = torch.optim.AdamW,
    optimizer_kwargs: Optional[dict] = None,
    **group_kwargs,
) -> torch.optim.Optimizer:
    """`optimizer_cls` (AdamW by default) over [`compt_parameter_groups`]`(model, **group_kwargs)`.

    Pass it to the Trainer as `Trainer(..., optimizers=(optimizer, None))`.
    """
    return optimizer_cls(compt_parameter_groups(model, **group_kwargs), **(optimizer_kwargs or {}))
