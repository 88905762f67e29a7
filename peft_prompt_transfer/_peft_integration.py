"""Every place where peft_prompt_transfer hooks into peft's internals.

peft has a public plugin entry point, `register_peft_method`, but a prompt-learning method needs
more than that today:

1. `PeftType` is a closed enum, so our peft types are added to it (`_add_peft_type`).
2. `PeftModel._setup_prompt_encoder` only builds encoders for peft's own prompt types; for ours
   it runs peft's code on a stand-in `PromptTuningConfig` (freezing the base model, finding the
   word embeddings and the transformer backbone) and then swaps in our encoder.
3. `PeftModel.get_prompt` branches on peft's types; ours ask their encoder, which takes
   `task_ids` (ComPT) and needs no `prompt_tokens`.
4. `PeftModelForSeq2SeqLM.forward` / `generate` only put prompts on the encoder for
   `PROMPT_TUNING` / `P_TUNING`; ours take the same path, with `task_ids`.
5. `PeftModel.get_prompt_embedding_to_save` feeds token indices to the encoder; ours ask it for
   the prompt that inference uses (under FSDP2 without gathering the shards: see 7).
6. `PeftModel.create_or_update_model_card` gets our package's tag and install/import lines, so
   that someone without the plugin learns what to install.
7. peft < 0.21 has no `BasePromptEncoder` save/load hooks: `get_peft_model_state_dict` /
   `set_peft_model_state_dict` are wrapped so that our encoders' hooks run there too, with the state dict
   they are given (under FSDP2 the Trainer hands the full one to the first process only, which saves alone).
8. `PeftModel.save_pretrained` writes our adapters into a staging folder beside the target and then moves
   each file into place, so a failed or interrupted save leaves the previous adapter intact.
9. `PeftModel.load_adapter` turns a truncated or corrupted `adapter_model.safetensors` of our adapters
   into an error that names the file and the fix (peft raises a bare `SafetensorError`).
10. `PeftModel.push_to_hub` (transformers' `PushToHubMixin`) saves the folder and then overwrites its
   `README.md` with the repo's card or a transformers template (`library_name: transformers`, no import
   line). For our adapters the card is put right just before the upload (`_upload_modified_files`): a
   template is replaced by the card `save_pretrained` writes, an existing repo card is updated as peft does.
11. `PeftConfigMixin.from_json_file` names the file and the fix when `adapter_config.json` is not valid
   JSON. This is the one hook that acts on every adapter type (peft's too), since the type is in the file
   it cannot read; it only changes the error message (a `ValueError`, as `JSONDecodeError` is).
12. `PeftModelForCausalLM.prepare_inputs_for_generation`: transformers 5.24 hands the KV cache to
   `prepare_inputs_for_generation` and the model's forward as `cache` (it was `past_key_values`) and no
   longer passes `cache_position`. peft (up to 0.21.2) still looks for `past_key_values`, finds none, and so
   prepends the prompt again at every decoding step: cached `generate` returns wrong tokens, silently. For
   our adapters, peft's own code runs on the inputs in the form it knows (the cache as `past_key_values`,
   with `cache_position`), and its result is handed back in transformers' form. On transformers < 5.24 and
   for peft's own methods this hook calls peft's function unchanged.
13. `PeftModel.from_pretrained(..., is_trainable=True)` and `PeftModel._check_new_adapter_config` (which
   `load_adapter(path, new_name, is_trainable=True)` calls): peft refuses trainable loads of every prompt
   method, since its prompt encoders save only the prompt inference uses. Ours save their whole training
   state (residual's MLP, ComPT's router and gates, a posterior's particles, a target's anchor), so for our
   adapters `from_pretrained` builds the model in training mode and loads the adapter with
   `load_adapter(..., is_trainable=True)`, the path peft already takes for `get_peft_model` + `load_adapter`,
   and the new-adapter check skips only that one rule. `PeftModel.set_requires_grad`, which peft does not
   support for prompt methods (and which `load_adapter(..., is_trainable=True)` calls on peft 0.21), sets
   the trainability of our adapters' encoders. Inference loads and peft's own methods are unchanged.
14. `transformers.Trainer._get_dataloader` (which TRL's trainers inherit): for a model with an adapter that takes
   `task_ids` (ComPT; a Bayesian source with `source_tasks`), `task_ids` joins the columns that
   `remove_unused_columns=True` keeps (the trainer's `_signature_columns`, the base model's forward arguments or
   TRL's list), and the collator is wrapped in `TaskIdsCollator` for the call, since collators that build the batch
   from the keys they know (TRL's) drop it. So the default `TrainingArguments` and TRL's `SFTTrainer` train ComPT
   as they are. For every other model this hook calls transformers' function unchanged.

Every patch checks the active config's `peft_type` and calls peft's original function for
anything that is not ours, so peft's own methods behave exactly as without the plugin. The
patches are installed once (`install`), and re-importing is a no-op. The supported peft and
transformers ranges are declared in `pyproject.toml` and in `SUPPORTED_VERSIONS` below; the test
suite runs against the oldest and the newest releases of both (pinned in `constraints/`), and
`scripts/canary.sh` runs it against whatever pip resolves today. Importing the plugin next to a
version outside the ranges warns with the command that installs a supported one.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from typing import Any, Optional

import peft
import peft.peft_model as peft_model_module
import torch
import transformers
from packaging.version import Version
from peft import PeftConfig, PeftModel, PeftModelForCausalLM, PeftModelForSeq2SeqLM, PromptTuningConfig
from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING
from peft.config import PeftConfigMixin
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners import tuners_utils
from peft.utils import PeftType, register_peft_method, save_and_load
from peft.utils.other import _get_batch_size
from safetensors import SafetensorError
from torch.distributed.tensor import DTensor

PACKAGE_NAME = "peft-prompt-transfer"
IMPORT_LINE = "import peft_prompt_transfer"
# [min, max) of each library whose internals we hook into, as declared in pyproject.toml
SUPPORTED_VERSIONS = {
    "peft": (Version("0.20.0"), Version("0.22.0")),
    "transformers": (Version("5.17.0"), Version("5.26.0")),
}
INSTALLED_VERSIONS = {"peft": Version(peft.__version__), "transformers": Version(transformers.__version__)}

# peft >= 0.21 routes prompt-learning save/load through these encoder hooks; older versions
# hard-code them, and `_wrap_state_dict_functions` supplies the same dispatch.
BasePromptEncoder = getattr(tuners_utils, "BasePromptEncoder", torch.nn.Module)
HAS_PROMPT_ENCODER_HOOKS = hasattr(tuners_utils, "BasePromptEncoder")

# transformers >= 5.24 passes the KV cache as `cache` (formerly `past_key_values`) and drops `cache_position`
CACHE_KWARG = (
    "cache"
    if "cache" in inspect.signature(transformers.GenerationMixin.prepare_inputs_for_generation).parameters
    else "past_key_values"
)

# peft type value -> our encoder class; filled by `register_method`.
_OUR_ENCODERS: dict[str, type] = {}
_PATCH_MARKER = "_peft_prompt_transfer_original"


def is_ours(config: Any) -> bool:
    """Whether `config` belongs to one of this package's methods."""
    peft_type = getattr(config, "peft_type", None)
    return getattr(peft_type, "value", peft_type) in _OUR_ENCODERS


def _check_versions() -> None:
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


def _add_peft_type(name: str) -> PeftType:
    """Add `name` as a member of peft's closed `PeftType` str-enum (idempotent)."""
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


def peft_type_for(name: str) -> PeftType:
    """The `PeftType` member for one of our methods, created on first use."""
    return _add_peft_type(name)


def register_method(peft_type: str, config_cls: type, encoder_cls: type) -> None:
    """Register one of our methods with peft through its public `register_peft_method`.

    Idempotent: registering the same classes again (re-import, `importlib.reload`) is a no-op.
    """
    member = _add_peft_type(peft_type)
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


# ----------------------------------------------------------------------------------------------
# PeftModel patches
# ----------------------------------------------------------------------------------------------


def _patch(owner: Any, name: str, make_wrapper: Callable[[Callable], Callable]) -> None:
    is_classmethod = isinstance(vars(owner).get(name), classmethod)
    original = vars(owner)[name].__func__ if is_classmethod else getattr(owner, name)
    if getattr(original, _PATCH_MARKER, None) is not None:
        return  # already installed
    wrapper = functools.wraps(original)(make_wrapper(original))
    setattr(wrapper, _PATCH_MARKER, original)
    setattr(owner, name, classmethod(wrapper) if is_classmethod else wrapper)


def prompt_tuning_config_like(config, **overrides) -> PromptTuningConfig:
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


def _wrap_setup_prompt_encoder(original):
    def _setup_prompt_encoder(self, adapter_name: str):
        config = self.peft_config[adapter_name]
        if not is_ours(config):
            return original(self, adapter_name)
        # peft's own code freezes the base model, finds the transformer backbone and the word
        # embeddings (including under DeepSpeed ZeRO-3) and registers `prompt_tokens`.
        # (inference_mode: the stand-in's embedding is thrown away, so skip its initialisation)
        self.peft_config[adapter_name] = prompt_tuning_config_like(config, inference_mode=True)
        try:
            original(self, adapter_name)
        finally:
            self.peft_config[adapter_name] = config
        encoder = _OUR_ENCODERS[config.peft_type.value](config, self.word_embeddings)
        self.prompt_encoder[adapter_name] = encoder.to(self.device)

    return _setup_prompt_encoder


def _wrap_get_prompt(original):
    def get_prompt(self, batch_size: int, task_ids: Optional[torch.Tensor] = None, max_cache_len=None):
        if not is_ours(self.active_peft_config):
            return original(self, batch_size, task_ids=task_ids, max_cache_len=max_cache_len)
        return self.prompt_encoder[self.active_adapter](batch_size, task_ids)

    return get_prompt


def _wrap_get_prompt_embedding_to_save(original):
    def get_prompt_embedding_to_save(self, adapter_name: str) -> torch.Tensor:
        if not is_ours(self.peft_config[adapter_name]):
            return original(self, adapter_name)
        encoder = self.prompt_encoder[adapter_name]
        if any(isinstance(parameter, DTensor) for parameter in encoder.parameters()):
            # FSDP2-sharded: peft < 0.21 calls this while building the state dict, where the wrapper below puts the
            # encoder's own entries, gathered or from the Trainer's full state dict, over it. Gathering here would
            # hang when only the first process saves (Trainer.save_model).
            return encoder.embedding.weight.detach()
        return encoder.whole_adapter_state_dict()["prompt_embeddings"].detach().cpu()

    return get_prompt_embedding_to_save


def _prepend_prompt(model, inputs_embeds, attention_mask, task_ids):
    """Prepend the active adapter's prompt to the encoder inputs (and extend the mask)."""
    batch_size = inputs_embeds.shape[0]
    num_virtual_tokens = model.active_peft_config.num_virtual_tokens
    prompts = model.get_prompt(batch_size=batch_size, task_ids=task_ids).to(inputs_embeds.dtype)
    inputs_embeds = torch.cat((prompts, inputs_embeds), dim=1)
    if attention_mask is not None:
        prefix = attention_mask.new_ones(batch_size, num_virtual_tokens)
        attention_mask = torch.cat((prefix, attention_mask), dim=1)
    return inputs_embeds, attention_mask


def _wrap_seq2seq_forward(original):
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, task_ids=None, **kwargs):
        peft_config = self.active_peft_config
        if not is_ours(peft_config):
            return original(
                self,
                input_ids=input_ids,
                attention_mask=attention_mask,
                inputs_embeds=inputs_embeds,
                task_ids=task_ids,
                **kwargs,
            )
        # Our prompts live on the encoder only (as peft's PROMPT_TUNING); the decoder arguments pass through.
        _get_batch_size(input_ids, inputs_embeds)  # peft's check that one of the two is given
        self._adjust_prompt_learning_kwargs(peft_config, kwargs=kwargs)
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        inputs_embeds, attention_mask = _prepend_prompt(self, inputs_embeds, attention_mask, task_ids)
        return self.base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)

    return forward


def _wrap_seq2seq_generate(original):
    def generate(self, **kwargs):
        peft_config = self.active_peft_config
        if not is_ours(peft_config):
            return original(self, **kwargs)
        if "input_ids" not in kwargs:
            raise ValueError("input_ids must be provided for Peft model generation")
        if "encoder_outputs" in kwargs:
            raise ValueError(
                "`encoder_outputs` cannot be passed to `generate` with a prompt-learning adapter: the prompt is "
                "part of the encoder input. Pass `input_ids` instead."
            )
        self._adjust_prompt_learning_kwargs(peft_config, kwargs=kwargs)
        task_ids = kwargs.pop("task_ids", None)
        input_ids = kwargs.pop("input_ids")
        inputs_embeds, attention_mask = _prepend_prompt(
            self, self.word_embeddings(input_ids), kwargs.pop("attention_mask", None), task_ids
        )
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        return self.base_model.generate(inputs_embeds=inputs_embeds, **kwargs)

    return generate


def _cache_length(cache: Any) -> int:
    if cache is None:
        return 0
    if isinstance(cache, (tuple, list)):  # legacy tuple cache
        return cache[0][0].shape[-2]
    return cache.get_seq_length()


def _wrap_causal_prepare_inputs_for_generation(original):
    def prepare_inputs_for_generation(self, *args, task_ids: Optional[torch.Tensor] = None, **kwargs):
        if CACHE_KWARG == "past_key_values" or not is_ours(self.active_peft_config):
            return original(self, *args, task_ids=task_ids, **kwargs)
        base_prepare = self.base_model_prepare_inputs_for_generation

        def base_prepare_in_peft_form(*base_args, **base_kwargs):
            # what transformers < 5.24 returned: the cache as `past_key_values`, and the positions of the new
            # tokens in it as `cache_position` (peft reads it to tell prefill from decoding)
            model_inputs = base_prepare(*base_args, **base_kwargs)
            # transformers 5.24 makes position ids from the attention mask on every call; peft ignores them for
            # prompt methods anyway, but with a warning about ids the user never passed
            model_inputs.pop("position_ids", None)
            if "cache" in model_inputs:
                model_inputs["past_key_values"] = model_inputs.pop("cache")
            new_tokens = (
                model_inputs["input_ids"]
                if model_inputs.get("input_ids") is not None
                else model_inputs["inputs_embeds"]
            )
            past_length = _cache_length(model_inputs.get("past_key_values"))
            model_inputs["cache_position"] = torch.arange(
                past_length, past_length + new_tokens.shape[1], device=new_tokens.device
            )
            return model_inputs

        self.base_model_prepare_inputs_for_generation = base_prepare_in_peft_form
        try:
            model_inputs = original(self, *args, task_ids=task_ids, **kwargs)
        finally:
            self.base_model_prepare_inputs_for_generation = base_prepare
        model_inputs.pop("cache_position", None)  # peft drops it for prompt tuning; transformers 5.24 has no such input
        if "past_key_values" in model_inputs:
            model_inputs["cache"] = model_inputs.pop("past_key_values")
        return model_inputs

    return prepare_inputs_for_generation


def loading_snippet(task_type: Optional[str], import_plugin: bool) -> str:
    """Python lines that load an adapter of `task_type` from `ADAPTER_PATH_OR_REPO_ID` with peft's auto classes.

    peft's plain `AutoPeftModel` refuses an adapter with a task type, so the class is the task's
    `AutoPeftModelFor...` (the one peft's own `MODEL_TYPE_TO_PEFT_MODEL_MAPPING` names).
    """
    task_type = getattr(task_type, "value", task_type)
    peft_class = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(task_type)
    auto_class = (
        "AutoPeftModel" + peft_class.__name__[len("PeftModel") :] if peft_class is not None else "AutoPeftModel"
    )
    plugin = f"# pip install {PACKAGE_NAME}\n{IMPORT_LINE}  # registers the method with peft\n" if import_plugin else ""
    return f"{plugin}from peft import {auto_class}\nmodel = {auto_class}.from_pretrained(ADAPTER_PATH_OR_REPO_ID)\n"


def model_card_section(config: Any) -> str:
    """Model-card text telling a reader without the plugin how to load the adapter."""
    peft_type = config.peft_type.value
    return (
        "## Loading this adapter\n\n"
        f"This is a `{peft_type}` adapter from [{PACKAGE_NAME}](https://pypi.org/project/{PACKAGE_NAME}/), "
        "a plugin that adds this method to peft. Install and import it before loading:\n\n"
        f"```python\n{loading_snippet(config.task_type, import_plugin=True)}```\n"
    )


def _wrap_create_or_update_model_card(original):
    def create_or_update_model_card(self, output_dir: str):
        original(self, output_dir)
        if not is_ours(self.active_peft_config):
            return
        peft_type = self.active_peft_config.peft_type.value
        from huggingface_hub import ModelCard

        filename = os.path.join(output_dir, "README.md")
        card = ModelCard.load(filename)
        card.data["tags"] = sorted(set(card.data.get("tags") or []) | {PACKAGE_NAME, peft_type.lower()})
        if "## Loading this adapter" not in card.text:
            card.text = model_card_section(self.active_peft_config) + "\n" + card.text
        card.save(filename)

    return create_or_update_model_card


def _move_into(staging: str, target: str) -> None:
    """Move every file of `staging` into `target` (same file system), replacing files one by one."""
    for root, _, files in os.walk(staging):
        destination = os.path.join(target, os.path.relpath(root, staging))
        os.makedirs(destination, exist_ok=True)
        for name in files:
            os.replace(os.path.join(root, name), os.path.join(destination, name))


def _wrap_save_pretrained(original):
    def save_pretrained(self, save_directory: str, *args, **kwargs):
        if not any(is_ours(config) for config in self.peft_config.values()):
            return original(self, save_directory, *args, **kwargs)
        if os.path.isfile(save_directory):
            raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")
        parent = os.path.dirname(os.path.abspath(save_directory))
        try:
            os.makedirs(parent, exist_ok=True)
            staging = tempfile.mkdtemp(prefix=".saving-", dir=parent)
        except OSError as err:
            raise OSError(
                f"Cannot save the adapter to {save_directory}: {err}. Choose a directory you can write to; "
                "nothing was written and any adapter already there is unchanged."
            ) from err
        try:
            card = os.path.join(save_directory, "README.md")
            if os.path.exists(card):  # peft updates an existing model card rather than replacing it
                shutil.copy2(card, os.path.join(staging, "README.md"))
            original(self, staging, *args, **kwargs)
            _move_into(staging, save_directory)
        except OSError as err:
            raise OSError(
                f"Saving the adapter to {save_directory} failed: {err}. The files already there were each left "
                "either as they were or fully replaced, never half-written; free space or fix permissions and save "
                "again."
            ) from err
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    return save_pretrained


def _wrap_load_adapter(original):
    def load_adapter(self, model_id, adapter_name, *args, **kwargs):
        try:
            return original(self, model_id, adapter_name, *args, **kwargs)
        except SafetensorError as err:
            if not is_ours(self.peft_config.get(adapter_name)):
                raise
            raise ValueError(
                f"Could not read the adapter weights (adapter_model.safetensors) of {str(model_id)!r}: {err}. The file "
                "is truncated or corrupted. Save the adapter again, or, for a Hub adapter, delete it from the cache "
                "(`hf cache delete` / huggingface-cli delete-cache) and download it again."
            ) from err

    return load_adapter


_HUB_KWARGS = ("subfolder", "revision", "cache_dir", "token", "use_auth_token")


def _wrap_from_pretrained(original):
    def from_pretrained(
        cls, model, model_id, adapter_name: str = "default", is_trainable: bool = False, config=None, **kwargs
    ):
        if is_trainable and config is None:
            hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
            config_cls = PEFT_TYPE_TO_CONFIG_MAPPING[PeftConfig._get_peft_type(model_id, **hub_kwargs)]
            config = config_cls.from_pretrained(model_id, **hub_kwargs)
        if not (is_trainable and is_ours(config)):
            return original(
                cls, model, model_id, adapter_name=adapter_name, is_trainable=is_trainable, config=config, **kwargs
            )
        config.inference_mode = False
        task_type = getattr(config.task_type, "value", config.task_type)
        peft_cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(task_type, cls)
        build_kwargs = {key: kwargs[key] for key in ("autocast_adapter_dtype", "low_cpu_mem_usage") if key in kwargs}
        peft_model = peft_cls(model, config, adapter_name, **build_kwargs)
        peft_model.load_adapter(model_id, adapter_name, is_trainable=True, **kwargs)
        return peft_model

    return from_pretrained


def _wrap_check_new_adapter_config(original):
    def _check_new_adapter_config(self, peft_config, is_trainable: bool) -> None:
        # peft's rule against trainable prompt-learning loads is for encoders that save only the inference prompt
        return original(self, peft_config, is_trainable=is_trainable and not is_ours(peft_config))

    return _check_new_adapter_config


def _wrap_set_requires_grad(original):
    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if not names or not all(is_ours(self.peft_config.get(name)) for name in names):
            return original(self, adapter_names, requires_grad=requires_grad)
        for name in names:
            self.prompt_encoder[name].requires_grad_(requires_grad)

    return set_requires_grad


def _takes_task_ids(model: Any) -> bool:
    peft_config = getattr(model, "peft_config", None)
    return isinstance(peft_config, dict) and any(
        is_ours(config) and config.takes_task_ids for config in peft_config.values()
    )


def _wrap_trainer_get_dataloader(original):
    def _get_dataloader(self, dataset, *args, **kwargs):
        if not _takes_task_ids(self.model):
            return original(self, dataset, *args, **kwargs)
        from .multitask import TaskIdsCollator

        # `remove_unused_columns` keeps the columns the trainer's `_set_signature_columns_if_needed` names (the base
        # model's forward arguments; TRL names its own): `task_ids` is a PeftModel argument, so add it
        self._set_signature_columns_if_needed()
        if "task_ids" not in self._signature_columns:
            self._signature_columns = list(self._signature_columns) + ["task_ids"]
        collator = self.data_collator
        self.data_collator = TaskIdsCollator(collator)  # this call only: the trainer's collator stays the user's
        try:
            return original(self, dataset, *args, **kwargs)
        finally:
            self.data_collator = collator

    return _get_dataloader


# transformers' template card for a repo that has none (transformers.utils.hub.create_and_tag_model_card)
_TRANSFORMERS_TEMPLATE_MARK = "model card of a 🤗 transformers model that has been pushed on the Hub"


def _wrap_push_to_hub(original):
    def push_to_hub(self, *args, **kwargs):
        if not any(is_ours(config) for config in self.peft_config.values()):
            return original(self, *args, **kwargs)
        from huggingface_hub import ModelCard

        upload = self._upload_modified_files

        def upload_with_our_card(working_dir, *upload_args, **upload_kwargs):
            card_path = os.path.join(working_dir, "README.md")
            card = ModelCard.load(card_path)
            if card.data.get("library_name") == "transformers" and _TRANSFORMERS_TEMPLATE_MARK in card.text:
                tags = list(card.data.get("tags") or [])  # the push_to_hub(tags=...) the user asked for
                os.remove(card_path)
                self.create_or_update_model_card(working_dir)  # what save_pretrained writes
                if tags:
                    card = ModelCard.load(card_path)
                    card.data["tags"] = sorted(set(card.data.get("tags") or []) | set(tags))
                    card.save(card_path)
            else:
                self.create_or_update_model_card(working_dir)
            return upload(working_dir, *upload_args, **upload_kwargs)

        self._upload_modified_files = upload_with_our_card  # this call only
        try:
            return original(self, *args, **kwargs)
        finally:
            del self._upload_modified_files

    return push_to_hub


def _wrap_from_json_file(original):
    def from_json_file(cls, path_json_file: str, **kwargs):
        try:
            return original(cls, path_json_file, **kwargs)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path_json_file} is not valid JSON ({err}): the adapter config is damaged or truncated. Save the "
                "adapter again, or, for a Hub adapter, delete it from the cache and download it again."
            ) from err

    return from_json_file


# ----------------------------------------------------------------------------------------------
# peft < 0.21: state-dict dispatch that newer peft does through BasePromptEncoder hooks
# ----------------------------------------------------------------------------------------------


def _wrap_get_peft_model_state_dict(original):
    def get_peft_model_state_dict(model, state_dict=None, adapter_name="default", *args, **kwargs):
        result = original(model, state_dict, adapter_name, *args, **kwargs)
        config = model.peft_config[adapter_name]
        if is_ours(config):
            encoder_cls = type(model.prompt_encoder[adapter_name])
            result.update(encoder_cls._get_adapter_state_dict(model, config, adapter_name, state_dict, None))
        return result

    return get_peft_model_state_dict


def _wrap_set_peft_model_state_dict(original):
    def set_peft_model_state_dict(model, peft_model_state_dict, adapter_name="default", *args, **kwargs):
        config = model.peft_config[adapter_name]
        if not is_ours(config):
            return original(model, peft_model_state_dict, adapter_name, *args, **kwargs)
        encoder = model.prompt_encoder[adapter_name]
        encoder.check_adapter_state_dict(peft_model_state_dict)
        # peft's own code loads the modules_to_save weights, and copies `prompt_embeddings` into
        # `encoder.embedding`: hand it the encoder's current weight so that copy changes nothing,
        # then let the encoder load its whole state, as peft >= 0.21 does.
        for_peft = dict(peft_model_state_dict, prompt_embeddings=encoder.embedding.weight.detach().clone())
        result = original(model, for_peft, adapter_name, *args, **kwargs)
        encoder._load_adapter_state_dict(peft_model_state_dict)
        return result

    return set_peft_model_state_dict


# peft < 0.21 only: our encoders' save/load hooks (peft >= 0.21 calls them itself)
_STATE_DICT_PATCHES = (
    (save_and_load, "get_peft_model_state_dict", _wrap_get_peft_model_state_dict),
    (save_and_load, "set_peft_model_state_dict", _wrap_set_peft_model_state_dict),
)
_PATCHES = (
    (PeftModel, "_setup_prompt_encoder", _wrap_setup_prompt_encoder),
    (PeftModel, "get_prompt", _wrap_get_prompt),
    (PeftModel, "get_prompt_embedding_to_save", _wrap_get_prompt_embedding_to_save),
    (PeftModel, "create_or_update_model_card", _wrap_create_or_update_model_card),
    (PeftModelForCausalLM, "prepare_inputs_for_generation", _wrap_causal_prepare_inputs_for_generation),
    (PeftModelForSeq2SeqLM, "forward", _wrap_seq2seq_forward),
    (PeftModelForSeq2SeqLM, "generate", _wrap_seq2seq_generate),
    (PeftModel, "save_pretrained", _wrap_save_pretrained),
    (PeftModel, "load_adapter", _wrap_load_adapter),
    (PeftModel, "from_pretrained", _wrap_from_pretrained),
    (PeftModel, "_check_new_adapter_config", _wrap_check_new_adapter_config),
    (PeftModel, "set_requires_grad", _wrap_set_requires_grad),
    (PeftModel, "push_to_hub", _wrap_push_to_hub),
    (PeftConfigMixin, "from_json_file", _wrap_from_json_file),
    (transformers.Trainer, "_get_dataloader", _wrap_trainer_get_dataloader),
) + (() if HAS_PROMPT_ENCODER_HOOKS else _STATE_DICT_PATCHES)


def install() -> None:
    """Install all patches (idempotent)."""
    _check_versions()
    for owner, name, make_wrapper in _PATCHES:
        _patch(owner, name, make_wrapper)
    if not HAS_PROMPT_ENCODER_HOOKS:
        for owner, name, _ in _STATE_DICT_PATCHES:
            # modules that imported the function by name before we patched it
            for module in (peft_model_module, peft.utils, peft):
                if hasattr(module, name):
                    setattr(module, name, getattr(owner, name))


def installed_patches() -> dict[str, Callable]:
    """The patched callables and peft's originals they delegate to (for tests and debugging)."""
    return {
        f"{getattr(owner, '__name__', owner)}.{name}": getattr(getattr(owner, name), _PATCH_MARKER, None)
        for owner, name, _ in _PATCHES
    }
