"""A prompt's keys and values in a decoder-only model: whether a model's forward can share them between rows (the
rule), computing them once, and running rows after them.

In a decoder-only model the prompt comes first and attention is causal, so the prompt's keys and values at every
layer do not depend on the input: run alone, once, they are the ones the concatenated forward computes. The patch
layer's shared-prefix forwards (`_patches/shared_prefix.py`) run each distinct prompt of a batch once by this rule;
`PromptLibrary.rank` computes each entry's once for all its batches (`prompt_cache`, `forward_after_prompt`), and
`export_kv_prefix` writes them as a peft `PREFIX_TUNING` adapter. Nothing here patches peft or transformers: it
reads models and runs them through their public forward.
"""

from __future__ import annotations

import copy
import inspect
import weakref
from typing import Any, Optional, Union

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ._compat import cache_keyword, is_ours

# rope scaling whose frequencies depend on the whole sequence's length: a prefix run alone would see other positions
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


# What the rule reads from a model is found once per model (its architecture, and which of its modules hold a dropout
# rate or a checkpointing flag: a walk over every module, about 2 ms per forward on SmolLM2), and the values that
# change while it runs (train()/eval(), gradient_checkpointing_enable(), a dropout's rate) are read at every call.
_ARCHITECTURES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_DROPOUT_HOLDERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CHECKPOINTABLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _dropout_holders(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """`(module name, module, attribute)` for every dropout rate in `model`: a `nn.Dropout`'s `p`, and each number
    attribute of a module named like a dropout rate (attention layers pass `self.attention_dropout` to the kernel)."""
    if model not in _DROPOUT_HOLDERS:
        _DROPOUT_HOLDERS[model] = [
            (name, module, attribute)
            for name, module in model.named_modules()
            for attribute in (["p"] if isinstance(module, nn.Dropout) else [])
            + [
                attribute
                for attribute, value in vars(module).items()
                if "dropout" in attribute and isinstance(value, (int, float)) and not isinstance(value, bool)
            ]
        ]
    return _DROPOUT_HOLDERS[model]


def _active_dropout(model: nn.Module) -> Optional[str]:
    """A dropout that is active in `model` (training mode), named, or None: a `nn.Dropout` with p > 0, or a module's
    float attribute named like a dropout rate, above 0."""
    if not model.training:
        return None
    for name, module, attribute in _dropout_holders(model):
        value = getattr(module, attribute, None)
        if isinstance(value, float) and value > 0:
            return f"{name} (p={value})" if attribute == "p" else f"{name}.{attribute}={value}"
    return None


def _checkpointing(model: nn.Module) -> bool:
    """transformers' `is_activation_checkpointing` (`is_gradient_checkpointing` before 5.25): a module of `model`
    with its `gradient_checkpointing` flag on; the modules that have the flag are found once."""
    if model not in _CHECKPOINTABLE:
        _CHECKPOINTABLE[model] = [module for module in model.modules() if hasattr(module, "gradient_checkpointing")]
    return any(module.gradient_checkpointing for module in _CHECKPOINTABLE[model])


def _rope_type(config: Any) -> Optional[str]:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(rope, dict) and "rope_type" not in rope and rope:  # per layer type (Gemma 3, ...)
        types = {value.get("rope_type") for value in rope.values() if isinstance(value, dict)}
        return next((kind for kind in types if kind in _LENGTH_DEPENDENT_ROPE), None)
    return rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None


def _architecture(base: nn.Module) -> tuple[Optional[str], Optional[str]]:
    """`base`'s cache keyword (`cache_keyword`) and why its architecture cannot share the prompt (None if it can);
    found once per model (see `why_not_shared`)."""
    if base not in _ARCHITECTURES:
        config = base.config
        keyword, rope = cache_keyword(base), _rope_type(config.get_text_config())
        reason = None
        if getattr(config, "is_encoder_decoder", False):
            reason = "the base model is an encoder-decoder"
        elif keyword is None:
            reason = f"{type(base).__name__}.forward takes no KV cache"
        elif base.can_generate() and "logits_to_keep" not in inspect.signature(base.forward).parameters:
            # a language model's shared calls keep the logits of chosen positions only (a few decoders, TrOCR's or
            # Whisper's, cannot); a classifier's pool one position and take no such argument
            reason = f"{type(base).__name__}.forward takes no logits_to_keep"
        elif rope in _LENGTH_DEPENDENT_ROPE:
            reason = f"its rope scaling ({rope!r}) depends on the total sequence length"
        else:
            layers = DynamicCache(config=config).layers
            odd_layers = sorted({type(layer).__name__ for layer in layers if not isinstance(layer, DynamicLayer)})
            if odd_layers:
                reason = f"its cache has layers that are not key/value layers ({', '.join(odd_layers)})"
        _ARCHITECTURES[base] = (keyword, reason)
    return _ARCHITECTURES[base]


def why_architecture_cannot_share(base: nn.Module) -> Optional[str]:
    """Why no forward of the model `base` can share a prompt's keys and values, whatever its mode and inputs (None if
    its architecture can): an encoder-decoder, a forward without a KV cache (or, for a language model, without
    `logits_to_keep`), a cache whose layers are not key/value layers, or rope scaling that depends on the total
    length. Read once per model. A frozen model in eval mode, as `PromptLibrary.rank` runs it, needs nothing more."""
    return _architecture(base)[1]


def why_not_shared(peft_model: nn.Module, output_attentions: Optional[bool], kwargs: dict[str, Any]) -> Optional[str]:
    """Why this forward of a causal LM cannot take the shared-prefix path, or None if it can.

    The rule reads the model and its config: the architecture (`why_architecture_cannot_share`), dropout active in
    training mode (rows would share the dropout masks of the prompt positions), gradient checkpointing in training
    (transformers' checkpointed layers drop the cache argument), `output_attentions`, and a cache passed by the
    caller.
    """
    base = peft_model.base_model
    keyword, reason = _architecture(base)
    if reason is not None:
        return reason
    if kwargs.get(keyword) is not None or kwargs.get("past_key_values") is not None:
        return "a KV cache was passed to forward"
    if output_attentions or getattr(base.config, "output_attentions", False):
        return "output_attentions=True (the rows' attention maps would lack the prompt positions)"
    if base.training and torch.is_grad_enabled() and _checkpointing(base):
        return "gradient checkpointing is on (transformers' checkpointed layers drop the cache argument in training)"
    dropout = _active_dropout(base)
    if dropout is None and not is_ours(peft_model.active_peft_config):
        # peft's prompt encoders run once per row in the concatenated path, each row with its own dropout mask
        dropout = _active_dropout(peft_model.prompt_encoder[peft_model.active_adapter])
    if dropout is not None:
        return f"dropout is active in training mode ({dropout}), so rows would share the prompt positions' masks"
    return None


def prompt_cache(base: nn.Module, prompt: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
    """One prompt `[P, d]` run through the decoder-only `base` alone: its keys and values at every layer, which no
    input changes, and the logits of its last position, which predict the first input token. Computed once, they
    serve any number of batches (`forward_after_prompt`) and exports (`export_kv_prefix`)."""
    cache = DynamicCache(config=base.config)
    # the last position's logits only, where the forward can be asked (a decoder the rule refuses, exported by
    # `export_kv_prefix`, may take no `logits_to_keep`)
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}
    output = base(
        inputs_embeds=prompt.unsqueeze(0).to(base.get_input_embeddings().weight.dtype),
        use_cache=True,
        **keep,
        **{cache_keyword(base): cache},
    )
    return cache, output.logits[0, -1]


def forward_after_prompt(
    base: nn.Module,
    cache: DynamicCache,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    logits_to_keep: Union[int, torch.Tensor] = 0,
) -> Any:
    """`base`'s forward of a batch of rows after the prompt whose `cache` `prompt_cache` computed, as the shared
    path's second call: the prompt's keys and values gathered to the rows (a copy: the forward appends the rows' own
    to the cache it gets) and the attention mask extended by its P ones. `logits_to_keep` counts the rows'
    positions."""
    batch_size = input_ids.shape[0]
    rows = copy.deepcopy(cache)
    rows.batch_select_indices(torch.zeros(batch_size, dtype=torch.long, device=input_ids.device))
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    prefix_mask = attention_mask.new_ones(batch_size, cache.get_seq_length())
    return base(
        input_ids=input_ids,
        attention_mask=torch.cat((prefix_mask, attention_mask), dim=1),
        logits_to_keep=logits_to_keep,
        **{cache_keyword(base): rows},
    )
