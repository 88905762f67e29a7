"""Export a trained prompt as a standard peft PROMPT_TUNING adapter that loads without this plugin."""

from __future__ import annotations

import os
import tempfile
from typing import Optional, Union

from huggingface_hub import ModelCard, ModelCardData
from peft import PeftModel, PromptTuningConfig, get_peft_model_state_dict
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import save_file

from ._compat import PACKAGE_NAME, is_ours, prompt_tuning_config_like
from .model_card import loading_snippet


def export_prompt_tuning(
    model: PeftModel,
    save_directory: Union[str, os.PathLike],
    task: Optional[Union[int, str]] = None,
    adapter_name: Optional[str] = None,
) -> PromptTuningConfig:
    """Write the prompt a model uses at inference as a plain peft `PROMPT_TUNING` adapter.

    The result holds only `prompt_embeddings` (and, for sequence classification, the trained head
    from `modules_to_save`), loads with stock peft (`PeftModel.from_pretrained`) in a process that never
    imports this package, and gives the same logits as `model`.

    Args:
        model (`PeftModel`): A model with one of this package's adapters.
        save_directory (`str` or `os.PathLike`): Where to write `adapter_config.json`,
            `adapter_model.safetensors` and `README.md`. Created if missing.
        task (`int` or `str`, *optional*): For multi-task methods, the task whose prompt to export.
        adapter_name (`str`, *optional*): The adapter to export; defaults to the active one.

    Returns:
        The `PromptTuningConfig` that was written.
    """
    adapter_name = adapter_name or model.active_adapter
    if adapter_name not in model.peft_config:
        raise ValueError(f"No adapter named {adapter_name!r}; the model has {sorted(model.peft_config)}.")
    config = model.peft_config[adapter_name]
    if not is_ours(config):
        raise ValueError(
            f"Adapter {adapter_name!r} is a {config.peft_type} adapter; export_prompt_tuning exports this package's "
            "methods. A peft adapter is already loadable without the plugin: use model.save_pretrained()."
        )
    encoder = model.prompt_encoder[adapter_name]
    encoder_keys = set(encoder.adapter_state_dict())
    weights = {
        key: tensor.detach().cpu().contiguous()
        for key, tensor in get_peft_model_state_dict(model, adapter_name=adapter_name).items()
        if key not in encoder_keys  # keeps modules_to_save (e.g. the classifier head)
    }
    weights["prompt_embeddings"] = encoder.inference_prompt(task).detach().cpu().contiguous()

    export_config = prompt_tuning_config_like(
        config,
        modules_to_save=config.modules_to_save,
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
        inference_mode=True,
    )
    os.makedirs(save_directory, exist_ok=True)
    # write to a temporary file and rename, so an interrupted export never leaves a half-written adapter
    with tempfile.NamedTemporaryFile(dir=save_directory, suffix=".tmp", delete=False) as tmp:
        tmp_path = tmp.name
    try:
        save_file(weights, tmp_path, metadata={"format": "pt"})
        os.replace(tmp_path, os.path.join(save_directory, SAFETENSORS_WEIGHTS_NAME))
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    export_config.save_pretrained(save_directory)
    _write_model_card(save_directory, config, task)
    return export_config


def _write_model_card(save_directory, source_config, task) -> None:
    data = ModelCardData(library_name="peft", base_model=source_config.base_model_name_or_path, tags=["prompt-tuning"])
    source = f"{source_config.peft_type}" + (f" (task {task!r})" if task is not None else "")
    text = (
        f"---\n{data.to_yaml()}\n---\n\n"
        "# Prompt-tuning adapter\n\n"
        f"A plain peft `PROMPT_TUNING` adapter exported from a {source} adapter trained with "
        f"[{PACKAGE_NAME}](https://pypi.org/project/{PACKAGE_NAME}/). It loads with stock peft; no plugin is needed:\n\n"
        f"```python\n{loading_snippet(source_config.task_type, import_plugin=False)}```\n"
    )
    ModelCard(text).save(os.path.join(save_directory, "README.md"))
