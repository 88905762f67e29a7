"""Adding tasks to a trained ComPT adapter without changing the existing tasks."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Optional, Union

import torch
from peft import PeftModel
from peft.utils import ModulesToSaveWrapper

from .config import ComPTConfig
from .model import ComPTEncoder


def add_tasks(model: PeftModel, new_tasks: Union[Sequence[str], int], adapter_name: Optional[str] = None) -> PeftModel:
    """Extend a trained ComPT adapter with new tasks, trained few-shot while everything else stays frozen.

    Each new task gets a private prompt, a router row and gates; the source prompts, the prompt MLP, the existing
    tasks' private prompts, router rows and gates, and any `modules_to_save` head are frozen. The existing tasks'
    outputs therefore stay bit-for-bit unchanged however long the new tasks train (the paper's
    catastrophic-forgetting claim, made testable). The adapter's config records the new tasks and
    `num_frozen_tasks`, so saving, loading and Trainer resumption keep the split.

    Args:
        model (`PeftModel`): A model with a ComPT adapter. If the adapter has a prompt MLP, it must hold its
            training state (not loaded for inference), since the frozen tasks' raw prompts are needed.
        new_tasks (`Sequence[str]` or `int`): Names of the new tasks (if the adapter has task names) or how many
            unnamed tasks to add. New task ids follow the existing ones.
        adapter_name (`str`, *optional*): The adapter to extend; defaults to the active one.

    Returns:
        The same model, extended in place.
    """
    adapter_name = adapter_name or model.active_adapter
    config = model.peft_config[adapter_name]
    if not isinstance(config, ComPTConfig):
        raise ValueError(f"add_tasks extends ComPT adapters; adapter {adapter_name!r} is {config.peft_type}.")
    old = model.prompt_encoder[adapter_name]
    if config.prompt_encoder == "per_prompt":
        raise ValueError(
            "add_tasks does not support prompt_encoder='per_prompt' yet: every private prompt has its own encoder, "
            "and the existing tasks' encoders would have to be frozen apart from the new ones."
        )
    if config.prompt_mlp_bottleneck_size is not None and old.reparameterization is None:
        raise ValueError(
            "This ComPT adapter was loaded for inference, so its prompt MLP is folded away and the raw prompts are "
            "gone. Load it with its training state first: build the model with get_peft_model(base, config) and "
            "call model.load_adapter(path, adapter_name, is_trainable=True)."
        )
    if isinstance(new_tasks, int):
        if config.task_names is not None:
            raise ValueError(f"This adapter's tasks have names {config.task_names}; pass the new tasks' names.")
        if new_tasks < 1:
            raise ValueError(f"new_tasks must be at least 1, got {new_tasks}.")
        changes = {"num_tasks": config.num_tasks + new_tasks}
    else:
        if config.task_names is None:
            raise ValueError("This adapter's tasks have no names; pass the number of tasks to add.")
        changes = {"task_names": list(config.task_names) + list(new_tasks), "num_tasks": None}
    new_config = dataclasses.replace(config, **changes, num_frozen_tasks=config.num_tasks, inference_mode=False)

    encoder = ComPTEncoder(new_config, model.word_embeddings).to(old.embedding.weight.device)
    with torch.no_grad():
        encoder.embedding.weight.copy_(old.embedding.weight)
        if old.reparameterization is not None:
            encoder.reparameterization.load_state_dict(old.reparameterization.state_dict())
        encoder.sampling_step.copy_(old.sampling_step)
        for table_name in ("private", "router", "gates", "shares"):
            old_table, table = getattr(old, table_name), getattr(encoder, table_name)
            if table is not None:
                table.frozen.copy_(old_table.value())
    model.peft_config[adapter_name] = new_config
    model.prompt_encoder[adapter_name] = encoder
    # a shared classification head would change the old tasks' outputs too
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            module.modules_to_save[adapter_name].requires_grad_(False)
    return model
