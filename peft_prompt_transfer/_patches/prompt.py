"""Prompt set-up and forward: peft builds our encoders, asks them for the prompt, and puts it on seq2seq encoders;
decoders (causal LMs and decoder classifiers, forward and generate's prefill) share it where `shared_prefix` says."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from peft import PeftModelForSeq2SeqLM

from .._compat import (
    PROMPT_FEATURE,
    SHARED_PREFIX_FEATURE,
    encoder_class,
    is_ours,
    prompt_tuning_config_like,
    require_feature,
    shared_prefix_mode,
)
from .patching import Patch, PatchGroup
from .shared_prefix import (
    num_distinct_prompts,
    share_prefill,
    shared_prefix_classify,
    shared_prefix_forward,
    why_not_shared,
    why_not_shared_classifier,
    worth_sharing,
)

SEQ2SEQ_FORWARD_FEATURE = "the forward pass of seq2seq models"


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
        encoder = encoder_class(config)(config, self.word_embeddings)
        self.prompt_encoder[adapter_name] = encoder.to(self.device)

    return _setup_prompt_encoder


def _wrap_get_prompt(original):
    def get_prompt(self, batch_size: int, task_ids: Optional[torch.Tensor] = None, max_cache_len=None):
        if not is_ours(self.active_peft_config):
            return original(self, batch_size, task_ids=task_ids, max_cache_len=max_cache_len)
        if isinstance(self, PeftModelForSeq2SeqLM):
            # every forward of ours passes here: peft's unpatched seq2seq forward would use the prompt as a KV prefix
            require_feature(SEQ2SEQ_FORWARD_FEATURE)
        return self.prompt_encoder[self.active_adapter](batch_size, task_ids)

    return get_prompt


def prepend_prompt(model, inputs_embeds, attention_mask, task_ids):
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
        from peft.utils.other import _get_batch_size  # private: imported where used, once `uses` found it

        # Our prompts live on the encoder only (as peft's PROMPT_TUNING); the decoder arguments pass through.
        _get_batch_size(input_ids, inputs_embeds)  # peft's check that one of the two is given
        self._adjust_prompt_learning_kwargs(peft_config, kwargs=kwargs)
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        inputs_embeds, attention_mask = prepend_prompt(self, inputs_embeds, attention_mask, task_ids)
        return self.base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)

    return forward


def _takes_shared_path(
    peft_model, why_not: Callable, input_ids, inputs_embeds, output_attentions, task_ids, kwargs: dict
) -> bool:
    """Whether this forward shares the prompt (`shared_prefix` and the rule in `prompt_kv.py`); with "on", an
    error that says why it cannot."""
    config = peft_model.active_peft_config
    mode = shared_prefix_mode(config)
    if mode == "off":
        return False
    from peft.utils.other import _get_batch_size  # private: imported where used, once `uses` found it

    batch_size = _get_batch_size(input_ids, inputs_embeds)  # and peft's check that one of the two is given
    reason = why_not(peft_model, output_attentions, kwargs)
    if reason is not None and mode == "on":
        raise ValueError(
            f"shared_prefix='on', but this forward cannot share the prompt's keys and values: {reason}. Remove the "
            "cause, or set shared_prefix='auto' (which then concatenates, as peft does)."
        )
    if reason is not None or mode == "on":
        return reason is None
    length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
    distinct = num_distinct_prompts(peft_model, batch_size, task_ids)
    return worth_sharing(config.num_virtual_tokens, batch_size, length, distinct)


def _shared_or_peft_forward(why_not: Callable, shared_forward: Callable) -> Callable:
    """The wrapper of a peft forward: `shared_forward` where `_takes_shared_path`, peft's own forward elsewhere."""

    def make_wrapper(original):
        def forward(
            self,
            input_ids=None,
            attention_mask=None,
            inputs_embeds=None,
            labels=None,
            output_attentions=None,
            output_hidden_states=None,
            return_dict=None,
            task_ids=None,
            **kwargs,
        ):
            inputs = dict(
                input_ids=input_ids,
                attention_mask=attention_mask,
                inputs_embeds=inputs_embeds,
                labels=labels,
                output_hidden_states=output_hidden_states,
                return_dict=return_dict,
                task_ids=task_ids,
            )
            if _takes_shared_path(self, why_not, input_ids, inputs_embeds, output_attentions, task_ids, kwargs):
                self._adjust_prompt_learning_kwargs(self.active_peft_config, kwargs=kwargs)  # peft drops position_ids
                return shared_forward(self, kwargs=kwargs, **inputs)
            return original(self, output_attentions=output_attentions, **inputs, **kwargs)

        return forward

    return make_wrapper


_wrap_causal_forward = _shared_or_peft_forward(why_not_shared, shared_prefix_forward)
_wrap_classifier_forward = _shared_or_peft_forward(why_not_shared_classifier, shared_prefix_classify)


def _wrap_causal_generate(original):
    def generate(self, *args, **kwargs):
        if shared_prefix_mode(self.active_peft_config) == "off":
            return original(self, *args, **kwargs)
        prepare = self.prepare_inputs_for_generation  # peft's (or its cache translation, patch 7)

        # named as peft's (`*args`, `**kwargs`): transformers reads the names to validate generate's arguments
        def prepare_sharing_the_prompt(*args, task_ids=None, **kwargs):
            model_inputs = prepare(*args, task_ids=task_ids, **kwargs)
            return share_prefill(self, model_inputs, task_ids)

        # peft's generate hands `self.prepare_inputs_for_generation` to the base model: this call's, for this call
        self.prepare_inputs_for_generation = prepare_sharing_the_prompt
        try:
            return original(self, *args, **kwargs)
        finally:
            del self.prepare_inputs_for_generation

    return generate


PROMPT = PatchGroup(
    name=PROMPT_FEATURE,
    kind="correctness",
    patches=(
        # peft builds encoders only for its own prompt types
        Patch("peft.peft_model:PeftModel._setup_prompt_encoder", _wrap_setup_prompt_encoder, ("adapter_name",)),
        # peft branches on its own prompt types; ours take `task_ids` and need no `prompt_tokens`
        Patch("peft.peft_model:PeftModel.get_prompt", _wrap_get_prompt, ("batch_size", "task_ids", "max_cache_len")),
    ),
)

SEQ2SEQ_FORWARD = PatchGroup(
    name=SEQ2SEQ_FORWARD_FEATURE,
    kind="correctness",
    patches=(
        # peft puts only PROMPT_TUNING / P_TUNING prompts on the encoder input
        Patch(
            "peft.peft_model:PeftModelForSeq2SeqLM.forward",
            _wrap_seq2seq_forward,
            ("input_ids", "attention_mask", "inputs_embeds", "task_ids"),
            mirrors="peft 0.21.2's PeftModelForSeq2SeqLM.forward, prompt-tuning branch",
        ),
    ),
    entry_points=("peft.peft_model:PeftModelForSeq2SeqLM.forward",),
    requires=(PROMPT_FEATURE,),
    uses=(
        "peft.peft_model:PeftModel._adjust_prompt_learning_kwargs",
        "peft.utils.other:_get_batch_size",
    ),
)

SHARED_PREFIX = PatchGroup(
    name=SHARED_PREFIX_FEATURE,
    kind="convenience",
    patches=(
        Patch(
            "peft.peft_model:PeftModelForCausalLM.forward",
            _wrap_causal_forward,
            ("input_ids", "attention_mask", "inputs_embeds", "labels", "task_ids"),
            mirrors="peft 0.21.2's PeftModelForCausalLM.forward, prompt-tuning branch",
        ),
        # peft's generate prefills with the prompt in front of every row; its prefill step is handed a
        # prepare_inputs_for_generation that shares the distinct prompts' keys and values instead
        Patch("peft.peft_model:PeftModelForCausalLM.generate", _wrap_causal_generate),
        # a decoder-only classifier's prompt is a prefix too, where its head pools the same position
        Patch(
            "peft.peft_model:PeftModelForSequenceClassification.forward",
            _wrap_classifier_forward,
            ("input_ids", "attention_mask", "inputs_embeds", "labels", "task_ids"),
            mirrors="peft 0.21.2's PeftModelForSequenceClassification.forward, prompt-tuning branch",
        ),
    ),
    requires=(PROMPT_FEATURE,),
    uses=(
        "peft.peft_model:PeftModel._adjust_prompt_learning_kwargs",
        "peft.utils.other:_get_batch_size",
        "transformers:DynamicCache.batch_select_indices",
    ),
    lost=(
        "causal LMs run the prompt in front of every row, as peft does: the same outputs at peft's cost; "
        "shared_prefix='on' is refused."
    ),
)
