"""The optimizer pre-step gradient hook: a per-parameter transform of the accumulated gradient, applied right
before every optimizer step (how the encoder turns any torch optimizer into SVGD)."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ..base import full_tensor, reshard_like

_STEP_TRANSFORM_ATTR = "_peft_prompt_transfer_step_transform"
_TRANSFORMED_ATTR = "_peft_prompt_transfer_transformed_grad"
_step_hook_handle = None
# module -> {name of its parameter: weak reference to the transform}: see register_module_pre_step_gradient_transform
_module_transforms: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, weakref.WeakMethod]] = (
    weakref.WeakKeyDictionary()
)


def register_pre_step_gradient_transform(
    parameter: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    """Have `parameter.grad` replaced by `transform(parameter.grad)` right before every optimizer step.

    The transform runs in a global torch optimizer step pre-hook, so it works with any `torch.optim.Optimizer`
    (and the transformers Trainer, which steps one) without changing the training loop, and it runs once per
    optimizer step, on the gradient accumulated over all micro-batches (and, under DDP, already averaged across
    processes). It runs after the Trainer's gradient clipping. A parameter whose `grad` is None (no backward pass
    since the last `zero_grad`) is left alone. Registering again replaces the transform.

    Under FSDP2 the parameter and its gradient are `DTensor`s sharded across ranks, and the gradient is already
    reduced. The transform is given the whole gradient (gathered) and each rank keeps its shard of the result, so
    a transform that couples rows (SVGD couples all particles) sees every row, and every rank applies the same
    update; a transform that reads the parameter must read it whole (`base.full_tensor`).
    """
    global _step_hook_handle
    if _step_hook_handle is None:
        _step_hook_handle = register_optimizer_step_pre_hook(_apply_step_transforms)
    setattr(parameter, _STEP_TRANSFORM_ATTR, transform)


def register_module_pre_step_gradient_transform(
    module: torch.nn.Module, parameter_name: str, transform: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    """[`register_pre_step_gradient_transform`] for whatever parameter `module.<parameter_name>` is at step time.

    FSDP2 replaces a module's parameters by sharded ones, which the optimizer steps, and swaps whole ones in only
    for forward and backward: a transform registered on the parameter seen in `forward` would never reach the
    optimizer. `transform` must be a bound method (of `module`, typically); it is held weakly, so registering does
    not keep the module alive.
    """
    register_pre_step_gradient_transform(getattr(module, parameter_name), transform)
    _module_transforms.setdefault(module, {})[parameter_name] = weakref.WeakMethod(transform)


def _apply_step_transforms(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    for module, transforms in list(_module_transforms.items()):
        for parameter_name, transform_ref in transforms.items():
            transform = transform_ref()
            if transform is not None:
                setattr(getattr(module, parameter_name), _STEP_TRANSFORM_ATTR, transform)
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
                # in place: DDP's gradient buckets may be views of this tensor
                grad.copy_(reshard_like(transform(full_tensor(grad)), grad))
            setattr(param, _TRANSFORMED_ATTR, (weakref.ref(grad), grad._version))
