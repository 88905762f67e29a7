"""Cached `generate` against uncached `generate` and a step-by-step greedy reference, for every method.

transformers 5.24 renamed the KV cache's keyword (`past_key_values` -> `cache`), and peft 0.21 then prepended
the prompt again at every decoding step: cached generation returned wrong tokens, silently, while uncached
generation stayed right. These tests compare the two (and a greedy loop of full forward passes, which uses no
cache at all) for every method of the package on GPT-2-, Llama-, Qwen2- and OPT-style decoders and on T5 and
BART, with padded and equal-length batches, beam search, and more new tokens than the prompt and the input hold.
"""

from __future__ import annotations

import pytest
import torch
from conftest import GENERATIVE_MODELS, greedy_reference, make_batch
from peft import get_peft_model

from peft_prompt_transfer import BayesianPromptConfig, ComPTConfig, ResidualPromptConfig

N_TOKENS = 4
SEQ_LEN = 6
# past both the prompt (4 virtual tokens) and the input (6 tokens): the cache grows well beyond what prefill wrote
NEW_TOKENS = 12
TASK_IDS = (1, 0, 2, 1)
METHODS = ("residual", "compt", "bayesian_source", "bayesian_target")


def method_config(method: str, task_type: str, tmp_path) -> object:
    common = dict(task_type=task_type, num_virtual_tokens=N_TOKENS)
    if method == "residual":
        return ResidualPromptConfig(**common, bottleneck_size=16)
    if method == "compt":
        return ComPTConfig(**common, task_names=["alpha", "beta", "gamma"], num_source_prompts=3)
    if method == "bayesian_source":
        return BayesianPromptConfig(**common, num_particles=3)
    return BayesianPromptConfig(**common, stage="target", posterior=str(tmp_path / "posterior"))


def peft_model(method: str, name: str, tmp_path):
    tiny = GENERATIVE_MODELS[name]
    if method == "bayesian_target":  # a target starts from a saved source-stage posterior
        torch.manual_seed(1)
        get_peft_model(tiny.build(), method_config("bayesian_source", tiny.task_type, tmp_path)).save_pretrained(
            tmp_path / "posterior"
        )
    torch.manual_seed(0)
    return get_peft_model(tiny.build(), method_config(method, tiny.task_type, tmp_path)).eval()


def generation_batch(name: str, method: str, padded: bool) -> dict:
    tiny = GENERATIVE_MODELS[name]
    batch = make_batch(tiny, batch_size=len(TASK_IDS), seq_len=SEQ_LEN, seed=2)
    del batch["labels"]
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    if padded:  # decoders are padded on the left, encoders on the right
        batch["attention_mask"][0, slice(None, 2) if tiny.kind == "causal" else slice(-2, None)] = 0
    if method == "compt":
        batch["task_ids"] = torch.tensor(TASK_IDS)
    return batch


def generated_tokens(model, batch: dict, **generate_kwargs) -> torch.Tensor:
    """The new tokens `generate` returns (peft's causal LMs return the input too; seq2seq the start token)."""
    with torch.no_grad():
        out = model.generate(
            **batch,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
            **generate_kwargs,
        )
    return out[:, 1:] if model.config.is_encoder_decoder else out[:, batch["input_ids"].shape[1] :]


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "equal_length"])
@pytest.mark.parametrize("name", sorted(GENERATIVE_MODELS))
@pytest.mark.parametrize("method", METHODS)
def test_cached_greedy_generate_matches_a_step_by_step_reference(method, name, padded, tmp_path):
    model = peft_model(method, name, tmp_path)
    batch = generation_batch(name, method, padded)
    reference = greedy_reference(
        model, batch, NEW_TOKENS, **({"task_ids": batch["task_ids"]} if method == "compt" else {})
    )
    cached = generated_tokens(model, batch, use_cache=True)
    uncached = generated_tokens(model, batch, use_cache=False)
    assert torch.equal(uncached, reference)
    assert torch.equal(cached, reference)
    # the prompt decides the output: the base model alone continues differently
    plain = {key: value for key, value in batch.items() if key != "task_ids"}
    with torch.no_grad():
        base_output = model.get_base_model().generate(
            **plain, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
        )
    base_tokens = base_output[:, 1:] if model.config.is_encoder_decoder else base_output[:, SEQ_LEN:]
    assert not torch.equal(base_tokens, cached)


@pytest.mark.parametrize("name", sorted(GENERATIVE_MODELS))
@pytest.mark.parametrize("method", METHODS)
def test_cached_beam_search_matches_uncached(method, name, tmp_path):
    model = peft_model(method, name, tmp_path)
    batch = generation_batch(name, method, padded=True)
    beams = dict(num_beams=3, num_return_sequences=2, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        cached = model.generate(
            **batch,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
            use_cache=True,
            **beams,
        )
        uncached = model.generate(
            **batch,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
            use_cache=False,
            **beams,
        )
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(GENERATIVE_MODELS))
def test_each_decoding_step_feeds_one_new_token(name, tmp_path):
    """Prefill runs the prompt and the input once; every later step gives the decoder exactly one token."""
    model = peft_model("residual", name, tmp_path)
    batch = generation_batch(name, "residual", padded=False)
    decoder = model.get_base_model()
    if model.config.is_encoder_decoder:
        decoder = decoder.get_decoder()
    lengths = []

    def record(module, args, kwargs):
        tokens = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        lengths.append(tokens.shape[1])

    handle = decoder.register_forward_pre_hook(record, with_kwargs=True)
    try:
        generated_tokens(model, batch, use_cache=True)
    finally:
        handle.remove()
    first = 1 if model.config.is_encoder_decoder else N_TOKENS + SEQ_LEN
    assert lengths == [first] + [1] * (NEW_TOKENS - 1)
