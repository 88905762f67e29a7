"""Separate learning rates for ComPT's source prompts, private prompts and router/gates."""

from __future__ import annotations

from typing import Optional

import torch
from peft import PeftModel

from ..optim import adapter_encoder, parameter_groups
from .config import ComPTConfig

# the learning rates of the authors' CrossPT configs: prompt_learning_rate 0.05 (source and private prompts with
# their encoders), attn_learning_rate 0.1 (router and share logits); their schedule: linear with 20% warm-up
COMPT_AUTHORS_LEARNING_RATES = {"source_lr": 0.05, "private_lr": 0.05, "router_lr": 0.1}


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

    Groups (only trainable parameters, each listed once): `source` (source prompts and their prompt encoder, or
    the shared prompt MLP), `private` (private prompts and their per-prompt encoders), `router` (router logits and
    gates or share logits) and `other` (anything else trainable, e.g. a
    classification head from `modules_to_save`, at `other_lr`, default `source_lr`). Empty groups are left out.

    Use them with any torch optimizer, and with the Trainer through `optimizers=`:

    ```py
    >>> optimizer = torch.optim.AdamW(compt_parameter_groups(model, source_lr=3e-1, private_lr=3e-2, router_lr=1e-2))
    >>> trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None))
    ```

    The Trainer's learning-rate schedule then scales every group by the same factor. The authors' rates are
    `compt_parameter_groups(model, **COMPT_AUTHORS_LEARNING_RATES)`.
    """
    encoder = adapter_encoder(model, adapter_name, ComPTConfig, "compt_parameter_groups")

    def params(*modules) -> list[torch.nn.Parameter]:
        return [p for module in modules if module is not None for p in module.parameters()]

    parts = {
        "source": [encoder.embedding.weight] + params(encoder.reparameterization),
        "private": params(encoder.private, encoder.private_reparameterization),
        "router": params(encoder.router, encoder.gates, encoder.shares),
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
