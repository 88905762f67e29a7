"""The shared-prefix path: a decoder-only model runs each distinct prompt once per batch, not once per row.

In a decoder-only model the prompt comes first and attention is causal, so the prompt's keys and values at every
layer do not depend on the input. peft's `PROMPT_TUNING` concatenates the prompt in front of every row, so a batch of
B rows pushes the same P positions through the frozen model B times, forward and backward. Here the U distinct
prompts of the batch (one for residual and a Bayesian target, one per task present for ComPT, one per particle for
a Bayesian source in training) go through the model once, with the cache on; their per-layer keys and values are
gathered to the rows, and the rows run with that cache and the attention mask extended by P ones. Gradients flow
back through the gathered keys and values to the prompts. The work that grows with tokens falls from B·(P+L)
positions to U·P + B·L.

It gives peft's outputs: the logits have peft's shape, prompt positions included (computed U times, gathered to the
rows), and the loss is the model's own loss function on the same logits and labels as the concatenated path's,
including the first input token, which the last prompt position predicts. Whether a forward can share (the rule,
`why_not_shared`) is decided in `prompt_kv.py`, below this layer, where `PromptLibrary.rank` reads it too.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import nn
from transformers import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast, SequenceClassifierOutputWithPast

from .._compat import cache_keyword, is_ours, shared_prefix_mode
from ..prompt_kv import why_not_shared

# "auto" concatenates where sharing saves too little to pay for its second call and its copies. Measured on SmolLM2
# (2 CPU threads, `python -m benchmarks cost shared-prefix`, docs/guides/shared-prefix.md#cost), residual prompt
# tuning (one distinct prompt): saving (B-U)·P = 4 positions took 1.55 times the concatenated step, 30 took 1.05, 70
# took 0.98-1.02, 140 took 0.82-0.97 and 700 took 0.55; a Bayesian source (U = 4 particles) saving 40 took 1.06, 80
# took 0.98-1.02 and 400 took 0.75; running 0.93 of the positions (P=10, L=128, B=32) saved nothing (1.00 [0.95, 1.09]).
MIN_SAVED_POSITIONS = 128
MAX_SHARED_FRACTION = 0.9


def distinct_prompts(
    peft_model: nn.Module, batch_size: int, task_ids: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's distinct prompts `[U, P, d]` and each row's index into them: our encoder's, or for peft's
    `PROMPT_TUNING` and `P_TUNING` (after `enable_shared_prefix`) their one prompt, computed once."""
    if is_ours(peft_model.active_peft_config):
        return peft_model.prompt_encoder[peft_model.active_adapter].distinct_prompts(batch_size, task_ids)
    prompt = peft_model.get_prompt(batch_size=1)
    return prompt, torch.zeros(batch_size, dtype=torch.long, device=prompt.device)


def num_distinct_prompts(peft_model: nn.Module, batch_size: int, task_ids: Optional[torch.Tensor]) -> int:
    """How many prompts `distinct_prompts` gives, without computing them."""
    if is_ours(peft_model.active_peft_config):
        return peft_model.prompt_encoder[peft_model.active_adapter].num_distinct_prompts(batch_size, task_ids)
    return 1


def worth_sharing(num_virtual_tokens: int, batch_size: int, length: int, distinct: int = 1) -> bool:
    """Whether running the `distinct` prompts once each, not once per row, saves enough positions, `(B-U)·P`, and a
    large enough fraction of them (it runs `U·P + B·L` of the concatenated path's `B·(P+L)`), to be faster than
    concatenating."""
    saved = (batch_size - distinct) * num_virtual_tokens
    fraction = (distinct * num_virtual_tokens + batch_size * length) / (batch_size * (num_virtual_tokens + length))
    return saved >= MIN_SAVED_POSITIONS and fraction <= MAX_SHARED_FRACTION


def _kept_positions(logits_to_keep: Union[int, torch.Tensor], length: int, device: torch.device) -> torch.Tensor:
    """The positions (in `[0, length)`) whose logits transformers keeps for `logits_to_keep`."""
    if isinstance(logits_to_keep, int):
        return torch.arange(length - logits_to_keep if logits_to_keep else 0, length, device=device)
    return torch.as_tensor(logits_to_keep, device=device).remainder(length)


def _run(base: nn.Module, keyword: str, cache: DynamicCache, positions: torch.Tensor, length: int, **inputs):
    """`base(**inputs)` with `cache`, keeping the logits of `positions` (all of them as transformers' default)."""
    keep: Union[int, torch.Tensor] = 0 if positions.numel() == length else positions
    if positions.numel() == 0:
        keep = 1  # nothing is needed: the cheapest the model can do
    return base(**inputs, **{keyword: cache}, logits_to_keep=keep)


def _joined_hidden_states(prefix: Any, outputs: Any, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each layer's hidden states as the concatenated path has them: the prompts' gathered to the rows, then the
    rows' own."""
    return tuple(
        torch.cat((prompt_layer.index_select(0, rows), row_layer), dim=1)
        for prompt_layer, row_layer in zip(prefix.hidden_states, outputs.hidden_states)
    )


def shared_prefix_forward(
    peft_model: nn.Module,
    input_ids: Optional[torch.Tensor],
    attention_mask: Optional[torch.Tensor],
    inputs_embeds: Optional[torch.Tensor],
    labels: Optional[torch.Tensor],
    output_hidden_states: Optional[bool],
    return_dict: Optional[bool],
    task_ids: Optional[torch.Tensor],
    kwargs: dict[str, Any],
):
    """peft's causal-LM prompt-learning forward, computed with each distinct prompt run once (see the module)."""
    base = peft_model.base_model
    keyword = cache_keyword(base)
    if inputs_embeds is None:
        inputs_embeds = peft_model.word_embeddings(input_ids)
    batch_size, length = inputs_embeds.shape[:2]
    prompts, rows = distinct_prompts(peft_model, batch_size, task_ids)
    prompts = prompts.to(inputs_embeds.dtype)
    num_virtual_tokens = prompts.shape[1]
    total = num_virtual_tokens + length
    device = inputs_embeds.device
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    logits_to_keep = kwargs.pop("logits_to_keep", 0)
    if labels is not None and not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
        raise ValueError(
            "labels together with logits_to_keep are not supported by the shared-prefix path (the loss needs every "
            "position's logits). Pass one of them, or set shared_prefix='off'."
        )
    kept = _kept_positions(logits_to_keep, total, device)
    order = torch.argsort(kept, stable=True)
    kept_sorted = kept[order]
    prompt_positions = kept_sorted[kept_sorted < num_virtual_tokens]
    row_positions = kept_sorted[kept_sorted >= num_virtual_tokens] - num_virtual_tokens
    rows = rows.to(device)

    cache = DynamicCache(config=base.config)
    prefix = _run(
        base,
        keyword,
        cache,
        prompt_positions,
        num_virtual_tokens,
        inputs_embeds=prompts,
        use_cache=True,
        output_hidden_states=output_hidden_states,
        return_dict=True,
    )
    cache.batch_select_indices(rows)  # the prompts' keys and values, gathered to the rows (differentiably)
    if attention_mask is not None:
        prefix_mask = attention_mask.new_ones(batch_size, num_virtual_tokens)
        attention_mask = torch.cat((prefix_mask, attention_mask), dim=1)
    outputs = _run(
        base,
        keyword,
        cache,
        row_positions,
        length,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        output_hidden_states=output_hidden_states,
        return_dict=True,
        **kwargs,
    )
    prompt_logits = prefix.logits.index_select(0, rows)
    if row_positions.numel() == 0:
        logits = prompt_logits
    elif prompt_positions.numel() == 0:
        logits = outputs.logits
    else:
        logits = torch.cat((prompt_logits, outputs.logits), dim=1)

    loss = None
    if labels is not None:
        # the last prompt position predicts the first input token, as in the concatenated path
        ignored = labels.new_full((batch_size, 1), -100)
        loss = base.loss_function(
            logits=logits[:, num_virtual_tokens - 1 :].contiguous(),
            labels=torch.cat((ignored, labels.to(device)), dim=1),
            vocab_size=base.config.get_text_config().vocab_size,
            num_items_in_batch=num_items_in_batch,
        )
    if kept.numel() and not torch.equal(order, torch.arange(order.numel(), device=device)):
        logits = logits[:, torch.argsort(order)]  # back to the caller's order of logits_to_keep
    hidden_states = _joined_hidden_states(prefix, outputs, rows) if output_hidden_states else None
    # the output names the cache as the forward does (`cache` from transformers 5.24)
    result = CausalLMOutputWithPast(
        loss=loss, logits=logits, hidden_states=hidden_states, **{keyword: getattr(outputs, keyword, None)}
    )
    return result if return_dict is not False else result.to_tuple()


def share_prefill(peft_model: nn.Module, model_inputs: dict[str, Any], task_ids: Optional[torch.Tensor]) -> dict:
    """`generate`'s prefill with each distinct prompt run once: peft's `prepare_inputs_for_generation` has put the
    prompt in front of every row (`inputs_embeds`, the attention mask extended by P); where sharing applies, the
    distinct prompts run through the model into `generate`'s own empty cache, their keys and values are gathered to
    the rows (beams included), and the rows keep only their own embeddings. Decoding steps are left as they are."""
    config = peft_model.active_peft_config
    mode = shared_prefix_mode(config)
    keyword = "cache" if "cache" in model_inputs else "past_key_values"
    cache, embeds = model_inputs.get(keyword), model_inputs.get("inputs_embeds")
    if embeds is None or model_inputs.get("input_ids") is not None or cache is None or cache.get_seq_length():
        return model_inputs  # a decoding step (or a prefill from the caller's own cache)
    reason = why_not_shared(peft_model, model_inputs.get("output_attentions"), {})
    if reason is None and not isinstance(cache, DynamicCache):
        reason = f"generate uses a {type(cache).__name__}, which cannot take a prefix of another batch size"
    if reason is not None and mode == "on":
        raise ValueError(
            f"shared_prefix='on', but generate cannot share the prompt's keys and values: {reason}. Remove the "
            "cause, or set shared_prefix='auto' (which then concatenates, as peft does)."
        )
    num_virtual_tokens = config.num_virtual_tokens
    batch_size, length = embeds.shape[0], embeds.shape[1] - num_virtual_tokens
    if reason is not None or (
        mode == "auto"
        and not worth_sharing(
            num_virtual_tokens, batch_size, length, num_distinct_prompts(peft_model, batch_size, task_ids)
        )
    ):
        return model_inputs
    prompts, rows = distinct_prompts(peft_model, batch_size, task_ids)
    base = peft_model.base_model
    base(inputs_embeds=prompts.to(embeds.dtype), use_cache=True, logits_to_keep=1, **{cache_keyword(base): cache})
    cache.batch_select_indices(rows.to(embeds.device))
    model_inputs["inputs_embeds"] = embeds[:, num_virtual_tokens:]
    return model_inputs


def why_not_shared_classifier(peft_model: nn.Module, output_attentions: Optional[bool], kwargs: dict[str, Any]):
    """Why a sequence classifier's forward cannot take the shared-prefix path, or None: the causal LM's reasons, and
    a classifier that may not pool the concatenated path's position. transformers' generic decoder classifier
    (Llama, Mistral, Qwen, Gemma, Phi-3, ...) pools the last position when given embeddings, as peft gives them, so
    the rows' last position is the concatenated sequence's; other heads are not known to."""
    reason = why_not_shared(peft_model, output_attentions, kwargs)
    try:  # the upstream fact this rests on, looked up where used: a transformers without it shares nothing here
        from transformers.modeling_layers import GenericForSequenceClassification
    except ImportError:
        GenericForSequenceClassification = ()  # noqa: N806  (isinstance of an empty tuple: never)
    if reason is None and not isinstance(peft_model.base_model, GenericForSequenceClassification):
        reason = (
            f"{type(peft_model.base_model).__name__} is not transformers' generic decoder classifier, so its pooled "
            "position is not known to be the concatenated path's"
        )
    if reason is None and kwargs.get("token_type_ids") is not None:
        reason = "token_type_ids were given (a decoder-only model's rows take none)"
    return reason


def shared_prefix_classify(
    peft_model: nn.Module,
    input_ids: Optional[torch.Tensor],
    attention_mask: Optional[torch.Tensor],
    inputs_embeds: Optional[torch.Tensor],
    labels: Optional[torch.Tensor],
    output_hidden_states: Optional[bool],
    return_dict: Optional[bool],
    task_ids: Optional[torch.Tensor],
    kwargs: dict[str, Any],
):
    """peft's sequence-classification prompt-learning forward on a decoder-only classifier, with each distinct prompt
    run once through the classifier's body: the rows then run with the prompts' keys and values, and the head pools
    the rows' last position, the concatenated sequence's last position."""
    classifier = peft_model.base_model
    body = classifier.base_model
    if inputs_embeds is None:
        inputs_embeds = peft_model.word_embeddings(input_ids)
    batch_size = inputs_embeds.shape[0]
    prompts, rows = distinct_prompts(peft_model, batch_size, task_ids)
    prompts = prompts.to(inputs_embeds.dtype)
    num_virtual_tokens = prompts.shape[1]
    cache = DynamicCache(config=classifier.config)
    prefix = body(
        inputs_embeds=prompts,
        use_cache=True,
        output_hidden_states=output_hidden_states,
        return_dict=True,
        **{cache_keyword(body): cache},
    )
    rows = rows.to(inputs_embeds.device)
    cache.batch_select_indices(rows)
    if attention_mask is not None:
        attention_mask = torch.cat((attention_mask.new_ones(batch_size, num_virtual_tokens), attention_mask), dim=1)
    outputs = classifier(
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        labels=labels,
        output_hidden_states=output_hidden_states,
        return_dict=True,
        **{cache_keyword(classifier): cache},
        **kwargs,
    )
    hidden_states = _joined_hidden_states(prefix, outputs, rows) if output_hidden_states else None
    keyword = cache_keyword(classifier)
    result = SequenceClassifierOutputWithPast(
        loss=outputs.loss, logits=outputs.logits, hidden_states=hidden_states, **{keyword: getattr(outputs, keyword)}
    )
    return result if return_dict is not False else result.to_tuple()
