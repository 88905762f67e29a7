"""ComPT: the prompt encoder that composes shared source prompts and private task prompts."""

from __future__ import annotations

import math
import weakref
from typing import Optional, Union

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..base import TransferPromptEncoder, initial_prompt, load_module_state
from ..multitask import check_task_ids
from ..residual.model import RAW_PROMPT_KEY, ResidualMLP
from .config import ComPTConfig
from .sparsemax import sparsemax

PRIVATE_KEY = "private_prompt_embeddings"
RAW_PRIVATE_KEY = "raw_private_prompt_embeddings"
ROUTER_KEY = "router_logits"
GATE_KEY = "gate_logits"
SHARE_KEY = "share_logits"
STEP_KEY = "sampling_step"
_MLP_PREFIX = "reparameterization."
_PRIVATE_MLP_PREFIX = "private_reparameterization."
# every ComPT encoder alive, for the optimizer step post-hook that advances its `sampling_step`
_step_counting_encoders: weakref.WeakSet[ComPTEncoder] = weakref.WeakSet()
_step_counter_handle = None


def _relaxed_bernoulli_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """`(logits + L) / temperature` with logistic noise `L`: its sigmoid is a relaxed-Bernoulli sample (as
    `torch.distributions.RelaxedBernoulli(temperature, logits=logits).rsample()`)."""
    uniform = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
    return (logits + torch.log(uniform) - torch.log1p(-uniform)) / temperature


def _register_step_counter(encoder: ComPTEncoder) -> None:
    """Have `encoder.sampling_step` count the optimizer steps that follow its training forward passes.

    A global torch optimizer step post-hook (registered once; number 14 in the patch table of `_patches`) advances
    the counter of every encoder that had a training forward since its last counted step, when the optimizer that
    steps holds the encoder's parameters. So it counts optimizer steps, not forward passes (gradient accumulation
    does not change it), in the Trainer and in a plain PyTorch loop alike; a wrapper optimizer that steps an inner
    one (accelerate's) counts once; and an optimizer of another model in the same process leaves it alone. FSDP2
    steps the encoder's own (sharded) parameters, so it is found there too. The fallback: DeepSpeed ZeRO and FSDP1
    step flattened copies of the parameters (ZeRO's plain fp32 partitions, FSDP1's `FlatParameter`), in which no
    parameter of the encoder can be found, so an optimizer that steps only such copies counts as the encoder's. The
    counter is saved with the adapter, so resuming from a checkpoint continues the temperature schedule exactly.
    """
    global _step_counter_handle
    if _step_counter_handle is None:
        _step_counter_handle = register_optimizer_step_post_hook(_count_optimizer_step)
    _step_counting_encoders.add(encoder)


def _steps_flattened_copies(parameters: list[torch.Tensor]) -> bool:
    """Whether an optimizer's parameters are flattened copies made by a distributed wrapper, not module parameters:
    DeepSpeed ZeRO's fp32 partitions are plain tensors, FSDP1's are `FlatParameter`s."""
    return bool(parameters) and all(
        not isinstance(parameter, nn.Parameter) or type(parameter).__name__ == "FlatParameter"
        for parameter in parameters
    )


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    waiting = [encoder for encoder in list(_step_counting_encoders) if encoder._forward_since_step]
    if not waiting:
        return
    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    held = {id(parameter) for parameter in parameters}
    flattened = _steps_flattened_copies(parameters)
    for encoder in waiting:
        if flattened or any(id(parameter) in held for parameter in encoder.parameters()):
            encoder._forward_since_step = False
            with torch.no_grad():
                encoder.sampling_step += 1


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
    prompts, the router logits (`[num_tasks, num_source_prompts]`) and either the gate logits (`[num_tasks, 2]`,
    `share="gates"`) or the share logits (`[num_tasks, 1]`, `share="sampled_convex"`), and composes one prompt per
    task; `forward(batch_size, task_ids)` returns each example's task prompt, so a batch may mix tasks. With a
    `prompt_encoder` the source and private prompts pass through it while training (`reparameterization`, and with
    `"per_prompt"` also `private_reparameterization`); in inference mode the encoder holds the encoded prompts and
    builds no prompt encoder. `sampling_step` counts the optimizer steps taken, the clock of the temperature
    schedule.

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
                self.embedding.weight.copy_(self._initial_prompts(word_embeddings, num_sources * length))
        self.private: Optional[_TaskTable] = None
        if config.private_prompt:
            rows = (
                self._initial_prompts(word_embeddings, num_tasks * length)
                if training
                else torch.zeros(num_tasks * length, hidden)
            )
            self.private = _TaskTable(rows.view(num_tasks, length, hidden), num_frozen)
        # zero logits: every source starts equally weighted; zero gate / share logits: alpha = beta = 0.5
        self.router = _TaskTable(torch.zeros(num_tasks, num_sources), num_frozen)
        self.gates: Optional[_TaskTable] = None
        self.shares: Optional[_TaskTable] = None
        if config.share == "sampled_convex":
            self.shares = _TaskTable(torch.zeros(num_tasks, 1), num_frozen)
        elif config.learn_gates:
            self.gates = _TaskTable(torch.zeros(num_tasks, 2), num_frozen)
        # the prompt encoders: `reparameterization` encodes the source prompts (and, if shared, the private ones)
        self.reparameterization: Optional[ResidualMLP] = None
        self.private_reparameterization: Optional[ResidualMLP] = None
        if training and config.prompt_encoder == "shared_mlp":
            self.reparameterization = ResidualMLP(
                num_mlps=1,
                token_dim=hidden,
                bottleneck_size=config.prompt_mlp_bottleneck_size,
                activation="relu",
                layer_norm=True,
                dropout=0.0,
                residual=config.prompt_mlp_residual,
            )
        elif training and config.prompt_encoder == "per_prompt":
            # the authors' MLPPromptEncoder: Linear(d, h) -> GELU -> Linear(h, d) per prompt, no skip, no norm
            per_prompt = dict(
                token_dim=hidden,
                bottleneck_size=config.prompt_encoder_hidden_size or hidden,
                activation="gelu",
                layer_norm=False,
                dropout=0.0,
                residual=False,
            )
            self.reparameterization = ResidualMLP(num_mlps=num_sources, **per_prompt)
            if config.private_prompt:
                self.private_reparameterization = ResidualMLP(num_mlps=num_tasks, **per_prompt)
        # optimizer steps taken (the temperature schedule's clock), counted by _count_optimizer_step
        self.register_buffer("sampling_step", torch.zeros((), dtype=torch.long))
        self._forward_since_step = False
        _register_step_counter(self)
        # the task that calls without task_ids use (set_active_task); None: task_ids are required
        self.active_task: Optional[int] = None
        if num_frozen:
            # adding tasks: the shared parts must not move, or the frozen tasks' prompts would change
            self.embedding.weight.requires_grad_(False)
            if self.reparameterization is not None:
                self.reparameterization.requires_grad_(False)

    def _initial_prompts(self, word_embeddings: nn.Module, num_tokens: int) -> torch.Tensor:
        cfg = self.config
        if cfg.uniform_init_range is None:
            return initial_prompt(cfg, word_embeddings, num_tokens)
        return torch.empty(num_tokens, cfg.token_dim).uniform_(-cfg.uniform_init_range, cfg.uniform_init_range)

    # -- composition ---------------------------------------------------------------------------

    @staticmethod
    def _encode(prompts: torch.Tensor, encoder: Optional[ResidualMLP]) -> torch.Tensor:
        if encoder is None:
            return prompts
        return encoder(prompts.reshape(-1, prompts.shape[-1])).view_as(prompts)

    def source_prompts(self) -> torch.Tensor:
        """`[num_source_prompts, prompt_length, token_dim]`, after the prompt encoder if there is one."""
        cfg = self.config
        raw = self.embedding.weight.view(cfg.num_source_prompts, cfg.prompt_length, cfg.token_dim)
        return self._encode(raw, self.reparameterization)

    def private_prompts(self) -> Optional[torch.Tensor]:
        """`[num_tasks, prompt_length, token_dim]`, after the prompt encoder if there is one (None without private
        prompts)."""
        if self.private is None:
            return None
        if self.config.prompt_encoder == "per_prompt":
            return self._encode(self.private.value(), self.private_reparameterization)
        return self._encode(self.private.value(), self.reparameterization)

    def temperature(self) -> float:
        """The router's relaxed-Bernoulli sampling temperature after `sampling_step` optimizer steps."""
        cfg = self.config
        steps = int(self.sampling_step)
        if cfg.bernoulli_anneal_schedule == "linear":
            annealed = cfg.bernoulli_temperature - cfg.bernoulli_anneal_rate * steps
        else:
            annealed = cfg.bernoulli_temperature * math.exp(-cfg.bernoulli_anneal_rate * steps)
        return max(cfg.bernoulli_min_temperature, annealed)

    def source_weights(self, sample: bool = False) -> torch.Tensor:
        """Normalised source weights `[num_tasks, num_source_prompts]`, before gating.

        With `sample=True` the router logits get logistic noise and are divided by the annealed temperature
        (a relaxed Bernoulli sample for `sigmoid`, its softmax / sparsemax analogue otherwise); with
        `router_sampling="relaxed_bernoulli"` the sigmoid of that, a relaxed-Bernoulli sample, is what is normalised.
        """
        cfg = self.config
        logits = self.router.value()
        if sample:
            logits = _relaxed_bernoulli_logits(logits, self.temperature())
            if cfg.router_sampling == "relaxed_bernoulli":
                logits = torch.sigmoid(logits)
        keep = None
        if cfg.top_k is not None and cfg.top_k < cfg.num_source_prompts:
            keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, logits.topk(cfg.top_k, dim=-1).indices, True)
        if cfg.normalization == "sigmoid":
            weights = torch.sigmoid(logits)
            return weights if keep is None else weights * keep
        if keep is not None:
            logits = logits.masked_fill(~keep, float("-inf"))
        return torch.softmax(logits, dim=-1) if cfg.normalization == "softmax" else sparsemax(logits)

    def gate_values(self, sample: bool = False) -> torch.Tensor:
        """`[num_tasks, 2]`: the coefficient alpha_t of the shared part and beta_t of the private part of each task.

        With `share="gates"` they are the two gates `sigmoid(a_t)`, `sigmoid(b_t)` (1 and 1 without `learn_gates`);
        with `share="sampled_convex"` they are `1 - s_t` and `s_t`, where the share `s_t` is `sigmoid(l_t)`, or with
        `sample=True` a relaxed-Bernoulli sample with logits `l_t` at `share_temperature`.
        """
        if self.shares is not None:
            logits = self.shares.value()
            if sample:
                logits = _relaxed_bernoulli_logits(logits, self.config.share_temperature)
            share = torch.sigmoid(logits)
            return torch.cat([1 - share, share], dim=1)
        if self.gates is None:
            return self.router.value().new_ones(self.config.num_tasks, 2)
        return torch.sigmoid(self.gates.value())

    @torch.no_grad()
    def routing_weights(self) -> torch.Tensor:
        """The tasks x sources matrix `alpha_t * w_tj` the model uses at evaluation (no sampling)."""
        return (self.gate_values()[:, :1] * self.source_weights(sample=False)).detach().cpu()

    def task_prompts(self) -> torch.Tensor:
        """The composed prompt of every task, `[num_tasks, num_virtual_tokens, token_dim]`."""
        if self.training:
            self._forward_since_step = True
        gates = self.gate_values(sample=self.training)  # [num_tasks, 2]: alpha (shared), beta (private)
        weights = self.source_weights(sample=self.training and self.config.relaxed_bernoulli) * gates[:, :1]
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
        task_ids = self._batch_task_ids(batch_size, task_ids)
        # index_select, not fancy indexing: its backward is deterministic on CPU (same gradients every run)
        return self.task_prompts().index_select(0, task_ids)

    def distinct_prompts(
        self, batch_size: int, task_ids: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tasks, rows = torch.unique(self._batch_task_ids(batch_size, task_ids), return_inverse=True)
        return self.task_prompts().index_select(0, tasks), rows

    def num_distinct_prompts(self, batch_size: int, task_ids: Optional[torch.Tensor] = None) -> int:
        return int(torch.unique(self._batch_task_ids(batch_size, task_ids)).numel())

    def _batch_task_ids(self, batch_size: int, task_ids: Optional[torch.Tensor]) -> torch.Tensor:
        """The batch's task ids, checked, on the encoder's device (the active task's for calls without them)."""
        if task_ids is None and self.active_task is not None:
            task_ids = torch.full((batch_size,), self.active_task, dtype=torch.long)
        task_ids = check_task_ids(task_ids, batch_size, self.config.num_tasks, "COMPT")
        return task_ids.to(self.embedding.weight.device)

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
            if self.shares is not None:
                state[SHARE_KEY] = self.shares.value().detach().clone()
            state[STEP_KEY] = self.sampling_step.detach().clone().reshape(1)
            if self.reparameterization is not None:
                # training state: the raw prompts and the MLP, for exact resumption
                state[RAW_PROMPT_KEY] = self.embedding.weight.detach().clone()
                if self.private is not None:
                    state[RAW_PRIVATE_KEY] = self.private.value().reshape(-1, hidden).detach().clone()
                for prefix, encoder in self._prompt_encoders().items():
                    for name, tensor in encoder.state_dict().items():
                        state[prefix + name] = tensor.detach().clone()
        return state

    def _prompt_encoders(self) -> dict[str, ResidualMLP]:
        """The prompt encoders by their prefix in the saved training state."""
        encoders = {_MLP_PREFIX: self.reparameterization, _PRIVATE_MLP_PREFIX: self.private_reparameterization}
        return {prefix: encoder for prefix, encoder in encoders.items() if encoder is not None}

    def _expected_shapes(self) -> dict[str, tuple]:
        cfg = self.config
        rows = cfg.num_source_prompts * cfg.prompt_length
        shapes = {"prompt_embeddings": (rows, cfg.token_dim), ROUTER_KEY: (cfg.num_tasks, cfg.num_source_prompts)}
        if self.private is not None:
            shapes[PRIVATE_KEY] = (cfg.num_tasks * cfg.prompt_length, cfg.token_dim)
        if self.gates is not None:
            shapes[GATE_KEY] = (cfg.num_tasks, 2)
        if self.shares is not None:
            shapes[SHARE_KEY] = (cfg.num_tasks, 1)
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
        if self.shares is not None:
            self.shares.assign(state_dict[SHARE_KEY])
        if STEP_KEY in state_dict:
            self.sampling_step.copy_(state_dict[STEP_KEY].reshape(()))
        sources, private = state_dict["prompt_embeddings"], state_dict.get(PRIVATE_KEY)
        if self.reparameterization is not None:
            if RAW_PROMPT_KEY not in state_dict:
                raise ValueError(
                    "This ComPT adapter holds only the folded prompts (it was saved in inference mode or exported), "
                    "not the raw prompts and prompt encoders that training needs. Load it for inference "
                    "(is_trainable=False)."
                )
            for prefix, encoder in self._prompt_encoders().items():
                encoder_state = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
                load_module_state(encoder, encoder_state)
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
