"""Configuration of ComPT, compositional multi-task prompt tuning (arXiv:2408.13227)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.tuners.prompt_tuning import PromptTuningInit

from .._compat import peft_type_for
from ..base import TransferPromptLearningConfig

COMPT = "COMPT"
COMPOSITIONS = ("sum", "concat")
NORMALIZATIONS = ("sigmoid", "softmax", "sparsemax")
ANNEAL_SCHEDULES = ("exponential", "linear")
ROUTER_SAMPLINGS = ("noisy_logits", "relaxed_bernoulli")
SHARES = ("gates", "sampled_convex")
PROMPT_ENCODERS = ("none", "shared_mlp", "per_prompt")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class ComPTConfig(TransferPromptLearningConfig):
    """
    Configuration of a [`ComPTEncoder`]: each task's prompt is a learned, normalised mix of shared source prompts
    plus a private per-task prompt, balanced by learned coefficients.

    For task `t` with router logits `r_t` (one per source prompt `S_j`), normalised weights `w_t = norm(r_t)`
    (sigmoid, softmax or sparsemax, optionally restricted to the top-k sources) and the coefficients of the shared
    and the private part, `alpha_t = sigmoid(a_t)`, `beta_t = sigmoid(b_t)` (`share="gates"`) or
    `alpha_t = 1 - s_t`, `beta_t = s_t` with one share `s_t = sigmoid(l_t)` per task (`share="sampled_convex"`):

    - `composition="sum"` (SPP): `P_t = alpha_t * sum_j w_tj S_j + beta_t * R_t`, prompt length `num_virtual_tokens`;
    - `composition="concat"` (SCP): `P_t = [alpha_t * sum_j w_tj S_j ; beta_t * R_t]`, each part
      `num_virtual_tokens // 2` tokens long.

    `num_virtual_tokens` is, as in every peft config, the number of virtual tokens the model sees. `S_j` and `R_t`
    are the prompts after the prompt encoder, if there is one (`prompt_encoder`).

    The defaults are this package's design; [`ComPTConfig.authors_recipe`] returns the configuration of the
    authors' code (puraminy/ComPT with its CrossPT configs). The defaults stay ours by measurement: on SmolLM2 (SST-2,
    SUBJ and TREC, five seeds, LRs chosen on dev) ours scored higher than the authors' recipe on every seed
    (docs/evidence.md#smollm2-claim-3).

    Args:
        task_names (`list[str]`, *optional*): The tasks; their order defines the integer `task_ids`.
        num_tasks (`int`, *optional*): The number of tasks, if they have no names (ids 0..num_tasks-1).
        num_source_prompts (`int`): Shared source prompts.
        private_prompt (`bool`): Give each task a private prompt `R_t` (required for `concat`).
        composition (`str`): `"sum"` (SPP) or `"concat"` (SCP).
        normalization (`str`): `"sigmoid"`, `"softmax"` or `"sparsemax"` (exact zeros for irrelevant sources).
        top_k (`int`, *optional*): Keep only each task's `top_k` highest-scoring sources.
        learn_gates (`bool`): With `share="gates"`: learn `alpha_t`, `beta_t` (initialised to 0.5); if False both
            are 1.
        share (`str`): How the shared and the private part are balanced. `"gates"` (default, this package's): two
            independent sigmoid gates `alpha_t`, `beta_t`, never sampled. `"sampled_convex"` (the authors' code):
            one logit `l_t` per task (initialised to 0, so `s_t = 0.5`) and the convex mix
            `(1 - s_t) * shared + s_t * private`; while training `s_t` is sampled from a relaxed Bernoulli with
            logits `l_t` at `share_temperature`, at evaluation `s_t = sigmoid(l_t)`. Needs `private_prompt=True`.
        share_temperature (`float`): The fixed (not annealed) relaxed-Bernoulli temperature of the sampled share
            (the authors' CrossPT configs: 4.0, the default).
        relaxed_bernoulli (`bool`): Sample the router while training (see `router_sampling`), with a temperature
            annealed per optimizer step. Evaluation always uses the deterministic weights. Default False; the
            authors' configs: True.
        router_sampling (`str`): What is sampled when `relaxed_bernoulli` is on. `"noisy_logits"` (default, this
            package's): `w_t = norm((r_t + L) / T)` with logistic noise `L` (for `sigmoid`, a relaxed-Bernoulli
            sample of the weights). `"relaxed_bernoulli"` (the authors' code): `w_t = norm(sigmoid((r_t + L) / T))`,
            the normalisation applied to a relaxed-Bernoulli sample of the router; evaluation normalises the
            logits `r_t` themselves, as their code does.
        bernoulli_temperature (`float`): Initial sampling temperature (default 1.0; the authors' configs: 5).
        bernoulli_min_temperature (`float`): Floor of the annealed temperature (default 0.1; the authors': 0.001).
        bernoulli_anneal_schedule (`str`): The temperature after `n` optimizer steps is
            `max(min_temperature, temperature * exp(-anneal_rate * n))` for `"exponential"` (default) or
            `max(min_temperature, temperature - anneal_rate * n)` for `"linear"` (the authors' code).
        bernoulli_anneal_rate (`float`): The rate of that schedule (default 1e-3; the authors' configs, linear:
            0.02, which reaches 0.001 from 5 after 250 steps). `n` counts optimizer steps (not forward passes, so
            gradient accumulation does not change the schedule); it is saved with the adapter, so resuming
            continues the schedule exactly.
        prompt_encoder (`str`, *optional*): What the source and private prompts pass through while training; it is
            folded away on save (the saved prompts are the encoded ones, and inference builds no encoder).
            `"none"`; `"shared_mlp"`: one bottleneck MLP shared by every prompt (residual prompt tuning's MLP, of
            width `prompt_mlp_bottleneck_size`); `"per_prompt"` (the authors' code): each source and each private
            prompt has its own `Linear -> GELU -> Linear` encoder of width `prompt_encoder_hidden_size`. Default:
            `"shared_mlp"` if `prompt_mlp_bottleneck_size` is set, else `"none"` (what older configs meant).
        prompt_encoder_hidden_size (`int`, *optional*): Hidden width of the per-prompt encoders (default: the
            model's hidden size, as in the authors' code).
        prompt_mlp_bottleneck_size (`int`, *optional*): Width of the shared MLP (`prompt_encoder="shared_mlp"`).
        prompt_mlp_residual (`bool`): Skip connection around the shared MLP.
        uniform_init_range (`float`, *optional*): Initialise the source and private prompts uniformly in
            `[-uniform_init_range, uniform_init_range]` instead of by `prompt_tuning_init` (the authors' code: 0.5;
            default None: `prompt_tuning_init`, i.e. N(0, 1) for RANDOM).
        num_frozen_tasks (`int`): Set by [`add_tasks`]: the first `num_frozen_tasks` tasks, the source prompts and
            the MLP are frozen, so that only the added tasks train.
    """

    task_names: Optional[list[str]] = field(
        default=None, metadata={"help": "Task names; their order defines the integer task_ids."}
    )
    num_tasks: Optional[int] = field(default=None, metadata={"help": "Number of tasks (if task_names is not given)."})
    num_source_prompts: int = field(default=4, metadata={"help": "Number of shared source prompts."})
    private_prompt: bool = field(default=True, metadata={"help": "Give each task a private prompt."})
    composition: str = field(
        default="sum", metadata={"help": "'sum' (SPP: sources + private) or 'concat' (SCP: [sources; private])."}
    )
    normalization: str = field(
        default="softmax", metadata={"help": "How router logits become source weights: sigmoid, softmax, sparsemax."}
    )
    top_k: Optional[int] = field(default=None, metadata={"help": "Keep only the top-k sources per task."})
    learn_gates: bool = field(
        default=True, metadata={"help": "With share='gates': learn the shared/private gates alpha_t, beta_t."}
    )
    share: str = field(
        default="gates",
        metadata={
            "help": "Shared/private balance: 'gates' (default: two independent sigmoid gates, never sampled) or "
            "'sampled_convex' (the authors' code: (1 - s_t) * shared + s_t * private, one share s_t per task, "
            "sampled as a relaxed Bernoulli while training, sigmoid of its logit at evaluation)."
        },
    )
    share_temperature: float = field(
        default=4.0,
        metadata={"help": "Fixed relaxed-Bernoulli temperature of the sampled share (the authors' configs: 4.0)."},
    )
    relaxed_bernoulli: bool = field(
        default=False,
        metadata={"help": "Sample the router while training (default False; the authors' configs: True)."},
    )
    router_sampling: str = field(
        default="noisy_logits",
        metadata={
            "help": "'noisy_logits' (default: norm((r + noise) / T)) or 'relaxed_bernoulli' (the authors' code: "
            "norm(sigmoid((r + noise) / T)), a relaxed-Bernoulli sample of the router, normalised)."
        },
    )
    bernoulli_temperature: float = field(
        default=1.0, metadata={"help": "Initial sampling temperature (default 1.0; the authors' configs: 5)."}
    )
    bernoulli_min_temperature: float = field(
        default=0.1, metadata={"help": "Lowest annealed temperature (default 0.1; the authors' configs: 0.001)."}
    )
    bernoulli_anneal_schedule: str = field(
        default="exponential",
        metadata={
            "help": "Temperature after n optimizer steps: 'exponential' (default: T0 * exp(-rate * n)) or 'linear' "
            "(the authors' code: T0 - rate * n), floored at bernoulli_min_temperature."
        },
    )
    bernoulli_anneal_rate: float = field(
        default=1e-3,
        metadata={"help": "Rate of the temperature schedule, per optimizer step (default 1e-3; the authors': 0.02)."},
    )
    prompt_encoder: Optional[str] = field(
        default=None,
        metadata={
            "help": "Encoder of the source and private prompts while training, folded away on save: 'none', "
            "'shared_mlp' (one MLP of width prompt_mlp_bottleneck_size) or 'per_prompt' (the authors' code: a "
            "Linear-GELU-Linear per prompt). Default: 'shared_mlp' if prompt_mlp_bottleneck_size is set, else 'none'."
        },
    )
    prompt_encoder_hidden_size: Optional[int] = field(
        default=None,
        metadata={
            "help": "Hidden width of the per-prompt encoders (default: the model's hidden size, as the authors')."
        },
    )
    prompt_mlp_bottleneck_size: Optional[int] = field(
        default=None, metadata={"help": "Width of the shared prompt MLP (prompt_encoder='shared_mlp')."}
    )
    prompt_mlp_residual: bool = field(default=True, metadata={"help": "Skip connection around the shared prompt MLP."})
    uniform_init_range: Optional[float] = field(
        default=None,
        metadata={
            "help": "Initialise the prompts in U(-range, range) instead of by prompt_tuning_init (default None; the "
            "authors' code: 0.5)."
        },
    )
    num_frozen_tasks: int = field(
        default=0, metadata={"help": "Leading tasks (with sources and MLP) kept frozen; set by add_tasks."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = peft_type_for(COMPT)
        task_type = getattr(self.task_type, "value", self.task_type)
        if task_type in ("FEATURE_EXTRACTION", "QUESTION_ANS"):
            # peft's forwards for these task types build the prompt without the batch's task_ids
            raise ValueError(
                f"ComPT does not support task_type={task_type!r}: peft's {task_type} model does not pass task_ids to "
                "the prompt, and ComPT needs them to pick each row's task. Use task_type SEQ_CLS, TOKEN_CLS, CAUSAL_LM or "
                "SEQ_2_SEQ_LM."
            )
        self._validate_tasks()
        if not _is_int(self.num_source_prompts) or self.num_source_prompts < 1:
            raise ValueError(f"num_source_prompts must be a positive integer, got {self.num_source_prompts!r}.")
        for name in ("private_prompt", "learn_gates", "relaxed_bernoulli", "prompt_mlp_residual"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if self.composition not in COMPOSITIONS:
            raise ValueError(f"composition must be one of {COMPOSITIONS}, got {self.composition!r}.")
        if self.composition == "concat":
            if not self.private_prompt:
                raise ValueError(
                    "composition='concat' joins the sources with the private prompt; set private_prompt=True."
                )
            if self.num_virtual_tokens % 2:
                raise ValueError(
                    f"composition='concat' splits num_virtual_tokens between the shared and the private part, so it "
                    f"must be even, got {self.num_virtual_tokens}."
                )
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}.")
        if self.top_k is not None and (not _is_int(self.top_k) or not 1 <= self.top_k <= self.num_source_prompts):
            raise ValueError(
                f"top_k must be None or an integer in [1, num_source_prompts={self.num_source_prompts}], got {self.top_k!r}."
            )
        for name, choices in (
            ("share", SHARES),
            ("router_sampling", ROUTER_SAMPLINGS),
            ("bernoulli_anneal_schedule", ANNEAL_SCHEDULES),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}.")
        if self.share == "sampled_convex":
            if not self.private_prompt:
                raise ValueError(
                    "share='sampled_convex' mixes the shared part with the private prompt; set private_prompt=True."
                )
            if not self.learn_gates:
                raise ValueError(
                    "learn_gates=False fixes the gates of share='gates'; share='sampled_convex' always learns its share."
                )
        for name in ("bernoulli_temperature", "bernoulli_min_temperature", "share_temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}.")
        if self.bernoulli_min_temperature > self.bernoulli_temperature:
            raise ValueError(
                f"bernoulli_min_temperature ({self.bernoulli_min_temperature}) must not exceed bernoulli_temperature "
                f"({self.bernoulli_temperature})."
            )
        rate = self.bernoulli_anneal_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or rate < 0:
            raise ValueError(f"bernoulli_anneal_rate must be a number >= 0, got {rate!r}.")
        self._validate_prompt_encoder()
        if not _is_int(self.num_frozen_tasks) or not 0 <= self.num_frozen_tasks < self.num_tasks:
            raise ValueError(
                f"num_frozen_tasks must be an integer in [0, num_tasks={self.num_tasks}), got {self.num_frozen_tasks!r}; "
                "it is set by add_tasks, leave it at 0."
            )

    def _validate_prompt_encoder(self) -> None:
        for name in ("prompt_mlp_bottleneck_size", "prompt_encoder_hidden_size"):
            size = getattr(self, name)
            if size is not None and (not _is_int(size) or size < 1):
                raise ValueError(f"{name} must be None or a positive integer, got {size!r}.")
        if self.prompt_encoder is None:  # configs from before prompt_encoder existed
            self.prompt_encoder = "none" if self.prompt_mlp_bottleneck_size is None else "shared_mlp"
        if self.prompt_encoder not in PROMPT_ENCODERS:
            raise ValueError(f"prompt_encoder must be one of {PROMPT_ENCODERS}, got {self.prompt_encoder!r}.")
        if (self.prompt_encoder == "shared_mlp") != (self.prompt_mlp_bottleneck_size is not None):
            raise ValueError(
                "prompt_mlp_bottleneck_size is the width of prompt_encoder='shared_mlp': set both or neither "
                f"(got prompt_encoder={self.prompt_encoder!r}, "
                f"prompt_mlp_bottleneck_size={self.prompt_mlp_bottleneck_size!r})."
            )
        if self.prompt_encoder_hidden_size is not None and self.prompt_encoder != "per_prompt":
            raise ValueError("prompt_encoder_hidden_size is the width of prompt_encoder='per_prompt'; set that too.")
        value = self.uniform_init_range
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"uniform_init_range must be None or a positive number, got {value!r}.")
            if self.prompt_tuning_init != PromptTuningInit.RANDOM:
                raise ValueError(
                    f"uniform_init_range replaces prompt_tuning_init; it cannot be combined with "
                    f"prompt_tuning_init={self.prompt_tuning_init.value!r}."
                )

    @classmethod
    def authors_recipe(cls, **overrides) -> ComPTConfig:
        """
        The configuration of the authors' code (puraminy/ComPT, CrossPT configs `SL_*.json`), with `overrides`.

        It sets every design point their code fixes: a relaxed-Bernoulli sample of the router, normalised by
        softmax, with a temperature annealed linearly from 5 to 0.001 by 0.02 per optimizer step; the sampled
        convex share `(1 - s_t) * shared + s_t * private` at temperature 4; a `Linear -> GELU -> Linear` encoder
        per prompt of the model's hidden size; prompts initialised in U(-0.5, 0.5); a private prompt per task.
        The task, the tasks and the prompt sizes are yours to give. Train it with [`COMPT_AUTHORS_LEARNING_RATES`]
        through [`create_compt_optimizer`] and a linear schedule with 20% warm-up
        (`TrainingArguments(lr_scheduler_type="linear", warmup_steps=0.2)`: a float below 1 is a ratio of the steps).

        Example:

        ```py
        >>> config = ComPTConfig.authors_recipe(task_type="SEQ_2_SEQ_LM", task_names=["rte", "mrpc"],
        ...                                     num_source_prompts=8, num_virtual_tokens=10)
        ```
        """
        recipe = dict(
            private_prompt=True,
            composition="sum",
            normalization="softmax",
            share="sampled_convex",
            share_temperature=4.0,
            relaxed_bernoulli=True,
            router_sampling="relaxed_bernoulli",
            bernoulli_temperature=5.0,
            bernoulli_min_temperature=0.001,
            bernoulli_anneal_schedule="linear",
            bernoulli_anneal_rate=0.02,
            prompt_encoder="per_prompt",
            uniform_init_range=0.5,
        )
        recipe.update(overrides)
        return cls(**recipe)

    def _validate_tasks(self) -> None:
        if self.task_names is None and self.num_tasks is None:
            raise ValueError(
                "ComPTConfig needs the tasks: set task_names=[...] (ids follow their order) or num_tasks=N."
            )
        if self.task_names is not None:
            names = self.task_names
            if isinstance(names, str) or not all(isinstance(n, str) and n for n in names) or not names:
                raise ValueError(f"task_names must be a non-empty list of non-empty strings, got {names!r}.")
            duplicates = sorted({n for n in names if list(names).count(n) > 1})
            if duplicates:
                raise ValueError(f"task_names must be unique; repeated: {duplicates}.")
            self.task_names = list(names)
            if self.num_tasks is not None and self.num_tasks != len(names):
                raise ValueError(
                    f"num_tasks={self.num_tasks} but task_names has {len(names)} names; give one or make them agree."
                )
            self.num_tasks = len(names)
        elif not _is_int(self.num_tasks) or self.num_tasks < 1:
            raise ValueError(f"num_tasks must be a positive integer, got {self.num_tasks!r}.")

    @property
    def takes_task_ids(self) -> bool:
        return True

    @property
    def prompt_length(self) -> int:
        """Tokens per source / private prompt."""
        return self.num_virtual_tokens // 2 if self.composition == "concat" else self.num_virtual_tokens

    def task_index(self, task: Union[int, str]) -> int:
        """The integer id of `task` (a name from `task_names` or an id)."""
        if isinstance(task, str):
            if not self.task_names or task not in self.task_names:
                raise ValueError(
                    f"Unknown task {task!r}; the tasks are {self.task_names or list(range(self.num_tasks))}."
                )
            return self.task_names.index(task)
        if not _is_int(task) or not 0 <= task < self.num_tasks:
            raise ValueError(f"task must be a name or an id in [0, {self.num_tasks}), got {task!r}.")
        return task
