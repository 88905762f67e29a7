"""The optimizer pre-step gradient hook: a per-parameter transform of the accumulated gradient, applied right
before every optimizer step (how the encoder turns any torch optimizer into SVGD)."""

from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

_STEP_TRANSFORM_ATTR = "_peft_prompt_transfer_step_transform"
_TRANSFORMED_ATTR = "_peft_prompt_transfer_transformed_grad"
_step_hook_handle = None


def register_pre_step_gradient_transform(
    parameter: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    """Have `parameter.grad` replaced by `transform(parameter.grad)` right before every optimizer step.

    The transform runs in a global torch optimizer step pre-hook, so it works with any `torch.optim.Optimizer`
    (and the transformers Trainer, which steps one) without changing the training loop, and it runs once per
    optimizer step, on the gradient accumulated over all micro-batches (and, under DDP, already averaged across
    processes). It runs after the Trainer's gradient clipping. A parameter whose `grad` is None (no backward pass
    since the last `zero_grad`) is left alone. Registering again replaces the transform.
    """
    global _step_hook_handle
    if _step_hook_handle is None:
        _step_hook_handle = register_optimizer_step_pre_hook(_apply_step_transforms)
    setattr(parameter, _STEP_TRANSFORM_ATTR, transform)


def _apply_step_transforms(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    for group in optimizer.param_groups:
        for param in group["params"]:
            transform = getattr(param, _STEP_TRANSFORM_ATTR, None)
            grad = param.grad
            if transform is None or grad is None:
                continue
            # A wrapper optimizer that steps an inner one, or a parameter in two optimizers, reaches this hook twice
            # for one gradient: transform it only once. Backward and zero_grad replace the grad or bump its version.
            done = getattr(param, _TRANSFORMED_ATTR, None)
            if done is not None and done[0]() is grad and done[1] == grad._version:
                continue
            with torch.no_grad():
                grad.copy_(transform(grad))  # in place: DDP's gradient buckets may be views of this tensor
            setattr(param, _TRANSFORMED_ATTR, (weakref.ref(grad), grad._version))
