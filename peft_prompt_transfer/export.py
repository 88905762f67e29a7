"""Export a trained prompt as a standard peft adapter that loads without this plugin: a `PROMPT_TUNING` adapter (the
prompt), or a `PREFIX_TUNING` adapter (the prompt's per-layer keys and values, served at the cost of the input)."""

from __future__ import annotations

import os
from typing import Optional, Union

import torch
from huggingface_hub import ModelCard, ModelCardData
from peft import PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model_state_dict
from peft import utils as peft_utils
from peft.utils import SAFETENSORS_WEIGHTS_NAME

from ._compat import PACKAGE_NAME, cache_keyword, is_ours, prompt_tuning_config_like
from .files import save_safetensors
from .model_card import loading_snippet
from .prompt_kv import prompt_cache


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
    adapter_name, config = _our_adapter(model, adapter_name, "export_prompt_tuning")
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
    _save_adapter(save_directory, weights, export_config, config, task, "PROMPT_TUNING")
    return export_config


def export_kv_prefix(
    model: PeftModel,
    save_directory: Union[str, os.PathLike],
    task: Optional[Union[int, str]] = None,
    adapter_name: Optional[str] = None,
) -> PrefixTuningConfig:
    """Write the per-layer keys and values of the prompt a causal LM uses at inference as a stock peft
    `PREFIX_TUNING` adapter.

    A decoder-only model's prompt keys and values do not depend on the input, so they can be computed once and served
    as a KV prefix: the export loads with stock peft (`PeftModel.from_pretrained`) in a process that never imports
    this package, runs at the cost of the input alone, and gives `model`'s logits at the input positions. It holds
    the folded residual prompt's cache, one ComPT task's (`task=`), or a Bayesian posterior mean's or target's.

    Args:
        model (`PeftModel`): A causal LM with one of this package's adapters.
        save_directory (`str` or `os.PathLike`): Where to write `adapter_config.json`, `adapter_model.safetensors` and
            `README.md`. Created if missing.
        task (`int` or `str`, *optional*): For multi-task methods, the task whose prompt to export.
        adapter_name (`str`, *optional*): The adapter to export; defaults to the active one.

    Returns:
        The `PrefixTuningConfig` that was written.
    """
    adapter_name, config = _our_adapter(model, adapter_name, "export_kv_prefix")
    base = model.get_base_model()
    task_type = getattr(config.task_type, "value", config.task_type)
    if task_type != "CAUSAL_LM" or getattr(base.config, "is_encoder_decoder", False):
        raise ValueError(
            f"export_kv_prefix exports the prompt of a decoder-only causal LM (task_type='CAUSAL_LM'), but adapter "
            f"{adapter_name!r} has task_type={task_type!r} on a {type(base).__name__}: an encoder's or seq2seq model's "
            "prompt states depend on the input. Use export_prompt_tuning for it."
        )
    if base.config.model_type in getattr(peft_utils, "TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING", {}):
        raise ValueError(
            f"peft re-arranges a {base.config.model_type} prefix before serving it, so a prefix computed by the model "
            "would not load as it was written. Use export_prompt_tuning for this model."
        )
    prompt = model.prompt_encoder[adapter_name].inference_prompt(task)
    if cache_keyword(base) is None:
        raise ValueError(f"{type(base).__name__}.forward takes no KV cache, so it has no prefix to export.")
    was_training = base.training
    base.eval()
    try:
        with torch.no_grad():
            cache, _ = prompt_cache(base, prompt)
    finally:
        base.train(was_training)
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    shapes = sorted({(tuple(keys.shape), tuple(values.shape)) for keys, values in layers})
    if len(shapes) != 1 or len(layers) != base.config.get_text_config().num_hidden_layers:
        raise ValueError(
            f"This model's layers keep keys and values of different shapes ({shapes}), or not one pair per layer; "
            "peft's prefix format holds one shape for every layer, so the export could not give the same outputs. "
            "Use export_prompt_tuning for this model."
        )
    num_virtual_tokens = prompt.shape[0]
    _, num_heads, _, head_dim = layers[0][0].shape
    export_config = PrefixTuningConfig(
        task_type=task_type,
        num_virtual_tokens=num_virtual_tokens,
        num_layers=len(layers),
        token_dim=num_heads * head_dim,
        num_attention_heads=num_heads,
        num_transformer_submodules=1,
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
        inference_mode=True,
    )
    # peft's PREFIX_TUNING layout: [num_virtual_tokens, num_layers * 2 * token_dim], keys then values per layer
    packed = torch.stack([state[0].transpose(0, 1) for pair in layers for state in pair], dim=1)
    weights = {"prompt_embeddings": packed.reshape(num_virtual_tokens, -1).detach().cpu().contiguous()}
    _save_adapter(save_directory, weights, export_config, config, task, "PREFIX_TUNING")
    return export_config


def _our_adapter(model: PeftModel, adapter_name: Optional[str], export: str):
    """The name and config of the adapter to export, checked to be one of ours."""
    adapter_name = adapter_name or model.active_adapter
    if adapter_name not in model.peft_config:
        raise ValueError(f"No adapter named {adapter_name!r}; the model has {sorted(model.peft_config)}.")
    config = model.peft_config[adapter_name]
    if not is_ours(config):
        raise ValueError(
            f"Adapter {adapter_name!r} is a {config.peft_type} adapter; {export} exports this package's methods. A "
            "peft adapter is already loadable without the plugin: use model.save_pretrained()."
        )
    return adapter_name, config


def _save_adapter(save_directory, weights: dict, export_config, source_config, task, kind: str) -> None:
    os.makedirs(save_directory, exist_ok=True)
    save_safetensors(weights, os.path.join(save_directory, SAFETENSORS_WEIGHTS_NAME))
    export_config.save_pretrained(save_directory)
    _write_model_card(save_directory, source_config, task, kind)


def _write_model_card(save_directory, source_config, task, kind: str) -> None:
    tag = {"PROMPT_TUNING": "prompt-tuning", "PREFIX_TUNING": "prefix-tuning"}[kind]
    data = ModelCardData(library_name="peft", base_model=source_config.base_model_name_or_path, tags=[tag])
    source = f"{source_config.peft_type}" + (f" (task {task!r})" if task is not None else "")
    text = (
        f"---\n{data.to_yaml()}\n---\n\n"
        f"# {tag.capitalize()} adapter\n\n"
        f"A plain peft `{kind}` adapter exported from a {source} adapter trained with "
        f"[{PACKAGE_NAME}](https://pypi.org/project/{PACKAGE_NAME}/). It loads with stock peft; no plugin is needed:\n\n"
        f"```python\n{loading_snippet(source_config.task_type, import_plugin=False)}```\n"
    )
    ModelCard(text).save(os.path.join(save_directory, "README.md"))
