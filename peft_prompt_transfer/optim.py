"""Optimizer parameter groups that train the parts of a prompt encoder at their own learning rates."""

from __future__ import annotations

from typing import Optional

import torch
from peft import PeftModel


def parameter_groups(
    model: PeftModel,
    parts: dict[str, list[torch.nn.Parameter]],
    lrs: dict[str, float],
    other_lr: float,
    weight_decay: float = 0.0,
) -> list[dict]:
    """One optimizer parameter group per named part of an encoder, plus `other` for the rest.

    `parts` maps a group name to its parameters and `lrs` the name to its learning rate; every trainable parameter
    of `model` not in a part (e.g. a classification head from `modules_to_save`) goes to `other`, at `other_lr`.
    Only trainable parameters are listed, each once; empty groups are left out.
    """
    for name, lr in lrs.items():
        if not lr >= 0:
            raise ValueError(f"{name}_lr must be >= 0, got {lr}.")
    claimed = {id(p) for params in parts.values() for p in params}
    parts = {**parts, "other": [p for p in model.parameters() if p.requires_grad and id(p) not in claimed]}
    lrs = {**lrs, "other": other_lr}
    groups = []
    for name, params in parts.items():
        params = [p for p in params if p.requires_grad]
        if params:
            groups.append({"name": name, "params": params, "lr": lrs[name], "weight_decay": weight_decay})
    return groups


def adapter_encoder(model: PeftModel, adapter_name: Optional[str], config_cls: type, helper: str):
    """The prompt encoder of `adapter_name` (default: the active adapter), checked to be configured by
    `config_cls`."""
    adapter_name = adapter_name or model.active_adapter
    if not isinstance(model.peft_config.get(adapter_name), config_cls):
        raise ValueError(f"{helper} needs a {config_cls.__name__} adapter; {adapter_name!r} is not one.")
    return model.prompt_encoder[adapter_name]
