"""The bottom of the integration layer: what every other module may import, and nothing that patches upstream.

- The supported peft and transformers ranges (the one copy; a test checks that `pyproject.toml` declares the same)
  and the warning for a version outside them.
- The upstream facts the package reads without patching: peft's `BasePromptEncoder` save/load hooks (peft >= 0.21),
  and FSDP2's choice of its root module (`settle_fsdp_root`).
- The registry of our methods: the extension of peft's closed `PeftType` enum, `register_method` (peft's public
  `register_peft_method`) and `is_ours`, which every patch asks before it acts.
- The features that are off because a patch could not be installed (`disable_feature`, `require_feature`): the
  patch layer (`_patches`) fills it at import, and our configs and guarded entry points read it, so that a feature
  whose patch is missing raises a clear error instead of running unpatched.

The patches themselves live one layer up, in `peft_prompt_transfer._patches`, whose docstring lists every one.
Base classes, configs and encoders import this module and never the patch layer.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Optional

import peft
import torch
import transformers
from packaging.version import Version
from peft import PromptTuningConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners import tuners_utils
from peft.utils import PeftType, register_peft_method

PACKAGE_NAME = "peft-prompt-transfer"
IMPORT_LINE = "import peft_prompt_transfer"
# [min, max) of each library whose internals we hook into; pyproject.toml declares the same ranges (tested)
SUPPORTED_VERSIONS = {
    "peft": (Version("0.20.0"), Version("0.23.0")),
    "transformers": (Version("5.17.0"), Version("5.26.0")),
}
INSTALLED_VERSIONS = {"peft": Version(peft.__version__), "transformers": Version(transformers.__version__)}

# peft >= 0.21 routes prompt-learning save/load through these encoder hooks; older versions
# hard-code them, and the persistence patches supply the same dispatch.
BasePromptEncoder = getattr(tuners_utils, "BasePromptEncoder", torch.nn.Module)
HAS_PROMPT_ENCODER_HOOKS = hasattr(tuners_utils, "BasePromptEncoder")

# peft type value -> our encoder class; filled by `register_method`.
_OUR_ENCODERS: dict[str, type] = {}
# feature -> why it is off (a patch it needs could not be installed); filled by the patch layer at import
_DISABLED_FEATURES: dict[str, str] = {}
# the correctness feature without which none of our adapters can be built: our configs refuse while it is off
PROMPT_FEATURE = "prompt set-up and forward"
# the convenience feature behind `shared_prefix`: a config that asks for it with "on" refuses while it is off
SHARED_PREFIX_FEATURE = "the shared-prefix forward of causal LMs"


def supported_install_command() -> str:
    """The `pip install` command that installs supported peft and transformers versions."""
    ranges = " ".join(f"'{library}>={low},<{high}'" for library, (low, high) in SUPPORTED_VERSIONS.items())
    return f"pip install {ranges}"


def check_versions() -> None:
    """Warn, with the command that fixes it, when an installed peft or transformers is outside the supported ranges."""
    for library, (low, high) in SUPPORTED_VERSIONS.items():
        installed = INSTALLED_VERSIONS[library]
        if not low <= installed < high:
            warnings.warn(
                f"{PACKAGE_NAME} supports {library}>={low},<{high}, but {library} {installed} is installed. It hooks "
                f"into {library} internals that change between releases (transformers 5.24, for example, broke cached "
                f"generation of peft's prompt methods), so outputs may be wrong without an error. Install a supported "
                f"version: pip install '{library}>={low},<{high}'",
                stacklevel=3,
            )


def disable_feature(feature: str, reason: str) -> None:
    """Mark `feature` as unavailable: [`require_feature`] then raises `reason`."""
    _DISABLED_FEATURES[feature] = reason


def clear_disabled_features() -> None:
    """Forget every disabled feature (the patch layer re-checks them all when it installs again)."""
    _DISABLED_FEATURES.clear()


def require_feature(feature: str) -> None:
    """Raise a `RuntimeError` that says why and what to do if `feature` was disabled at import."""
    reason = _DISABLED_FEATURES.get(feature)
    if reason is not None:
        raise RuntimeError(reason)


def disabled_features() -> dict[str, str]:
    """The features that are off in this process, with the reason for each (a copy)."""
    return dict(_DISABLED_FEATURES)


def enum_value(value: Any) -> Any:
    """A peft enum member's string (`PeftType`, `TaskType`), or `value` itself when it is a string already."""
    return getattr(value, "value", value)


def is_ours(config: Any) -> bool:
    """Whether `config` belongs to one of this package's methods."""
    peft_type = getattr(config, "peft_type", None)
    return getattr(peft_type, "value", peft_type) in _OUR_ENCODERS


def peft_type_for(name: str) -> PeftType:
    """The `PeftType` member for one of our methods: added to peft's closed str-enum on first use (idempotent)."""
    if name in PeftType._member_map_:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    if hasattr(member, "_sort_order_"):
        member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


def register_method(peft_type: str, config_cls: type, encoder_cls: type) -> None:
    """Register one of our methods with peft through its public `register_peft_method`.

    Idempotent: registering the same classes again (re-import, `importlib.reload`) is a no-op.
    """
    member = peft_type_for(peft_type)
    _OUR_ENCODERS[peft_type] = encoder_cls
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(member) is not None:
        registered = PEFT_TYPE_TO_CONFIG_MAPPING[member]
        if registered.__qualname__ != config_cls.__qualname__:
            raise KeyError(f"peft already has a different method registered as {peft_type}: {registered}")
        # a reload of our modules: point peft at the fresh classes
        PEFT_TYPE_TO_CONFIG_MAPPING[member] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[member] = encoder_cls
        return
    register_peft_method(name=peft_type.lower(), config_cls=config_cls, model_cls=encoder_cls)


def encoder_class(config: Any) -> type:
    """The encoder class registered for one of our configs."""
    return _OUR_ENCODERS[config.peft_type.value]


def prompt_tuning_config_like(config: Any, **overrides: Any) -> PromptTuningConfig:
    """A peft `PromptTuningConfig` with the task type and prompt shape of one of our configs."""
    fields = dict(
        task_type=config.task_type,
        num_virtual_tokens=config.num_virtual_tokens,
        token_dim=config.token_dim,
        num_transformer_submodules=1,  # our prompts go on the encoder only
        num_attention_heads=config.num_attention_heads,
        num_layers=config.num_layers,
    )
    fields.update(overrides)
    return PromptTuningConfig(**fields)


# peft's own prompt methods whose prompt is one for every row: `enable_shared_prefix` gives them the shared path
PEFT_SINGLE_PROMPT_TYPES = ("PROMPT_TUNING", "P_TUNING")


def shared_prefix_mode(config: Any) -> str:
    """How a causal LM's forward runs this adapter's prompt: our config's `shared_prefix`; for peft's
    `PROMPT_TUNING` and `P_TUNING` what `enable_shared_prefix` set on the config ("off" without that call)."""
    if is_ours(config) or enum_value(config.peft_type) in PEFT_SINGLE_PROMPT_TYPES:
        return getattr(config, "shared_prefix", "off")
    return "off"


def cache_keyword(model: torch.nn.Module) -> Optional[str]:
    """The name under which `model.forward` takes a KV cache (`cache` from transformers 5.24, `past_key_values`
    before), or None if it takes none."""
    parameters = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def settle_fsdp_root(root: torch.nn.Module) -> None:
    """Make the FSDP2-sharded `root` the root of its FSDP2 modules now, as its first forward would.

    FSDP2 chooses its root lazily: the first sharded module to run forward becomes the root (torch's private
    `FSDPState._lazy_init`). Code that runs a module inside a sharded model by itself before the model's first
    forward (the prompt library's scorer runs the base model) would make a transformer block the root, and the
    model's own forward would then fail ("FSDP state has already been lazily initialized"). Where torch no longer has
    that method this raises, saying what to do, instead of letting a model break.
    """
    get_state = getattr(root, "_get_fsdp_state", None)
    lazy_init = getattr(get_state(), "_lazy_init", None) if callable(get_state) else None
    if not callable(lazy_init):
        raise RuntimeError(
            f"This torch ({torch.__version__}) sets up FSDP2 in a way {PACKAGE_NAME} does not know, so it cannot run "
            "part of this sharded model by itself without risking its next forward. Call it before sharding the "
            "model (before trainer.train() or accelerator.prepare), or on an unsharded copy."
        )
    lazy_init()
