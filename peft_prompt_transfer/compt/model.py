"""ComPT: the prompt encoder that composes shared source prompts and private task prompts."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from ..base import TransferPromptEncoder, initial_prompt
from ..multitask import check_task_ids
from ..residual.model import RAW_PROMPT_KEY, ResidualMLP
from .config import ComPTConfig
from .sparsemax import sparsemax

PRIVATE_KEY = "private_prompt_embeddings"
RAW_PRIVATE_KEY = "raw_private_prompt_embeddings"
ROUTER_KEY = "router_logits"
GATE_KEY = "gate_logits"
STEP_KEY = "sampling_step"
_MLP_PREFIX = "reparameterization."


class _TaskTable(nn.Module):
    """Per-task rows, split into frozen rows (buffers, for tasks that must not change) and trainable rows.

    Frozen rows live in a buffer, so no optimizer (weight decay included) can touch them; the two parts are
    concatenated on read.
    """

    def __init__(self, rows: torch.Tensor, num_frozen: int):
        super().__init__()
        self.register_buffer("frozen", rows[:num_frozen].detach().clone())
        self.trainable = nn.Parameter(rows[num_frozen:].detach().clone())

    @property
    def num_rows(self) -> int:
        return self.frozen.shape[0] + self.trainable.shape[0]

    def value(self) -> torch.Tensor:
        if self.frozen.shape[0] == 0:
            return self.trainable
        return torch.cat([self.frozen, self.trainable], dim=0)

    @torch.no_grad()
    def assign(self, rows: torch.Tensor) -> None:
        num_frozen = self.frozen.shape[0]
        self.frozen.copy_(rows[:num_frozen])
        self.trainable.copy_(rows[num_frozen:])


class ComPTEncoder(TransferPromptEncoder):
    """
    The prompt encoder of ComPT.

    It holds the source prompts in `embedding` (`[num_source_prompts * prompt_length, token_dim]`), the private
    prompts, the router logits (`[num_tasks, num_source_prompts]`) and the gate logits (`[num_tasks, 2]`), and
    composes one prompt per task; `forward(batch_size, task_ids)` returns each example's task prompt, so a batch
    may mix tasks. With `prompt_mlp_bottleneck_size` the source and private prompts pass through a shared MLP while
    training; in inference mode the encoder holds the folded prompts and builds no MLP.

    Args:
        config ([`ComPTConfig`]): The configuration.
        word_embeddings (`torch.nn.Module`): The base model's word embeddings (for prompt initialisation).

    Example:

    ```py
    >>> import peft_prompt_transfer
    >>> from peft import get_peft_model
    >>> config = peft_prompt_transfer.ComPTConfig(
    ...     task_type="SEQ_2_SEQ_LM", task_names=["rte", "mrpc"], num_source_prompts=4, num_virtual_tokens=10
    ... )
    >>> model = get_peft_model(base_model, config)
    >>> model(input_ids=..., attention_mask=..., labels=..., task_ids=torch.tensor([0, 1, 1, 0]))
    ```

    Input: `batch_size` and `task_ids` (`LongTensor [batch_size]`). Output shape:
    `(batch_size, num_virtual_tokens, token_dim)`.
    """

    def __init__(self, config: ComPTConfig, word_embeddings: nn.Module):
        super().__init__(config, word_embeddings)
        length, hidden = config.prompt_length, config.token_dim
        num_sources, num_tasks, num_frozen = config.num_source_prompts, config.num_tasks, config.num_frozen_tasks
        training = not config.inference_mode
        self.embedding = nn.Embedding(num_sources * length, hidden)
        if training:
            with torch.no_grad():
                self.embedding.weight.copy_(initial_prompt(config, word_embeddings, num_sources * length))
        self.private: Optional[_TaskTable] = None
        if config.private_prompt:
            rows = (
                initial_prompt(config, word_embeddings, num_tasks * length)
                if training
                else torch.zeros(num_tasks * length, hidden)
            )
            self.private = _TaskTable(rows.view(num_tasks, length, hidden), num_frozen)
        # zero logits: every source starts equally weighted; zero gate logits: alpha = beta = 0.5
        self.router = _TaskTable(torch.zeros(num_tasks, num_sources), num_frozen)
        self.gates = _TaskTable(torch.zeros(num_tasks, 2), num_frozen) if config.learn_gates else None
        self.reparameterization: Optional[ResidualMLP] = None
        if training and config.prompt_mlp_bottleneck_size is not None:
            self.reparameterization = ResidualMLP(
                num_mlps=1,
                token_dim=hidden,
                bottleneck_size=config.prompt_mlp_bottleneck_size,
                activation="relu",
                layer_norm=True,
                dropout=0.0,
                residual=config.prompt_mlp_residual,
            )
        self.register_buffer("sampling_step", torch.zeros((), dtype=torch.long))
        # the task that calls without task_ids use (set_active_task); None: task_ids are required
        self.active_task: Optional[int] = None
        if num_frozen:
            # adding tasks: the shared parts must not move, or the frozen tasks' prompts would change
            self.embedding.weight.requires_grad_(False)
            if self.reparameterization is not None:
                self.reparameterization.requires_grad_(False)

    # -- composition ---------------------------------------------------------------------------

    def _fold(self, prompts: torch.Tensor) -> torch.Tensor:
        if self.reparameterization is None:
            return prompts
        return self.reparameterization(prompts.reshape(-1, prompts.shape[-1])).view_as(prompts)

    def source_prompts(self) -> torch.Tensor:
        """`[num_source_prompts, prompt_length, token_dim]`, after the MLP if there is one."""
        cfg = self.config
        return self._fold(self.embedding.weight.view(cfg.num_source_prompts, cfg.prompt_length, cfg.token_dim))

    def private_prompts(self) -> Optional[torch.Tensor]:
        """`[num_tasks, prompt_length, token_dim]`, after the MLP if there is one (None without private prompts)."""
        return None if self.private is None else self._fold(self.private.value())

    def temperature(self) -> float:
        """The current relaxed-Bernoulli sampling temperature."""
        cfg = self.config
        annealed = cfg.bernoulli_temperature * math.exp(-cfg.bernoulli_anneal_rate * int(self.sampling_step))
        return max(cfg.bernoulli_min_temperature, annealed)

    def source_weights(self, sample: bool = False) -> torch.Tensor:
        """Normalised source weights `[num_tasks, num_source_prompts]`, before gating.

        With `sample=True` the router logits get logistic noise and are divided by the annealed temperature
        (a relaxed Bernoulli sample for `sigmoid`, its softmax / sparsemax analogue otherwise).
        """
        cfg = self.config
        logits = self.router.value()
        if sample:
            uniform = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
            logits = (logits + torch.log(uniform) - torch.log1p(-uniform)) / self.temperature()
        keep = None
        if cfg.top_k is not None and cfg.top_k < cfg.num_source_prompts:
            keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, logits.topk(cfg.top_k, dim=-1).indices, True)
        if cfg.normalization == "sigmoid":
            weights = torch.sigmoid(logits)
            return weights if keep is None else weights * keep
        if keep is not None:
            logits = logits.masked_fill(~keep, float("-inf"))
        return torch.softmax(logits, dim=-1) if cfg.normalization == "softmax" else sparsemax(logits)

    def gate_values(self) -> torch.Tensor:
        """`[num_tasks, 2]`: the shared gate alpha_t and the private gate beta_t of each task."""
        if self.gates is None:
            return self.router.value().new_ones(self.config.num_tasks, 2)
        return torch.sigmoid(self.gates.value())

    @torch.no_grad()
    def routing_weights(self) -> torch.Tensor:
        """The tasks x sources matrix `alpha_t * w_tj` the model uses at evaluation (no sampling)."""
        return (self.gate_values()[:, :1] * self.source_weights(sample=False)).detach().cpu()

    def task_prompts(self) -> torch.Tensor:
        """The composed prompt of every task, `[num_tasks, num_virtual_tokens, token_dim]`."""
        sample = self.training and self.config.relaxed_bernoulli
        if sample:
            self.sampling_step += 1
        gates = self.gate_values()  # [num_tasks, 2]: alpha (shared), beta (private)
        weights = self.source_weights(sample=sample) * gates[:, :1]
        sources = self.source_prompts()
        # an explicit sum over sources: each task's prompt is computed by the same operations whatever the number
        # of tasks, so adding a task leaves the existing tasks' prompts bit-for-bit unchanged
        shared = sum(weights[:, j, None, None] * sources[j] for j in range(sources.shape[0]))
        private = self.private_prompts()
        if private is None:
            return shared
        private = gates[:, 1, None, None] * private
        if self.config.composition == "concat":
            return torch.cat([shared, private], dim=1)
        return shared + private

    def forward(self, batch_size: int, task_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if task_ids is None and self.active_task is not None:
            task_ids = torch.full((batch_size,), self.active_task, dtype=torch.long)
        task_ids = check_task_ids(task_ids, batch_size, self.config.num_tasks, "COMPT")
        # index_select, not fancy indexing: its backward is deterministic on CPU (same gradients every run)
        return self.task_prompts().index_select(0, task_ids.to(self.embedding.weight.device))

    @torch.no_grad()
    def inference_prompt(self, task: Optional[Union[int, str]] = None) -> torch.Tensor:
        cfg = self.config
        if task is None:
            raise ValueError(
                f"ComPT has one prompt per task; pass task= one of {cfg.task_names or list(range(cfg.num_tasks))}."
            )
        index = cfg.task_index(task)
        was_training = self.training
        self.eval()  # deterministic weights, no dropout
        try:
            return self.task_prompts()[index].detach().clone()
        finally:
            self.train(was_training)

    # -- save / load ---------------------------------------------------------------------------

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        hidden = self.config.token_dim
        with torch.no_grad():
            state = {"prompt_embeddings": self.source_prompts().reshape(-1, hidden).detach().clone()}
            if self.private is not None:
                state[PRIVATE_KEY] = self.private_prompts().reshape(-1, hidden).detach().clone()
            state[ROUTER_KEY] = self.router.value().detach().clone()
            if self.gates is not None:
                state[GATE_KEY] = self.gates.value().detach().clone()
            state[STEP_KEY] = self.sampling_step.detach().clone().reshape(1)
            if self.reparameterization is not None:
                # training state: the raw prompts and the MLP, for exact resumption
                state[RAW_PROMPT_KEY] = self.embedding.weight.detach().clone()
                if self.private is not None:
                    state[RAW_PRIVATE_KEY] = self.private.value().reshape(-1, hidden).detach().clone()
                for name, tensor in self.reparameterization.state_dict().items():
                    state[_MLP_PREFIX + name] = tensor.detach().clone()
        return state

    def _expected_shapes(self) -> dict[str, tuple]:
        cfg = self.config
        rows = cfg.num_source_prompts * cfg.prompt_length
        shapes = {"prompt_embeddings": (rows, cfg.token_dim), ROUTER_KEY: (cfg.num_tasks, cfg.num_source_prompts)}
        if self.private is not None:
            shapes[PRIVATE_KEY] = (cfg.num_tasks * cfg.prompt_length, cfg.token_dim)
        if self.gates is not None:
            shapes[GATE_KEY] = (cfg.num_tasks, 2)
        return shapes

    def check_adapter_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        cfg = self.config
        for key, expected in self._expected_shapes().items():
            if key not in state_dict:
                raise ValueError(
                    f"The ComPT adapter weights have no {key!r} entry (found {sorted(state_dict)}): the file is not a "
                    "ComPT adapter for this config, or it is damaged. Save it again with model.save_pretrained()."
                )
            found = tuple(state_dict[key].shape)
            if found != expected:
                raise ValueError(
                    f"{key!r} has shape {found} but this ComPT config expects {expected} (num_tasks={cfg.num_tasks}, "
                    f"num_source_prompts={cfg.num_source_prompts}, prompt_length={cfg.prompt_length}, "
                    f"token_dim={cfg.token_dim}). Load the adapter with its own adapter_config.json onto the base "
                    "model it was trained on."
                )

    @torch.no_grad()
    def load_adapter_state(self, state_dict: dict[str, torch.Tensor]) -> None:
        cfg = self.config
        self.router.assign(state_dict[ROUTER_KEY])
        if self.gates is not None:
            self.gates.assign(state_dict[GATE_KEY])
        if STEP_KEY in state_dict:
            self.sampling_step.copy_(state_dict[STEP_KEY].reshape(()))
        sources, private = state_dict["prompt_embeddings"], state_dict.get(PRIVATE_KEY)
        if self.reparameterization is not None:
            if RAW_PROMPT_KEY not in state_dict:
                raise ValueError(
                    "This ComPT adapter holds only the folded prompts (it was saved in inference mode or exported), "
                    "not the raw prompts and MLP that training needs. Load it for inference (is_trainable=False)."
                )
            mlp_state = {k[len(_MLP_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(_MLP_PREFIX)}
            self.reparameterization.load_state_dict(mlp_state, strict=True)
            sources, private = state_dict[RAW_PROMPT_KEY], state_dict.get(RAW_PRIVATE_KEY)
        self.embedding.weight.copy_(sources)
        if self.private is not None:
            self.private.assign(private.view(cfg.num_tasks, cfg.prompt_length, cfg.token_dim))


class _ActiveTask:
    """What `set_active_task` returns: as a context manager, it restores the previous task on exit."""

    def __init__(self, encoder: ComPTEncoder, previous: Optional[int]):
        self.encoder, self.previous = encoder, previous

    def __enter__(self) -> ComPTEncoder:
        return self.encoder

    def __exit__(self, *exc_info) -> None:
        self.encoder.active_task = self.previous


def set_active_task(model, task: Optional[Union[int, str]], adapter_name: Optional[str] = None) -> _ActiveTask:
    """
    Make calls without `task_ids` use one task of a ComPT adapter.

    Pipelines (`pipeline("text-classification" | "text-generation", model=model)`) and other callers that do not
    know `task_ids` then run that task; calls that pass `task_ids` still route each example by its own id. Use it
    as a plain call (the task stays active until the next call; `task=None` requires `task_ids` again) or as a
    context manager, which restores the previous setting on exit.

    Args:
        model (`PeftModel`): A model with a ComPT adapter.
        task (`int` or `str`, *optional*): A name from the config's `task_names` or a task id; `None` clears it.
        adapter_name (`str`, *optional*): The ComPT adapter; defaults to the active adapter.

    Example:

    ```py
    >>> ppt.set_active_task(model, "sst2")
    >>> pipeline("text-classification", model=model, tokenizer=tokenizer)("a moving film")
    >>> with ppt.set_active_task(model, "cola"):
    ...     model(**batch)  # CoLA's prompt for every row
    ```
    """
    name = adapter_name if adapter_name is not None else model.active_adapter
    encoder = model.prompt_encoder[name] if name in getattr(model, "prompt_encoder", {}) else None
    if not isinstance(encoder, ComPTEncoder):
        raise ValueError(f"set_active_task needs a ComPT adapter; adapter {name!r} of this model is not one.")
    previous = encoder.active_task
    encoder.active_task = None if task is None else encoder.config.task_index(task)
    return _ActiveTask(encoder, previous)
