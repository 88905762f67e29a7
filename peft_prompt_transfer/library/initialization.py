"""Starting a model's prompt from library entries: fitting an entry to the prompt length, combining several, and
writing the result where each method keeps the prompt it trains."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from peft import PeftModel

from .._compat import enum_value
from ..base import gathered_parameters
from ..bayesian.decomposition import initial_task_factors
from .reading import BOTH_STACKS


def fit_length(prompt: torch.Tensor, num_virtual_tokens: int) -> torch.Tensor:
    """`prompt` cut or tiled to `num_virtual_tokens` tokens, as peft's TEXT initialisation fits its text: a longer
    prompt keeps its first tokens, a shorter one is repeated and cut."""
    length = prompt.shape[0]
    if length >= num_virtual_tokens:
        return prompt[:num_virtual_tokens]
    return prompt.repeat(math.ceil(num_virtual_tokens / length), 1)[:num_virtual_tokens]


def warn_on_length(names_and_lengths: dict[str, int], length: int) -> None:
    """Warn, once per call, about entries whose length is not the adapter's prompt length and will be cut or tiled."""
    other = {name: tokens for name, tokens in names_and_lengths.items() if tokens != length}
    if other:
        warnings.warn(
            f"The adapter's prompts have {length} tokens, but {other} (entry: tokens) do not: they are cut to their "
            "first tokens or repeated and cut, as peft's TEXT initialisation fits a text. Give the adapter prompts of "
            "the entries' length (num_virtual_tokens; for ComPT with composition='concat', twice it) to use them "
            "whole.",
            stacklevel=3,
        )


def mean_prompt(prompts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean of `prompts`, scaled so that its mean token norm is the prompts' mean token norm: averaging
    prompts that point different ways shortens the mean, and a prompt far shorter than the tokens the model reads is
    a weak start (on SmolLM2 the SVGD particles' mean was half a token long)."""
    stacked = torch.stack(list(prompts))
    mean = stacked.mean(0)
    target = stacked.norm(dim=-1).mean()
    return mean * (target / mean.norm(dim=-1).mean().clamp_min(torch.finfo(mean.dtype).tiny))


def _kind(model: PeftModel, adapter_name: str) -> str:
    return enum_value(model.peft_config[adapter_name].peft_type)


def prompt_length(model: PeftModel, adapter_name: str) -> int:
    """How many tokens each prompt that `write_prompts` writes has: the adapter's `num_virtual_tokens`, or for ComPT
    its source prompts' length (half of it with `composition="concat"`)."""
    config = model.peft_config[adapter_name]
    return config.prompt_length if _kind(model, adapter_name) == "COMPT" else config.num_virtual_tokens


def one_prompt_per_entry(model: PeftModel, adapter_name: str) -> bool:
    """Whether the adapter starts from several entries, one each (ComPT's source prompts, a Bayesian source's
    particles), rather than from one prompt (an entry, or several entries' mean)."""
    config = model.peft_config[adapter_name]
    kind = _kind(model, adapter_name)
    return kind == "COMPT" or (kind == "BAYESIAN_PROMPT_TUNING" and config.stage == "source")


@torch.no_grad()
def write_prompts(model: PeftModel, adapter_name: str, prompts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Write `prompts` (each `[prompt_length, token_dim]`, already fitted) where the adapter keeps its trainable
    prompt.

    One prompt: peft `PROMPT_TUNING` (exactly the prompt the model sees), residual (the MLP's input, as the paper
    initialises it: the model sees `MLP(P) + P`) and a Bayesian target (its prompt; a decomposed target's `S`, with
    `U V` reset to all ones so that the prompt is `S`). One per entry (`one_prompt_per_entry`): ComPT's first source
    prompts, a Bayesian source's particles. Sharded (FSDP2) prompts are written whole. Returns what was written, in
    the adapter's dtype, on the CPU."""
    with gathered_parameters(model.prompt_encoder[adapter_name]):
        written = _write_whole_prompts(model, adapter_name, prompts)
    return [prompt.to("cpu", copy=True) for prompt in written]


def _write_whole_prompts(model: PeftModel, adapter_name: str, prompts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    config = model.peft_config[adapter_name]
    kind = _kind(model, adapter_name)
    encoder = model.prompt_encoder[adapter_name]
    weight = encoder.embedding.weight
    prompts = [prompt.to(device=weight.device, dtype=weight.dtype) for prompt in prompts]
    if kind == "COMPT":
        if config.num_frozen_tasks:
            raise ValueError(
                "This ComPT adapter was extended with add_tasks, which freezes its source prompts so that the earlier "
                "tasks' prompts do not change; initialize a new ComPT adapter instead."
            )
        if len(prompts) > config.num_source_prompts:
            raise ValueError(
                f"{len(prompts)} entries for a ComPT adapter with num_source_prompts={config.num_source_prompts}: each "
                "entry becomes one source prompt. Pass at most that many, or build the adapter with more source prompts."
            )
        sources = weight.view(config.num_source_prompts, config.prompt_length, config.token_dim)
        for index, prompt in enumerate(prompts):
            sources[index].copy_(prompt)
    elif kind == "BAYESIAN_PROMPT_TUNING" and config.stage == "source":
        if len(prompts) != config.num_particles:
            raise ValueError(
                f"{len(prompts)} entries for a Bayesian source with num_particles={config.num_particles}: each particle "
                "starts from one entry. Pass as many entries as particles."
            )
        weight.copy_(torch.stack(prompts))
    elif kind in ("PROMPT_TUNING", "RESIDUAL_PROMPT_TUNING", "BAYESIAN_PROMPT_TUNING"):
        if kind == "PROMPT_TUNING" and (config.num_transformer_submodules or 1) != 1:
            raise ValueError(
                f"This PROMPT_TUNING adapter {BOTH_STACKS.format(config.num_transformer_submodules)}. Build it with "
                "PromptTuningConfig(..., num_transformer_submodules=1)."
            )
        (prompt,) = prompts
        weight.copy_(prompt)
        if getattr(encoder, "task_cols", None) is not None:  # a decomposed target: U V back to ones, so P = S
            cols, rows = initial_task_factors(config.num_virtual_tokens, config.token_dim, config.decomposition_rank)
            encoder.task_cols.copy_(cols)
            encoder.task_rows.copy_(rows)
    else:
        raise ValueError(
            f"initialize writes a prompt the adapter trains directly; a {kind} adapter makes its prompt another way. "
            "Use peft PROMPT_TUNING or one of this package's methods."
        )
    return prompts
