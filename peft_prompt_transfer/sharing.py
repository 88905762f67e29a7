"""The opt-in that gives peft's own `PROMPT_TUNING` and `P_TUNING` adapters this package's shared-prefix path."""

from __future__ import annotations

from typing import Optional

from peft import PeftModel

from ._compat import PEFT_SINGLE_PROMPT_TYPES, SHARED_PREFIX_FEATURE, enum_value, is_ours, require_feature
from .base import SHARED_PREFIX_MODES


def enable_shared_prefix(model: PeftModel, mode: str = "auto", adapter_name: Optional[str] = None) -> PeftModel:
    """Run a peft `PROMPT_TUNING` or `P_TUNING` adapter of a causal LM on the shared-prefix path.

    Their prompt is the same for every row, so, as for this package's methods (`shared_prefix` on their configs;
    see docs/guides/shared-prefix.md), the forward and `generate`'s prefill run it through the model once per batch and
    give its keys and values to the rows, with the concatenated path's loss, logits and gradients. Without this call
    peft's methods run exactly as peft runs them. The setting lives on the adapter's config object for this process
    only: it is not saved, and an adapter saved after it loads anywhere as before.

    Args:
        model (`PeftModel`): A causal LM with a peft `PROMPT_TUNING` or `P_TUNING` adapter.
        mode (`str`): `"auto"` (default: share wherever it is exact and pays, as this package's methods do), `"on"`
            (share, or raise an error at forward time that says why it cannot) or `"off"` (peft's concatenation).
        adapter_name (`str`, *optional*): The adapter; the active one by default.

    Returns:
        The model.
    """
    adapter_name = adapter_name or getattr(model, "active_adapter", None)
    configs = getattr(model, "peft_config", None)
    if not isinstance(model, PeftModel) or adapter_name not in (configs or {}):
        raise ValueError(f"enable_shared_prefix takes a PeftModel and one of its adapters, got {type(model).__name__}.")
    config = configs[adapter_name]
    peft_type = enum_value(config.peft_type)
    if is_ours(config):
        raise ValueError(
            f"{peft_type} adapters choose their path with their config's shared_prefix field (default 'auto'); "
            "enable_shared_prefix is for peft's own PROMPT_TUNING and P_TUNING."
        )
    if peft_type not in PEFT_SINGLE_PROMPT_TYPES:
        raise ValueError(
            f"enable_shared_prefix takes peft's PROMPT_TUNING and P_TUNING adapters, whose one prompt every row "
            f"shares; adapter {adapter_name!r} is {peft_type}."
        )
    task_type = enum_value(config.task_type)
    if task_type != "CAUSAL_LM":
        raise ValueError(
            f"The shared prefix needs a decoder-only causal LM (task_type='CAUSAL_LM'), whose prompt keys and values "
            f"do not depend on the input; adapter {adapter_name!r} is {task_type}."
        )
    if mode not in SHARED_PREFIX_MODES:
        raise ValueError(f"mode must be one of {list(SHARED_PREFIX_MODES)}, got {mode!r}.")
    if mode != "off":
        require_feature(SHARED_PREFIX_FEATURE)
    config.shared_prefix = mode  # an attribute, not a dataclass field: peft does not save it
    return model
