"""Bayesian multi-task prompt transfer (Lee et al., 2024): an SVGD posterior over prompts from several source
tasks, and target prompts that start from it."""

from .config import BAYESIAN_PROMPT_TUNING, BayesianPromptConfig
from .decomposition import anchor_gradients, initial_task_factors
from .ensemble import EnsemblePrediction, ensemble_predict
from .model import BayesianPromptEncoder
from .optim import bayesian_parameter_groups
from .particles import ParticleReplicationCollator, assign_particles, expand_for_particles
from .posterior import Posterior, load_posterior
from .step_transform import register_pre_step_gradient_transform
from .svgd import median_bandwidth, rbf_kernel, stein_direction, svgd_gradient

__all__ = [
    "BAYESIAN_PROMPT_TUNING",
    "BayesianPromptConfig",
    "BayesianPromptEncoder",
    "EnsemblePrediction",
    "ParticleReplicationCollator",
    "Posterior",
    "anchor_gradients",
    "assign_particles",
    "bayesian_parameter_groups",
    "ensemble_predict",
    "expand_for_particles",
    "initial_task_factors",
    "load_posterior",
    "median_bandwidth",
    "rbf_kernel",
    "register_pre_step_gradient_transform",
    "stein_direction",
    "svgd_gradient",
]
