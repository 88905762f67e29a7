"""Residual prompt tuning: the prompt encoder and its reparameterisation MLP."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..base import TransferPromptEncoder, initial_prompt, load_module_state
from .config import ResidualPromptConfig

_ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "tanh": torch.tanh,
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
    "identity": lambda x: x,
}
_STATE_PREFIX = "reparameterization."
RAW_PROMPT_KEY = "raw_prompt_embeddings"


class ResidualMLP(nn.Module):
    """
    The bottleneck MLP `x -> s * LayerNorm(W_up act(W_down x + b_down) + b_up)` with an optional skip connection.

    `s` is `output_scale`, a fixed buffer (1 in the paper's branch, where it is not stored).

    With `num_mlps == 1` one MLP is shared by all prompt tokens; with `num_mlps == num_tokens` each token has
    its own MLP. Both run as one batched matrix product (instead of the paper code's list of per-token
    modules), so a per-token MLP costs one kernel launch, not `num_tokens`.

    Args:
        num_mlps (`int`): 1 (shared) or the number of prompt tokens (one MLP per token).
        token_dim (`int`): Width of the prompt embeddings.
        bottleneck_size (`int`): Width of the hidden layer.
        activation (`str`): Key of the activation function.
        layer_norm (`bool`): LayerNorm over the branch output, before the skip add.
        dropout (`float`): Dropout probability after the activation.
        residual (`bool`): Whether to add the input to the branch output.
        output_scale (`float`, *optional*): The fixed factor `s` of the LayerNorm's output (after its gain and
            bias); None for the paper's branch (`s = 1`).
    """

    def __init__(
        self,
        num_mlps: int,
        token_dim: int,
        bottleneck_size: int,
        activation: str,
        layer_norm: bool,
        dropout: float,
        residual: bool,
        output_scale: Optional[float] = None,
    ):
        super().__init__()
        self.num_mlps = num_mlps
        self.activation = activation
        self.dropout = dropout
        self.residual = residual
        self.down_weight = nn.Parameter(torch.empty(num_mlps, token_dim, bottleneck_size))
        self.down_bias = nn.Parameter(torch.empty(num_mlps, 1, bottleneck_size))
        self.up_weight = nn.Parameter(torch.empty(num_mlps, bottleneck_size, token_dim))
        self.up_bias = nn.Parameter(torch.empty(num_mlps, 1, token_dim))
        if layer_norm:
            self.norm_weight = nn.Parameter(torch.ones(num_mlps, 1, token_dim))
            self.norm_bias = nn.Parameter(torch.zeros(num_mlps, 1, token_dim))
        else:
            self.register_parameter("norm_weight", None)
            self.register_parameter("norm_bias", None)
        # a buffer, saved with the MLP, so that a resumed run keeps the scale it started with
        self.register_buffer("output_scale", None if output_scale is None else torch.tensor(float(output_scale)))
        # the initialisation of nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases
        for weight, bias, fan_in in (
            (self.down_weight, self.down_bias, token_dim),
            (self.up_weight, self.up_bias, bottleneck_size),
        ):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(weight, -bound, bound)
            nn.init.uniform_(bias, -bound, bound)

    def forward(self, prompt: torch.Tensor) -> torch.Tensor:
        """Map a `[num_tokens, token_dim]` prompt to the prompt the model sees."""
        num_tokens, token_dim = prompt.shape
        # shared: [1, num_tokens, dim]; per token: [num_tokens, 1, dim]
        x = prompt.reshape(self.num_mlps, -1, token_dim)
        hidden = _ACTIVATIONS[self.activation](torch.baddbmm(self.down_bias, x, self.down_weight))
        hidden = F.dropout(hidden, p=self.dropout, training=self.training)
        branch = torch.baddbmm(self.up_bias, hidden, self.up_weight)
        if self.norm_weight is not None:
            branch = F.layer_norm(branch, (token_dim,)) * self.norm_weight + self.norm_bias
            if self.output_scale is not None:
                branch = branch * self.output_scale
        out = branch + x if self.residual else branch
        return out.reshape(num_tokens, token_dim)


@torch.no_grad()
def embedding_rms(word_embeddings: nn.Module) -> float:
    """The root mean square entry `sqrt(mean(W^2))` of the word embeddings: a vocabulary token's norm is about
    `rms * sqrt(token_dim)`."""
    return word_embeddings.weight.detach().float().pow(2).mean().sqrt().item()


class ResidualPromptEncoder(TransferPromptEncoder):
    """
    The prompt encoder of residual prompt tuning.

    In training mode (`config.inference_mode=False`) it holds the raw prompt `P` in `embedding` and the MLP in
    `reparameterization`, and returns `MLP(P) + P`. In inference mode it holds only the folded prompt in
    `embedding` and returns it unchanged, at the cost of plain prompt tuning.

    Args:
        config ([`ResidualPromptConfig`]): The configuration.
        word_embeddings (`torch.nn.Module`): The base model's word embeddings (for prompt initialisation).

    Example:

    ```py
    >>> import peft_prompt_transfer
    >>> from peft import get_peft_model
    >>> config = peft_prompt_transfer.ResidualPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=10)
    >>> model = get_peft_model(base_model, config)
    ```

    Input: `batch_size` (and no `task_ids`). Output shape: `(batch_size, num_virtual_tokens, token_dim)`.
    """

    def __init__(self, config: ResidualPromptConfig, word_embeddings: nn.Module):
        super().__init__(config, word_embeddings)
        num_tokens = config.num_virtual_tokens
        self.embedding = nn.Embedding(num_tokens, config.token_dim)
        self.reparameterization: Optional[ResidualMLP] = None
        if not config.inference_mode:
            with torch.no_grad():
                self.embedding.weight.copy_(initial_prompt(config, word_embeddings, num_tokens))
            self.reparameterization = ResidualMLP(
                num_mlps=1 if config.shared_mlp else num_tokens,
                token_dim=config.token_dim,
                bottleneck_size=config.bottleneck_size,
                activation=config.activation,
                layer_norm=config.layer_norm,
                dropout=config.dropout,
                residual=config.residual,
                output_scale=embedding_rms(word_embeddings) if config.branch_scale == "embedding_rms" else None,
            )

    def _prompt(self) -> torch.Tensor:
        if self.reparameterization is None:
            return self.embedding.weight
        return self.reparameterization(self.embedding.weight)

    def forward(self, batch_size: int, task_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        # computed once per batch and broadcast, not once per example
        return self._single_prompt(task_ids).unsqueeze(0).expand(batch_size, -1, -1)

    def distinct_prompts(
        self, batch_size: int, task_ids: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        prompt = self._single_prompt(task_ids).unsqueeze(0)
        return prompt, torch.zeros(batch_size, dtype=torch.long, device=prompt.device)

    def num_distinct_prompts(self, batch_size: int, task_ids: Optional[torch.Tensor] = None) -> int:
        return 1

    def _single_prompt(self, task_ids: Optional[torch.Tensor]) -> torch.Tensor:
        if task_ids is not None:
            raise ValueError(
                "RESIDUAL_PROMPT_TUNING has a single prompt and takes no task_ids; remove the `task_ids` "
                "argument/column (task_ids are for multi-task methods such as ComPT)."
            )
        return self._prompt()

    @torch.no_grad()
    def inference_prompt(self, task: Optional[Union[int, str]] = None) -> torch.Tensor:
        if task is not None:
            raise ValueError("RESIDUAL_PROMPT_TUNING has a single prompt; call without `task`.")
        if self.reparameterization is None:
            return self.embedding.weight.detach().clone()
        was_training = self.reparameterization.training
        self.reparameterization.eval()  # fold without dropout
        try:
            return self.reparameterization(self.embedding.weight).detach().clone()
        finally:
            self.reparameterization.train(was_training)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        state = {"prompt_embeddings": self.inference_prompt()}
        if self.reparameterization is not None:
            # the training state, so that resume_from_checkpoint / load_adapter continue exactly
            state[RAW_PROMPT_KEY] = self.embedding.weight.detach().clone()
            for name, tensor in self.reparameterization.state_dict().items():
                state[_STATE_PREFIX + name] = tensor.detach().clone()
        return state

    @torch.no_grad()
    def load_adapter_state(self, state_dict: dict[str, torch.Tensor]) -> None:
        if self.reparameterization is None:
            # inference: the folded prompt is all we need; any training state is ignored
            self.embedding.weight.copy_(state_dict["prompt_embeddings"])
            return
        if RAW_PROMPT_KEY not in state_dict:
            raise ValueError(
                "This adapter holds only the folded prompt (it was saved in inference mode or exported), not the "
                "raw prompt and MLP that training needs. Load it for inference (is_trainable=False), or train a new "
                "adapter from it, e.g. as peft PROMPT_TUNING."
            )
        mlp_state = {k[len(_STATE_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(_STATE_PREFIX)}
        expected = {k: tuple(v.shape) for k, v in self.reparameterization.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in mlp_state.items()}
        if found != expected:
            raise ValueError(
                f"The saved reparameterisation MLP does not match this config: saved {found}, expected {expected}. "
                "Load the adapter with its own adapter_config.json (bottleneck_size, shared_mlp, layer_norm and "
                "branch_scale must match)."
            )
        self.embedding.weight.copy_(state_dict[RAW_PROMPT_KEY])
        load_module_state(self.reparameterization, mlp_state)
