"""Residual prompt tuning (Razdaibiedina et al., 2023): an MLP with a skip connection over the soft prompt."""

from .config import RESIDUAL_PROMPT_TUNING, ResidualPromptConfig
from .model import ResidualMLP, ResidualPromptEncoder

__all__ = ["RESIDUAL_PROMPT_TUNING", "ResidualMLP", "ResidualPromptConfig", "ResidualPromptEncoder"]
