"""The posterior: reading a source-stage adapter's particles and config (from a local directory or the Hub) and
the target prompts that start from it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch
from safetensors.torch import load_file

from ..files import local_or_hub_file
from .config import BAYESIAN_PROMPT_TUNING, BayesianPromptConfig, parse_target_init

PARTICLES_KEY = "particles"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


@dataclass
class Posterior:
    """The particles of a source-stage adapter and its config, as [`load_posterior`] reads them.

    Attributes:
        particles (`torch.Tensor`): `[num_particles, num_virtual_tokens, token_dim]`.
        config (`BayesianPromptConfig`): The source-stage config (`num_particles`, kernel, `source_tasks`, ...).
        location (`str`): Where it was loaded from.
    """

    particles: torch.Tensor
    config: BayesianPromptConfig
    location: str

    def mean(self) -> torch.Tensor:
        """The posterior mean prompt `[num_virtual_tokens, token_dim]`: the average of the particles."""
        return self.particles.mean(dim=0)

    def initial_prompt(self, target_init: str, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """A target prompt `[num_virtual_tokens, token_dim]` as `target_init` says.

        `"mean"`: the posterior mean. `"particle:<k>"`: particle k. `"particle:random"`: a particle drawn uniformly
        (SVGD's particles are its samples of the posterior). `"sample"`: a draw from the Gaussian with the particles'
        mean and per-entry variance (zero variance with one particle). The draws use `generator` (default: torch's
        global random generator).
        """
        kind, index = parse_target_init(target_init)
        if kind == "mean":
            return self.mean()
        num_particles = self.particles.shape[0]
        if kind == "particle":
            if index is None:
                index = int(torch.randint(num_particles, (), generator=generator))
            if index >= num_particles:
                raise ValueError(
                    f"target_init={target_init!r}, but the posterior {self.location!r} has {num_particles} particles "
                    f"(indices 0..{num_particles - 1}). Choose one of them, or 'mean' or 'sample'."
                )
            return self.particles[index].clone()
        std = self.particles.std(dim=0) if num_particles > 1 else torch.zeros_like(self.particles[0])
        return self.mean() + std * torch.randn(std.shape, dtype=std.dtype, generator=generator)


def _posterior_file(posterior: str, revision: Optional[str], filename: str) -> str:
    return local_or_hub_file(
        posterior,
        filename,
        revision,
        "posterior",
        "Save the source-stage model there with model.save_pretrained(directory), or point "
        "BayesianPromptConfig(posterior=...) at the directory or Hub repo id that holds its adapter_config.json and "
        "adapter_model.safetensors",
    )


def load_posterior(posterior: Union[str, os.PathLike], revision: Optional[str] = None) -> Posterior:
    """Read the particles and config of a source-stage adapter from a local directory or a Hub repo id.

    Only safetensors is read (never pickle). Raises `FileNotFoundError` naming what was tried when the posterior
    cannot be found, and `ValueError` when the files are not a source-stage posterior or do not agree (a particles
    tensor whose shape is not the config's `[num_particles, num_virtual_tokens, token_dim]`).
    """
    posterior = os.fspath(posterior)
    with open(_posterior_file(posterior, revision, ADAPTER_CONFIG_NAME), encoding="utf-8") as f:
        config_dict = json.load(f)
    peft_type, stage = config_dict.get("peft_type"), config_dict.get("stage")
    if peft_type != BAYESIAN_PROMPT_TUNING or stage != "source":
        found = f"a {peft_type} adapter" + (f" of stage {stage!r}" if stage else "")
        raise ValueError(
            f"The posterior {posterior!r} holds {found}, not a source-stage {BAYESIAN_PROMPT_TUNING} posterior. Point "
            "posterior at a model trained and saved with BayesianPromptConfig(stage='source')."
        )
    fields = BayesianPromptConfig.__dataclass_fields__
    config = BayesianPromptConfig(**{key: value for key, value in config_dict.items() if key in fields})
    weights = load_file(_posterior_file(posterior, revision, ADAPTER_WEIGHTS_NAME))
    if PARTICLES_KEY not in weights:
        raise ValueError(
            f"The posterior {posterior!r} has no {PARTICLES_KEY!r} tensor in {ADAPTER_WEIGHTS_NAME} (found "
            f"{sorted(weights)[:8]}); the file is damaged or was not written by a source-stage model. Save the "
            "source-stage model again with model.save_pretrained(directory)."
        )
    particles = weights[PARTICLES_KEY]
    expected = (config.num_particles, config.num_virtual_tokens, config.token_dim)
    if tuple(particles.shape) != expected:
        raise ValueError(
            f"The posterior {posterior!r} holds particles of shape {list(particles.shape)}, but its "
            f"{ADAPTER_CONFIG_NAME} describes {list(expected)} (num_particles, num_virtual_tokens, token_dim): the "
            "weights and the config do not belong together. Save the source-stage model again with "
            "model.save_pretrained(directory)."
        )
    return Posterior(particles=particles.float(), config=config, location=posterior)
