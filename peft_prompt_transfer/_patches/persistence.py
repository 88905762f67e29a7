"""Persistence and the Hub: saving and loading our adapters' whole state, safely, with cards that say how to load."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile

import torch
from peft import PeftConfig
from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from safetensors import SafetensorError
from torch.distributed.tensor import DTensor

from .._compat import HAS_PROMPT_ENCODER_HOOKS, PACKAGE_NAME, PROMPT_FEATURE, is_ours
from ..model_card import model_card_section
from .patching import Patch, PatchGroup


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


# the upstream function that decides which keys of a loaded adapter peft's key check may ignore (peft >= 0.22)
FILTER_EXPECTED_KEYS_TARGET = "peft.peft_model:_filter_expected_adapter_keys"


def peft_checks_adapter_keys() -> bool:
    """Whether peft's `load_adapter` checks the loaded keys against the model (`strict_adapter_check`, peft 0.22)."""
    from peft import PeftModel

    return "strict_adapter_check" in inspect.signature(PeftModel.load_adapter).parameters


def _wrap_filter_expected_adapter_keys(original):
    def _filter_expected_adapter_keys(keys: list[str], config) -> list[str]:
        kept = original(keys, config)
        if not is_ours(config):
            return kept
        # peft loads a prompt method's state through its encoder and excuses only top-level keys; ours nest theirs
        # (`reparameterization.down_weight`, a residual MLP's), so every load warned of "unexpected adapter keys". The
        # encoder reads its own keys (and raises on a missing or misshapen one); the base model's stay checked.
        return [key for key in kept if key.startswith("base_model.")]

    return _filter_expected_adapter_keys


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


PERSISTENCE_ENTRY_POINTS = ("peft.peft_model:PeftModel.save_pretrained", "peft.peft_model:PeftModel.load_adapter")
# peft modules that import the state-dict functions by name
_STATE_DICT_ALIASES = ("peft.peft_model", "peft.utils", "peft")

PERSISTENCE = PatchGroup(
    name="saving and loading",
    kind="correctness",
    patches=(
        # peft feeds token indices to the encoder; ours return the prompt that inference uses
        Patch(
            "peft.peft_model:PeftModel.get_prompt_embedding_to_save",
            _wrap_get_prompt_embedding_to_save,
            ("adapter_name",),
        ),
    ),
    entry_points=PERSISTENCE_ENTRY_POINTS,
    requires=(PROMPT_FEATURE,),
)

STATE_DICT_HOOKS = PatchGroup(
    name="saving and loading the whole training state (peft < 0.21)",
    kind="correctness",
    patches=(
        # peft >= 0.21 calls `BasePromptEncoder` hooks here; older peft hard-codes `prompt_embeddings`
        Patch(
            "peft.utils.save_and_load:get_peft_model_state_dict",
            _wrap_get_peft_model_state_dict,
            ("model", "state_dict", "adapter_name"),
            aliases=_STATE_DICT_ALIASES,
        ),
        Patch(
            "peft.utils.save_and_load:set_peft_model_state_dict",
            _wrap_set_peft_model_state_dict,
            ("model", "peft_model_state_dict", "adapter_name"),
            aliases=_STATE_DICT_ALIASES,
        ),
    ),
    needed=lambda: not HAS_PROMPT_ENCODER_HOOKS,
    entry_points=PERSISTENCE_ENTRY_POINTS,
    requires=(PROMPT_FEATURE,),
)

ATOMIC_SAVE = PatchGroup(
    name="saving through a staging folder",
    kind="convenience",
    patches=(Patch("peft.peft_model:PeftModel.save_pretrained", _wrap_save_pretrained, ("save_directory",)),),
    lost=(
        "save_pretrained writes straight into the target folder, so a save that fails midway can leave a "
        "half-written adapter: save to a new folder and move it into place."
    ),
)

CLEAR_LOAD_ERRORS = PatchGroup(
    name="clear errors for damaged adapter files",
    kind="convenience",
    patches=(
        Patch("peft.peft_model:PeftModel.load_adapter", _wrap_load_adapter, ("model_id", "adapter_name")),
        # the one hook that acts on every adapter type (the type is in the file it cannot read); it only rewords
        Patch("peft.config:PeftConfigMixin.from_json_file", _wrap_from_json_file, ("path_json_file",)),
    ),
    lost=(
        "a damaged adapter_model.safetensors or adapter_config.json raises peft's own error, which does not name "
        "the file: save the adapter again, or delete it from the Hub cache and download it again."
    ),
)

ADAPTER_KEY_CHECK = PatchGroup(
    name="peft's adapter key check on our adapters",
    kind="convenience",
    patches=(Patch(FILTER_EXPECTED_KEYS_TARGET, _wrap_filter_expected_adapter_keys, ("keys", "config")),),
    needed=peft_checks_adapter_keys,
    lost=(
        'loading a residual, ComPT or Bayesian adapter warns of "unexpected adapter keys" that are its prompt '
        "encoder's own, loaded and checked by the encoder: the warning is harmless (pass "
        'strict_adapter_check="ignore" to silence it).'
    ),
)

TRAINABLE_LOADS = PatchGroup(
    name="loading our adapters for training (is_trainable=True)",
    kind="convenience",
    patches=(
        Patch(
            "peft.peft_model:PeftModel.from_pretrained",
            _wrap_from_pretrained,
            ("model", "model_id", "adapter_name", "is_trainable", "config"),
            mirrors="peft 0.21.2's PeftModel.from_pretrained, for trainable loads of our adapters",
        ),
        Patch(
            "peft.peft_model:PeftModel._check_new_adapter_config",
            _wrap_check_new_adapter_config,
            ("peft_config", "is_trainable"),
        ),
        Patch(
            "peft.peft_model:PeftModel.set_requires_grad", _wrap_set_requires_grad, ("adapter_names", "requires_grad")
        ),
    ),
    lost=(
        "PeftModel.from_pretrained(..., is_trainable=True) refuses our adapters, as peft does for its own prompt "
        "methods: build the model with get_peft_model(base, PeftConfig.from_pretrained(path)) and load the weights "
        "with set_peft_model_state_dict(model, load_peft_weights(path))."
    ),
)

HUB_CARDS = PatchGroup(
    name="model cards that name this plugin",
    kind="convenience",
    patches=(
        Patch(
            "peft.peft_model:PeftModel.create_or_update_model_card", _wrap_create_or_update_model_card, ("output_dir",)
        ),
        # push_to_hub rewrites the card that save_pretrained wrote: put ours back before the upload
        Patch("peft.peft_model:PeftModel.push_to_hub", _wrap_push_to_hub),
    ),
    uses=("peft.peft_model:PeftModel._upload_modified_files",),
    lost=(
        "saved and pushed model cards do not tag the plugin nor say to install and import it: tell users of your "
        f"adapters to `pip install {PACKAGE_NAME}` and `import peft_prompt_transfer` before loading."
    ),
)
