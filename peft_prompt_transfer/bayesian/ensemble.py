"""Ensemble prediction with a posterior: the particles' average prediction and its uncertainty, in one batched
forward pass."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .config import BAYESIAN_PROMPT_TUNING
from .model import BayesianPromptEncoder
from .particles import expand_for_particles


@dataclass
class EnsemblePrediction:
    """
    The posterior predictive of a source-stage model: its M particles' predictions and their average.

    For classification the distribution is over labels; for causal LMs it is the next-token distribution after the
    last non-padding token of each row; for seq2seq LMs it is the next decoder token after `decoder_input_ids`.

    Attributes:
        probs (`torch.Tensor`): `[batch, classes]`, the average over particles of their predicted distributions.
        particle_probs (`torch.Tensor`): `[batch, M, classes]`, each particle's distribution.
        entropy (`torch.Tensor`): `[batch]`, the predictive entropy `H[probs]` in nats: the total uncertainty.
        mutual_information (`torch.Tensor`): `[batch]`, `H[probs] - mean_m H[particle_probs[:, m]]`: the part of the
            uncertainty that comes from the particles disagreeing (epistemic uncertainty; 0 with one particle).
    """

    probs: torch.Tensor
    particle_probs: torch.Tensor
    entropy: torch.Tensor
    mutual_information: torch.Tensor


def _last_positions(mask: Optional[torch.Tensor], length: int, rows: int, device) -> torch.Tensor:
    """Index of the last non-padding position of each row (left or right padding)."""
    if mask is None:
        return torch.full((rows,), length - 1, device=device)
    return (length - 1) - mask.flip(dims=[1]).argmax(dim=1)


def ensemble_predict(model, inputs: Mapping[str, Any], adapter_name: Optional[str] = None) -> EnsemblePrediction:
    """Average the predictions of a source-stage model's M particles in one batched forward pass.

    The batch is expanded M times ([`expand_for_particles`]) so that particle m predicts every example, under
    `torch.no_grad()`; call `model.eval()` first if the base model has dropout.

    Args:
        model (`PeftModel`): A model whose adapter is a source-stage `BAYESIAN_PROMPT_TUNING` posterior (for
            example `PeftModel.from_pretrained(base, posterior_dir)`), for `SEQ_CLS`, `CAUSAL_LM` or `SEQ_2_SEQ_LM`.
        inputs (`Mapping`): The model inputs (`input_ids`, `attention_mask`, ...); `labels` are ignored. For seq2seq
            models, `decoder_input_ids` default to the decoder start token.
        adapter_name (`str`, *optional*): The adapter; defaults to the active one.

    Returns:
        An [`EnsemblePrediction`].
    """
    adapter_name = adapter_name or model.active_adapter
    config = model.peft_config[adapter_name]
    encoder = model.prompt_encoder[adapter_name] if hasattr(model, "prompt_encoder") else None
    if not isinstance(encoder, BayesianPromptEncoder) or config.stage != "source":
        raise ValueError(
            f"ensemble_predict needs a source-stage {BAYESIAN_PROMPT_TUNING} adapter (a posterior), but adapter "
            f"{adapter_name!r} is {getattr(config, 'peft_type', None)}"
            + (f" of stage {config.stage!r}" if isinstance(encoder, BayesianPromptEncoder) else "")
            + ". Load the posterior with PeftModel.from_pretrained(base_model, posterior_dir)."
        )
    task_type = getattr(config.task_type, "value", config.task_type)
    if task_type not in ("SEQ_CLS", "CAUSAL_LM", "SEQ_2_SEQ_LM"):
        raise ValueError(f"ensemble_predict supports SEQ_CLS, CAUSAL_LM and SEQ_2_SEQ_LM models, not {task_type}.")
    num_particles = encoder.num_particles
    batch = {key: value for key, value in inputs.items() if key != "labels"}
    reference = batch.get("input_ids", batch.get("inputs_embeds"))
    if (
        task_type == "SEQ_2_SEQ_LM"
        and batch.get("decoder_input_ids") is None
        and batch.get("decoder_inputs_embeds") is None
    ):
        start = model.config.decoder_start_token_id
        batch["decoder_input_ids"] = torch.full((reference.shape[0], 1), start, device=reference.device)
    with torch.no_grad(), encoder.one_particle_per_row():
        logits = model(**expand_for_particles(batch, num_particles)).logits
    rows = logits.shape[0]
    if task_type == "CAUSAL_LM":  # logits cover the virtual tokens first, then the input
        mask = batch.get("attention_mask")
        length = reference.shape[1]
        positions = config.num_virtual_tokens + _last_positions(mask, length, reference.shape[0], logits.device)
        logits = logits[torch.arange(rows, device=logits.device), positions.repeat_interleave(num_particles)]
    elif task_type == "SEQ_2_SEQ_LM":
        decoder_mask = batch.get("decoder_attention_mask")
        positions = _last_positions(decoder_mask, logits.shape[1], reference.shape[0], logits.device)
        logits = logits[torch.arange(rows, device=logits.device), positions.repeat_interleave(num_particles)]
    particle_probs = logits.float().softmax(dim=-1).view(-1, num_particles, logits.shape[-1])
    probs = particle_probs.mean(dim=1)
    entropy = torch.special.entr(probs).sum(dim=-1)
    expected_entropy = torch.special.entr(particle_probs).sum(dim=-1).mean(dim=1)
    return EnsemblePrediction(
        probs=probs,
        particle_probs=particle_probs,
        entropy=entropy,
        mutual_information=(entropy - expected_entropy).clamp_min(0.0),
    )
