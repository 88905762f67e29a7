"""The prompts a library takes from adapters: peft `PROMPT_TUNING` adapters (and `export_prompt_tuning` outputs),
this package's adapters, saved (a folder or a Hub repo id) or live (a `PeftModel`), and the prompt a model holds now.

Each adapter gives one or more named prompts `[num_virtual_tokens, token_dim]`, with where they came from:

- `PROMPT_TUNING`: its prompt;
- residual: the folded prompt, `MLP(P) + P`, which the model sees;
- ComPT: each task's composed prompt, named `name/task`;
- a Bayesian source: each particle, named `name/particle-i`;
- a Bayesian target: its prompt.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from peft import PeftConfig, PeftModel
from peft.utils import SAFETENSORS_WEIGHTS_NAME, load_peft_weights
from safetensors.torch import load_file

from .._compat import encoder_class, enum_value, is_ours
from ..base import gathered_parameters
from ..files import local_or_hub_file

PROMPT_TUNING = "PROMPT_TUNING"
ACCEPTED = "peft PROMPT_TUNING adapters (export_prompt_tuning writes them too) and this package's adapters"


@dataclass
class NamedPrompt:
    """A prompt taken from an adapter, with its name in the library and what it came from."""

    name: str
    prompt: torch.Tensor  # [num_virtual_tokens, token_dim], float32 on the CPU
    task_type: Optional[str]
    origin: dict[str, Any] = field(default_factory=dict)


def _encoder_prompts(name: str, encoder: torch.nn.Module, config: PeftConfig, origin: dict) -> Iterator[NamedPrompt]:
    """The prompts of one of this package's encoders (see the module)."""
    task_type, peft_type = enum_value(config.task_type), enum_value(config.peft_type)
    origin = dict(origin, peft_type=peft_type)
    with torch.no_grad():
        if peft_type == "COMPT":
            tasks = config.task_names or list(range(config.num_tasks))
            for task in tasks:
                prompt = encoder.inference_prompt(task)
                yield NamedPrompt(f"{name}/{task}", prompt.float().cpu(), task_type, dict(origin, task=task))
        elif peft_type == "BAYESIAN_PROMPT_TUNING" and config.stage == "source":
            for index, particle in enumerate(encoder.particles):
                yield NamedPrompt(
                    f"{name}/particle-{index}",
                    particle.detach().float().cpu().clone(),
                    task_type,
                    dict(origin, particle=index),
                )
        else:
            yield NamedPrompt(name, encoder.inference_prompt().float().cpu(), task_type, origin)


# peft's prompt methods whose prompt `PeftModel.get_prompt` gives as input embeddings, which `add` takes
_OTHER_INPUT_PROMPTS = ("P_TUNING", "MULTITASK_PROMPT_TUNING")
# peft's default for a seq2seq PROMPT_TUNING adapter: a prompt in front of the encoder's input and the decoder's
BOTH_STACKS = (
    "puts a prompt on both the encoder and the decoder (num_transformer_submodules={}, peft's default for seq2seq "
    "models); a library entry is one prompt in front of the input"
)


def _check_prompt_tuning(name: str, config: PeftConfig) -> None:
    peft_type = enum_value(config.peft_type)
    if peft_type != PROMPT_TUNING and not is_ours(config):
        task_ids = ", task_ids=torch.tensor([task])" if peft_type == "MULTITASK_PROMPT_TUNING" else ""
        how = (
            "Add the prompt it gives the model (the input's part of it) instead: library.add(name, "
            f"model.eval().get_prompt(batch_size=1{task_ids})[0, :{config.num_virtual_tokens}])."
            if peft_type in _OTHER_INPUT_PROMPTS
            else "Its prompt is not input embeddings (prefix tuning's are keys and values), or it has none: leave it out."
        )
        raise ValueError(f"Adapter {name!r} is a {peft_type} adapter; a prompt library takes {ACCEPTED}. {how}")
    if (config.num_transformer_submodules or 1) != 1:
        raise ValueError(
            f"Adapter {name!r} {BOTH_STACKS.format(config.num_transformer_submodules)}. Train it with "
            "PromptTuningConfig(..., num_transformer_submodules=1)."
        )


def live_adapter_prompts(name: str, model: PeftModel, adapter_name: Optional[str] = None) -> Iterator[NamedPrompt]:
    """The prompts of a `PeftModel`'s adapter (the active one by default), as they are now."""
    adapter_name = adapter_name or model.active_adapter
    config = model.peft_config[adapter_name]
    _check_prompt_tuning(name, config)
    origin = {"source": f"PeftModel adapter {adapter_name!r}"}
    encoder = model.prompt_encoder[adapter_name]
    with gathered_parameters(encoder):  # whole prompts also under FSDP2 (every rank must build the library)
        if is_ours(config):
            prompts = list(_encoder_prompts(name, encoder, config, origin))
        else:
            prompt = encoder.embedding.weight.detach().float().cpu().clone()
            prompts = [NamedPrompt(name, prompt, enum_value(config.task_type), dict(origin, peft_type=PROMPT_TUNING))]
    yield from prompts


def saved_adapter_prompts(
    name: str,
    location: Union[str, os.PathLike],
    word_embeddings: torch.nn.Module,
    base_model_record: dict[str, Any],
    revision: Optional[str] = None,
    hub_options: Optional[dict[str, Any]] = None,
) -> Iterator[NamedPrompt]:
    """The prompts of an adapter saved in a folder or a Hub repo (`save_pretrained`, `export_prompt_tuning`), read
    with `hub_options` (`hub_download_options`).

    This package's adapters are rebuilt in inference mode from their files alone, so the base model is never
    wrapped or changed. Their recorded vocabulary size is checked against `base_model_record`'s."""
    location = os.fspath(location)
    hub = {**(hub_options or {}), **({"revision": revision} if revision else {})}
    try:
        config = PeftConfig.from_pretrained(location, **hub)
    except Exception as exc:
        where = (
            "the folder holds no readable adapter_config.json"
            if os.path.isdir(location)
            else "it is not a folder, and no Hub repo of that name could be read"
        )
        raise FileNotFoundError(
            f"Cannot read the adapter {name!r} from {location!r}: {where} ({type(exc).__name__}: {exc}). Pass the "
            "folder save_pretrained wrote, a reachable Hub repo id, or the PeftModel itself."
        ) from exc
    _check_prompt_tuning(name, config)
    vocab_size = getattr(config, "base_vocab_size", None)
    if vocab_size is not None and vocab_size != base_model_record["vocab_size"]:
        warnings.warn(
            f"Adapter {name!r} at {location!r} was made for a base model with a vocabulary of {vocab_size} tokens, but "
            f"base_model ({base_model_record.get('name_or_path')!r}) has {base_model_record['vocab_size']}: unless it "
            "is the same model with added tokens, its prompts were trained for another model. Pass the base model "
            "the adapters were trained on.",
            stacklevel=3,
        )
        config.base_vocab_size = None  # warned here, with the adapter's name; the encoder built below would again
    weights = _adapter_weights(location, revision, hub_options or {})
    origin = {
        "source": location,
        **({"revision": revision} if revision else {}),
        **({"subfolder": hub["subfolder"]} if hub.get("subfolder") else {}),
    }
    if not is_ours(config):
        if "prompt_embeddings" not in weights:
            raise ValueError(
                f"The adapter {name!r} at {location!r} has no 'prompt_embeddings' tensor (found "
                f"{sorted(weights)[:8]}); the file is damaged. Save it again with save_pretrained."
            )
        prompt = weights["prompt_embeddings"].float()
        yield NamedPrompt(name, prompt, enum_value(config.task_type), dict(origin, peft_type=PROMPT_TUNING))
        return
    config.inference_mode = True  # the saved prompts are all that is needed; no posterior, no prompt MLP
    encoder = encoder_class(config)(config, word_embeddings)
    encoder._load_adapter_state_dict(weights)
    yield from _encoder_prompts(name, encoder, config, origin)


def _adapter_weights(location: str, revision: Optional[str], hub_options: dict[str, Any]) -> dict[str, torch.Tensor]:
    """An adapter's weights from a folder (peft's `load_peft_weights`) or a Hub repo. From the Hub,
    `adapter_model.safetensors` is fetched with every one of `hub_options` (peft's loader asks the Hub whether the file
    exists without `local_files_only` or `endpoint`, and looks for a subfolder's file in the subfolder twice offline);
    a repo without it falls back to peft's loader, which also reads a pickled `adapter_model.bin`."""
    hub = {**hub_options, **({"revision": revision} if revision else {})}
    if os.path.isdir(location):
        return load_peft_weights(location, device="cpu", **hub)
    try:
        path = local_or_hub_file(location, SAFETENSORS_WEIGHTS_NAME, revision, "adapter", "", **hub_options)
    except FileNotFoundError:
        return load_peft_weights(location, device="cpu", **hub)
    return load_file(path, device="cpu")


def current_prompt(model: torch.nn.Module, task: Optional[Union[int, str]] = None) -> torch.Tensor:
    """The prompt a `PeftModel`'s active prompt adapter gives the model now, `[num_virtual_tokens, token_dim]`:
    what "no transfer" starts from. ComPT needs `task`."""
    if not isinstance(model, PeftModel) or model.active_adapter not in getattr(model, "prompt_encoder", {}):
        raise ValueError(
            f"{type(model).__name__} holds no prompt of its own to rank as the start without transfer. Pass the "
            "PeftModel you will train (a PROMPT_TUNING adapter or one of this package's), or include_current=False."
        )
    config = model.peft_config[model.active_adapter]
    peft_type = enum_value(config.peft_type)
    if peft_type != PROMPT_TUNING and not is_ours(config):
        raise ValueError(
            f"The model's own adapter is a {peft_type} adapter: rank ranks the start of a peft PROMPT_TUNING adapter "
            "or one of this package's next to the entries (and initialize writes entries only into those). Rank "
            "the entries alone with include_current=False."
        )
    if (config.num_transformer_submodules or 1) != 1:
        raise ValueError(
            f"The model's own PROMPT_TUNING adapter {BOTH_STACKS.format(config.num_transformer_submodules)}, so "
            "neither can its start be ranked next to the entries nor can an entry be written into it. Build it with "
            "PromptTuningConfig(..., num_transformer_submodules=1), or rank the entries alone with "
            "include_current=False."
        )
    encoder = model.prompt_encoder[model.active_adapter]
    with torch.no_grad(), gathered_parameters(encoder):
        if is_ours(config):
            return encoder.inference_prompt(task).detach().float().cpu().clone()
        return encoder.embedding.weight.detach().float().cpu().clone()
