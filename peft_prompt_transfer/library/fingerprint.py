"""Which base model a prompt library was made for: its embedding shape, name and a fingerprint of its input embeddings.

A soft prompt is a point in one model's embedding space. The shape alone does not tell two checkpoints of one size
apart (SmolLM2-135M and SmolLM2-135M-Instruct share it), so a library also records a sample of the input embedding
matrix: `FINGERPRINT_TOKENS` rows spread over the vocabulary, their first `FINGERPRINT_DIMS` entries. Two models match
when every sampled value agrees within `FINGERPRINT_TOLERANCE` of the sample's RMS: loose enough for the same
checkpoint loaded in bfloat16 or float16 (relative rounding below 0.4%), tight enough for a copy whose training moved
the input embeddings by more. A fine-tune that left the input embeddings alone (frozen embeddings, a merged LoRA on
other modules) has the same fingerprint: the input embeddings are all it reads.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..base import full_tensor

FINGERPRINT_TOKENS = 32
FINGERPRINT_DIMS = 16
FINGERPRINT_TOLERANCE = 0.02


def base_model_of(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a `PeftModel`, or `model` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextmanager
def whole_input_embeddings(model: torch.nn.Module) -> Iterator[torch.Tensor]:
    """The input embedding matrix `[vocab_size, hidden_size]`, whole also when it is sharded: gathered under
    DeepSpeed ZeRO-3 (a collective there, as under FSDP2: every rank must call it)."""
    weight = base_model_of(model).get_input_embeddings().weight
    if weight.device.type == "meta":
        raise ValueError(
            "The model's input embeddings are on the meta device: its weights are not loaded yet (a model built "
            "under init_empty_weights, or before FSDP materialises it). A prompt library reads them: load or "
            "materialise the weights first."
        )
    if hasattr(weight, "ds_shape") and weight.numel() == 0:  # a ZeRO-3 partition
        import deepspeed

        with deepspeed.zero.GatheredParameters(weight):
            yield weight.detach()
    else:
        yield full_tensor(weight.detach())


def describe_base_model(model: torch.nn.Module) -> dict[str, Any]:
    """The record of `model` a library keeps: name, vocabulary and hidden size, and the embedding fingerprint."""
    with whole_input_embeddings(model) as weight:
        vocab_size, hidden_size = weight.shape
        token_ids = torch.linspace(0, vocab_size - 1, min(FINGERPRINT_TOKENS, vocab_size)).round().long()
        sample = weight[token_ids.to(weight.device), : min(FINGERPRINT_DIMS, hidden_size)].float().cpu()
    base = base_model_of(model)
    return {
        "name_or_path": getattr(base, "name_or_path", None) or getattr(base.config, "_name_or_path", None),
        "vocab_size": int(vocab_size),
        "hidden_size": int(hidden_size),
        "fingerprint": {"token_ids": token_ids.tolist(), "values": sample.flatten().tolist()},
    }


def fingerprints_match(recorded: dict[str, Any], found: dict[str, Any]) -> bool:
    """Whether two fingerprints sample the same rows and agree within `FINGERPRINT_TOLERANCE` of the RMS."""
    if recorded["token_ids"] != found["token_ids"] or len(recorded["values"]) != len(found["values"]):
        return False
    expected, actual = torch.tensor(recorded["values"]), torch.tensor(found["values"])
    scale = expected.pow(2).mean().sqrt().clamp_min(1e-12)
    return bool(((expected - actual).abs() <= FINGERPRINT_TOLERANCE * scale).all())


def same_base_model(recorded: dict[str, Any], model: torch.nn.Module) -> bool:
    """Whether `model`'s input embeddings are those of the model `recorded` describes: the same size, vocabulary and
    fingerprint."""
    found = describe_base_model(model)
    return (
        found["hidden_size"] == recorded["hidden_size"]
        and found["vocab_size"] == recorded["vocab_size"]
        and fingerprints_match(recorded["fingerprint"], found["fingerprint"])
    )


def check_base_model(recorded: dict[str, Any], model: torch.nn.Module, what: str) -> None:
    """Refuse a model whose embeddings have another size than the one `what` was made for; warn on another
    vocabulary or fingerprint (a model with added tokens, another checkpoint of the same size)."""
    found = describe_base_model(model)
    made_for = recorded.get("name_or_path") or "an unnamed model"
    if found["hidden_size"] != recorded["hidden_size"]:
        raise ValueError(
            f"{what} was made for {made_for!r}, whose embeddings have hidden size {recorded['hidden_size']}, but this "
            f"model's have {found['hidden_size']}: its prompts cannot be used here. Load {made_for!r} (or the base "
            "model the library's prompts were trained on)."
        )
    if found["vocab_size"] != recorded["vocab_size"]:
        warnings.warn(
            f"{what} was made for {made_for!r}, with a vocabulary of {recorded['vocab_size']} tokens, but this model "
            f"has {found['vocab_size']}. Unless it is the same model with added tokens, the prompts will not work.",
            stacklevel=3,
        )
    elif not fingerprints_match(recorded["fingerprint"], found["fingerprint"]):
        warnings.warn(
            f"{what} was made for {made_for!r}, and this model's input embeddings differ from that model's: it is "
            "another checkpoint of the same size (one whose training moved the input embeddings), on which the "
            "prompts are not what they were trained to be. Use the model the library was made for.",
            stacklevel=3,
        )
