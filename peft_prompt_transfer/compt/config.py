"""Configuration of ComPT, compositional multi-task prompt tuning (arXiv:2408.13227)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from .._peft_integration import peft_type_for
from ..base import TransferPromptLearningConfig

COMPT = "COMPT"
COMPOSITIONS = ("sum", "concat")
NORMALIZATIONS = ("sigmoid", "softmax", "sparsemax")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class ComPTConfig(TransferPromptLearningConfig):
    """
    Configuration of a [`ComPTEncoder`]: each task's prompt is a learned, normalised mix of shared source prompts
    plus a private per-task prompt, balanced by learned gates.

    For task `t` with router logits `r_t` (one per source prompt `S_j`), normalised weights `w_t = norm(r_t)`
    (sigmoid, softmax or sparsemax, optionally restricted to the top-k sources) and gates
    `alpha_t = sigmoid(a_t)`, `beta_t = sigmoid(b_t)`:

    - `composition="sum"` (SPP): `P_t = alpha_t * sum_j w_tj S_j + beta_t * R_t`, prompt length `num_virtual_tokens`;
    - `composition="concat"` (SCP): `P_t = [alpha_t * sum_j w_tj S_j ; beta_t * R_t]`, each part
      `num_virtual_tokens // 2` tokens long.

    `num_virtual_tokens` is, as in every peft config, the number of virtual tokens the model sees.

    Args:
        task_names (`list[str]`, *optional*): The tasks; their order defines the integer `task_ids`.
        num_tasks (`int`, *optional*): The number of tasks, if they have no names (ids 0..num_tasks-1).
        num_source_prompts (`int`): Shared source prompts.
        private_prompt (`bool`): Give each task a private prompt `R_t` (required for `concat`).
        composition (`str`): `"sum"` (SPP) or `"concat"` (SCP).
        normalization (`str`): `"sigmoid"`, `"softmax"` or `"sparsemax"` (exact zeros for irrelevant sources).
        top_k (`int`, *optional*): Keep only each task's `top_k` highest-scoring sources.
        learn_gates (`bool`): Learn `alpha_t`, `beta_t` (initialised to 0.5); if False both are 1.
        relaxed_bernoulli (`bool`): While training, add logistic noise to the router logits and divide by an
            annealed temperature before normalising (with `sigmoid` this samples the weights from a relaxed
            Bernoulli, as the authors' code does). Evaluation always uses the deterministic weights.
        bernoulli_temperature (`float`): Initial sampling temperature.
        bernoulli_min_temperature (`float`): Floor of the annealed temperature.
        bernoulli_anneal_rate (`float`): The temperature after `n` training forward passes is
            `max(min_temperature, temperature * exp(-anneal_rate * n))`.
        prompt_mlp_bottleneck_size (`int`, *optional*): Reparameterise every source and private prompt through one
            shared bottleneck MLP (residual prompt tuning's MLP) while training; it is folded away on save.
        prompt_mlp_residual (`bool`): Skip connection around that MLP.
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
    learn_gates: bool = field(default=True, metadata={"help": "Learn the shared/private gates alpha_t, beta_t."})
    relaxed_bernoulli: bool = field(
        default=False, metadata={"help": "Sample the weights (relaxed Bernoulli / logistic noise) while training."}
    )
    bernoulli_temperature: float = field(default=1.0, metadata={"help": "Initial sampling temperature."})
    bernoulli_min_temperature: float = field(default=0.1, metadata={"help": "Lowest annealed temperature."})
    bernoulli_anneal_rate: float = field(
        default=1e-3, metadata={"help": "Temperature decay per training forward pass (exponential)."}
    )
    prompt_mlp_bottleneck_size: Optional[int] = field(
        default=None, metadata={"help": "Bottleneck of an MLP over source and private prompts (None: no MLP)."}
    )
    prompt_mlp_residual: bool = field(default=True, metadata={"help": "Skip connection around the prompt MLP."})
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
                raise ValueError("composition='concat' joins the sources with the private prompt; set private_prompt=True.")
            if self.num_virtual_tokens % 2:
                raise ValueError(
                    f"composition='concat' splits num_virtual_tokens between the shared and the private part, so it "
                    f"must be even, got {self.num_virtual_tokens}."
                )
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}.")
        if self.top_k is not None and (not _is_int(self.top_k) or not 1 <= self.top_k <= self.num_source_prompts):
            raise ValueError(f"top_k must be None or an integer in [1, num_source_prompts={self.num_source_prompts}], got {self.top_k!r}.")
        for name in ("bernoulli_temperature", "bernoulli_min_temperature"):
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
        size = self.prompt_mlp_bottleneck_size
        if size is not None and (not _is_int(size) or size < 1):
            raise ValueError(f"prompt_mlp_bottleneck_size must be None or a positive integer, got {size!r}.")
        if not _is_int(self.num_frozen_tasks) or not 0 <= self.num_frozen_tasks < self.num_tasks:
            raise ValueError(
                f"num_frozen_tasks must be an integer in [0, num_tasks={self.num_tasks}), got {self.num_frozen_tasks!r}; "
                "it is set by add_tasks, leave it at 0."
            )

    def _validate_tasks(self) -> None:
        if self.task_names is None and self.num_tasks is None:
            raise ValueError("ComPTConfig needs the tasks: set task_names=[...] (ids follow their order) or num_tasks=N.")
        if self.task_names is not None:
            names = self.task_names
            if isinstance(names, str) or not all(isinstance(n, str) and n for n in names) or not names:
                raise ValueError(f"task_names must be a non-empty list of non-empty strings, got {names!r}.")
            duplicates = sorted({n for n in names if list(names).count(n) > 1})
            if duplicates:
                raise ValueError(f"task_names must be unique; repeated: {duplicates}.")
            self.task_names = list(names)
            if self.num_tasks is not None and self.num_tasks != len(names):
                raise ValueError(f"num_tasks={self.num_tasks} but task_names has {len(names)} names; give one or make them agree.")
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
                raise ValueError(f"Unknown task {task!r}; the tasks are {self.task_names or list(range(self.num_tasks))}.")
            return self.task_names.index(task)
        if not _is_int(task) or not 0 <= task < self.num_tasks:
            raise ValueError(f"task must be a name or an id in [0, {self.num_tasks}), got {task!r}.")
        return task
