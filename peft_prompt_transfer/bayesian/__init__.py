"""Bayesian multi-task prompt transfer (Lee et al., 2024): an SVGD posterior over prompts from several source
tasks, and target prompts that start from it."""

from .config import BAYESIAN_PROMPT_TUNING, BayesianPromptConfig
from .model import (
    BayesianPromptEncoder,
    EnsemblePrediction,
    ParticleReplicationCollator,
    Posterior,
    assign_particles,
    ensemble_predict,
    expand_for_particles,
    load_posterior,
    register_pre_step_gradient_transform,
)
from .svgd import median_bandwidth, rbf_kernel, stein_direction, svgd_gradient

__all__ = [
    "BAYESIAN_PROMPT_TUNING",
    "BayesianPromptConfig",
    "BayesianPromptEncoder",
    "EnsemblePrediction",
    "ParticleReplicationCollator",
    "Posterior",
    "assign_particles",
    "ensemble_predict",
    "expand_for_particles",
    "load_posterior",
    "median_bandwidth",
    "rbf_kernel",
    "register_pre_step_gradient_transform",
    "stein_direction",
    "svgd_gradient",
]
