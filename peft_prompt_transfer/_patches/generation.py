"""Generation: cached decoding on causal LMs across transformers' `cache` rename, and seq2seq `generate`."""

from __future__ import annotations

import inspect
import re
from typing import Any, Optional

import torch
import transformers

from .._compat import PROMPT_FEATURE, is_ours
from .patching import PATCH_MARKER, Patch, PatchGroup, resolve
from .prompt import prepend_prompt

CAUSAL_PREPARE_TARGET = "peft.peft_model:PeftModelForCausalLM.prepare_inputs_for_generation"


def transformers_passes_cache() -> bool:
    """Whether transformers hands the KV cache to `prepare_inputs_for_generation` as `cache` (5.24 renamed it from
    `past_key_values` and stopped passing `cache_position`)."""
    prepare = transformers.GenerationMixin.prepare_inputs_for_generation
    return "cache" in inspect.signature(prepare).parameters


def reads_cache_keyword(prepare: Any) -> bool:
    """Whether the source of peft's `prepare_inputs_for_generation` reads the `cache` keyword.

    peft up to 0.21.2 looks only for `past_key_values`; a release that learns transformers' new name has the string
    `"cache"` in this function, or asks peft's own `get_transformers_cache_name()` for it (peft 0.22). Without
    readable source, assume it does not (the patch then runs, as it must on every release before 0.22).
    """
    try:
        source = inspect.getsource(getattr(prepare, PATCH_MARKER, prepare))
    except (OSError, TypeError):
        return False
    return re.search(r"""["']cache["']|get_transformers_cache_name\(""", source) is not None


def causal_generation_needed() -> bool:
    """The cache-keyword translation is needed while transformers passes `cache` and peft does not read it."""
    if not transformers_passes_cache():
        return False
    try:
        owner, name = resolve(CAUSAL_PREPARE_TARGET)
    except AttributeError:
        return True  # install_groups then reports the target as missing and guards generate
    return not reads_cache_keyword(getattr(owner, name))


def _cache_length(cache: Any) -> int:
    if cache is None:
        return 0
    if isinstance(cache, (tuple, list)):  # legacy tuple cache
        return cache[0][0].shape[-2]
    return cache.get_seq_length()


def _wrap_causal_prepare_inputs_for_generation(original):
    def prepare_inputs_for_generation(self, *args, task_ids: Optional[torch.Tensor] = None, **kwargs):
        if not is_ours(self.active_peft_config):
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
        inputs_embeds, attention_mask = prepend_prompt(
            self, self.word_embeddings(input_ids), kwargs.pop("attention_mask", None), task_ids
        )
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        return self.base_model.generate(inputs_embeds=inputs_embeds, **kwargs)

    return generate


CAUSAL_GENERATION = PatchGroup(
    name="cached generation on causal LMs",
    kind="correctness",
    patches=(
        # transformers >= 5.24 passes the cache as `cache`; peft <= 0.21.2 reads `past_key_values`, so it would
        # prepend the prompt again at every decoding step
        Patch(CAUSAL_PREPARE_TARGET, _wrap_causal_prepare_inputs_for_generation, ("task_ids",)),
    ),
    needed=causal_generation_needed,
    entry_points=("peft.peft_model:PeftModelForCausalLM.generate",),
    requires=(PROMPT_FEATURE,),
)

SEQ2SEQ_GENERATION = PatchGroup(
    name="generation on seq2seq models",
    kind="correctness",
    patches=(
        # peft puts only PROMPT_TUNING / P_TUNING prompts on the encoder input
        Patch(
            "peft.peft_model:PeftModelForSeq2SeqLM.generate",
            _wrap_seq2seq_generate,
            mirrors="peft 0.21.2's PeftModelForSeq2SeqLM.generate, prompt-tuning branch",
        ),
    ),
    entry_points=("peft.peft_model:PeftModelForSeq2SeqLM.generate",),
    requires=(PROMPT_FEATURE,),
    uses=("peft.peft_model:PeftModel._adjust_prompt_learning_kwargs",),
)
