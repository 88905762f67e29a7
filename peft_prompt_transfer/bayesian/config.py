"""Configuration of Bayesian multi-task prompt transfer (Lee et al., 2024, arXiv:2402.08594)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional, Union

from peft.tuners.prompt_tuning import PromptTuningInit

from .._compat import peft_type_for
from ..base import TransferPromptLearningConfig

BAYESIAN_PROMPT_TUNING = "BAYESIAN_PROMPT_TUNING"
STAGES = ("source", "target")
PARTICLE_ASSIGNMENTS = ("sharded", "replicated")
TARGET_INITS = ("mean", "particle:<k>", "particle:random", "sample")
TARGET_PROMPTS = ("plain", "decomposed")

# Stage-specific fields default to None and get these values in their own stage, so that a saved config shows
# only the fields its stage uses (a target adapter does not claim num_particles=4).
SOURCE_DEFAULTS = {
    "num_particles": 4,
    "kernel_bandwidth": "median",
    "prior_scale": 10.0,
    "likelihood_scale": 1.0,
    "particle_assignment": "sharded",
}
TARGET_DEFAULTS = {
    "target_init": "mean",
    "regularization_weight": 0.01,
    "target_prompt": "plain",
    "decomposition_rank": 1,
}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_target_init(value: str) -> tuple[str, Optional[int]]:
    """`"mean"` -> `("mean", None)`, `"particle:3"` -> `("particle", 3)`, `"particle:random"` ->
    `("particle", None)`, `"sample"` -> `("sample", None)`."""
    if value in ("mean", "sample"):
        return value, None
    if value == "particle:random":
        return "particle", None
    if isinstance(value, str) and value.startswith("particle:"):
        index = value[len("particle:") :]
        if index.isdigit():
            return "particle", int(index)
    raise ValueError(
        f"target_init must be 'mean', 'sample', 'particle:random' or 'particle:<k>' with k a particle index such as "
        f"'particle:0', got {value!r}."
    )


@dataclass
class BayesianPromptConfig(TransferPromptLearningConfig):
    """
    Configuration of a [`BayesianPromptEncoder`]: Bayesian multi-task prompt transfer, in two stages.

    **Source stage** (`stage="source"`): `num_particles` prompts (particles) approximate the posterior over a
    prompt shared by several source tasks, `p(P | D_1..D_K) ∝ p(P) prod_k p(D_k | P)`, and are moved by Stein
    variational gradient descent (SVGD). Batches mix the tasks ([`combine_tasks`]); the loss of the mixed batch is
    the product of the task likelihoods. The SVGD target is the tempered posterior

        log p(P) = -likelihood_scale * L(P) - ||P||^2 / (2 * prior_scale^2) + const,

    with `L(P)` the model's mean loss over the examples a particle sees. `save_pretrained` writes the particles as
    one `[num_particles, num_virtual_tokens, token_dim]` tensor.

    **Target stage** (`stage="target"`): one prompt for a new task starts from the posterior saved by a source-stage
    model (its mean by default) and is trained on the target loss plus `regularization_weight / 2 *
    ||P - mean||^2`, which keeps it near the posterior mean. With `target_prompt="decomposed"` (the paper's target
    prompt, after MPT) the prompt is `P = S ⊙ (U V)`: a full-rank `S` started from the posterior, times a low-rank
    `U V` (`[num_virtual_tokens, r] @ [r, token_dim]`, `r = decomposition_rank`) that starts as all ones, so that
    `P = S` at step 0; the regulariser applies to `P`, the prompt the model sees. Train the two parts at their own
    learning rates with [`bayesian_parameter_groups`]. It saves `P` as `prompt_embeddings` (so inference and
    `export_prompt_tuning` need no decomposition) and `S`, `U`, `V` for resuming.

    The scales. SVGD balances a data term (the kernel-smoothed score) against a repulsive term (the kernel's
    gradient), whose norm with the median-heuristic bandwidth is about `2 log(M + 1) / dist` for particles `dist`
    apart. `likelihood_scale` multiplies the *mean* loss. The exact posterior would multiply it by the number of
    training examples N (10^3 to 10^5): the data term would then be that many times the repulsion, and the
    particles would become independent MAP runs that collapse within each mode. With the mean loss
    (`likelihood_scale=1`, the default: the posterior at temperature N) the two terms start out of the same order
    for embedding-like prompts, as measured on all-MiniLM-L6-v2. Because `dist` grows like the square root of the
    prompt's size `num_virtual_tokens * token_dim` while the mean-loss gradient does not, the data term can still
    dwarf the repulsion for long prompts on wide models: lower `likelihood_scale` there (roughly in proportion to
    `sqrt(3840 / (num_virtual_tokens * token_dim))` keeps the measured balance), and raise it if the data is not
    being fitted. The prior's default scale, 10, is an L2 penalty of `0.01/2 * ||P||^2` on the mean loss (a common
    weight-decay strength). It matters with Adam, which scales every coordinate's step to the learning rate and so
    turns the small repulsive gradient in directions the data does not constrain into full-size steps: with the
    default the particles' norms stay near a plain prompt's, while with a ten times wider prior they keep growing.
    The measurements are in docs/evidence.md#svgd-scales.

    Args:
        stage (`str`): `"source"` or `"target"`.
        num_particles (`int`): Source: the number M of particles (prompts). Default 4.
        kernel_bandwidth (`str` or `float`): Source: `"median"` (default: the median heuristic, recomputed at each
            step) or a fixed bandwidth `h > 0` of the RBF kernel `exp(-||P_i - P_j||^2 / h)`.
        prior_scale (`float`): Source: the standard deviation of the Gaussian prior `N(0, prior_scale^2 I)` on every
            prompt entry. Default 10 (see above).
        likelihood_scale (`float`): Source: the factor (inverse temperature) multiplying the mean loss in the log
            posterior. Default 1.0: the mean loss (see above). On SmolLM2 (MR and SUBJ targets, five seeds)
            `likelihood_scale=4` (the number of particles, as if each particle saw the whole batch) drew the
            particles closer but scored no better on MR and worse on SUBJ (docs/evidence.md#smollm2-claim-2).
        particle_assignment (`str`): Source: `"sharded"` (default): example `b` of a batch is given to particle
            `b mod M` and one forward pass serves all particles, so a step costs about what prompt tuning costs.
            `"replicated"`: every particle sees every example; the batch must be expanded M times with
            [`ParticleReplicationCollator`] (or [`expand_for_particles`]) and a step costs about M forward passes.
            Replicated is SVGD as its authors wrote it (every particle's gradient on the same minibatch); sharded
            departs from it for the cost: on SmolLM2 (MR and SUBJ targets, five seeds) the two showed no accuracy
            difference, whether replicated had the same compute per step or the same examples per step (M times the
            compute) (docs/evidence.md#smollm2-claim-2).
        source_tasks (`list[str]`, *optional*): Source: the names of the source tasks, in the order of the
            `task_ids` that [`combine_tasks`] assigns. Recorded in the posterior's config; `task_ids` passed to the
            model are checked against it (they do not change the prompt: the posterior is shared by all tasks).
        posterior (`str`): Target: a local directory or a Hugging Face Hub repo id holding a source-stage adapter.
        posterior_revision (`str`, *optional*): Target: the Hub revision of `posterior` (branch, tag or commit).
        target_init (`str`): Target: the initial prompt: `"mean"` (default: the posterior mean), `"particle:<k>"`
            (particle k), `"particle:random"` (a particle drawn uniformly: a sample of SVGD's empirical posterior,
            the paper's "prompts sampled from the posterior"), or `"sample"` (a draw from the Gaussian with the
            particles' mean and per-entry variance). The default departs from the paper so that the start does not
            depend on a draw: on SmolLM2 a target from one particle showed no accuracy difference from one from the
            mean (docs/evidence.md#smollm2-claim-2). Better than the mean: the particle that fits the target, which
            needs the target's examples and so is not a config value. Rank the posterior's particles with
            [`PromptLibrary`] and `initialize` the target from the first (docs/methods/bayesian.md, "Start from the
            best particle"); on SmolLM2 it beat the mean by 5 to 18 points on three of four unseen targets
            (docs/evidence.md#prompt-library-verdicts).
        target_init_seed (`int`, *optional*): Target: the seed of the random draws of `"particle:random"` and
            `"sample"` (and of the decomposition's extra rank columns). None (default): torch's global random
            generator, so `torch.manual_seed` before `get_peft_model` makes them reproducible.
        target_prompt (`str`): Target: `"plain"` (default: one trainable prompt) or `"decomposed"` (the paper's
            MPT-style `S ⊙ (U V)`, see above). The default departs from the paper: it trains fewer parameters, and
            on SmolLM2 the decomposed target showed no accuracy difference from the plain one
            (docs/evidence.md#smollm2-claim-2).
        decomposition_rank (`int`): Target, with `target_prompt="decomposed"`: the rank r of `U V`. Default 1 (the
            paper's). `U`'s first column and `V`'s first row start as ones; with r > 1 the other columns of `U`
            start from N(0, 0.02^2) (MPT's init) and the other rows of `V` at zero, so that `U V` is all ones at
            step 0 and yet its ranks receive different gradients.
        regularization_weight (`float`): Target: the weight λ of `λ/2 * ||P - mean||^2` added to the mean loss.
            Default 0.01: the source stage's default prior (`prior_scale=10`, an L2 penalty of 0.01), re-centred on
            the posterior mean, i.e. the target prompt's prior is `N(mean, 10^2 I)`. 0 turns the regulariser off.

    Source: the prompt initialisation (`prompt_tuning_init`, `prompt_tuning_init_text`, `tokenizer_name_or_path`,
    `tokenizer_kwargs`) says how each particle is initialised, as in peft's `PromptTuningConfig` (each particle draws
    its own `RANDOM` / `SAMPLE_VOCAB` prompt).
    """

    stage: str = field(default="source", metadata={"help": "'source' (learn the posterior) or 'target' (new task)."})
    num_particles: Optional[int] = field(
        default=None, metadata={"help": "Source stage: number of SVGD particles (prompts). Default 4."}
    )
    kernel_bandwidth: Optional[Union[str, float]] = field(
        default=None,
        metadata={"help": "Source stage: 'median' (median heuristic, the default) or a fixed RBF bandwidth h > 0."},
    )
    prior_scale: Optional[float] = field(
        default=None, metadata={"help": "Source stage: std of the Gaussian prior N(0, s^2 I) on prompts. Default 10."}
    )
    likelihood_scale: Optional[float] = field(
        default=None,
        metadata={
            "help": "Source stage: inverse temperature multiplying the mean loss in the log posterior. Default 1, "
            "departing from the paper's exact posterior (the data size N, which collapses the particles); scaling by "
            "the number of particles scored no better on SmolLM2 (docs/evidence.md#smollm2-claim-2)."
        },
    )
    particle_assignment: Optional[str] = field(
        default=None,
        metadata={
            "help": "Source stage: 'sharded' (example b -> particle b mod M, the default: one forward pass for all "
            "particles; departs from the SVGD authors, whose particles all see the whole batch) or 'replicated' "
            "(the authors': every particle sees every example, M times the cost; no accuracy difference measured on "
            "SmolLM2 at equal compute or equal data)."
        },
    )
    source_tasks: Optional[list[str]] = field(
        default=None, metadata={"help": "Source stage: the source task names, in task_ids order."}
    )
    posterior: Optional[str] = field(
        default=None, metadata={"help": "Target stage: local directory or Hub repo id of a source-stage adapter."}
    )
    posterior_revision: Optional[str] = field(
        default=None, metadata={"help": "Target stage: Hub revision of the posterior (branch, tag or commit)."}
    )
    target_init: Optional[str] = field(
        default=None,
        metadata={
            "help": "Target stage: 'mean' (default: the particles' mean; departs from the paper, no accuracy "
            "difference measured), 'particle:random' (the paper's: one particle drawn), 'particle:<k>' or 'sample'. "
            "Better than 'mean' on SmolLM2: the particle PromptLibrary.rank puts first on the target's examples "
            "(docs/methods/bayesian.md#start-from-the-best-particle)."
        },
    )
    regularization_weight: Optional[float] = field(
        default=None, metadata={"help": "Target stage: weight λ of λ/2 ||P - posterior mean||^2. Default 0.01."}
    )
    target_init_seed: Optional[int] = field(
        default=None,
        metadata={"help": "Target stage: seed of the random target_init draws (None: torch's global generator)."},
    )
    target_prompt: Optional[str] = field(
        default=None,
        metadata={
            "help": "Target stage: 'plain' (default, one prompt: departs from the paper, no accuracy difference "
            "measured) or 'decomposed' (the "
            "paper's S ⊙ (U V), S from the posterior, U V low rank and all ones at step 0)."
        },
    )
    decomposition_rank: Optional[int] = field(
        default=None,
        metadata={"help": "Target stage, target_prompt='decomposed': rank of U V. Default 1 (the paper's)."},
    )

    @property
    def takes_task_ids(self) -> bool:
        # a source posterior checks task_ids against source_tasks; a target has a single prompt
        return self.stage == "source" and self.source_tasks is not None

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = peft_type_for(BAYESIAN_PROMPT_TUNING)
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}.")
        own, other = (
            (SOURCE_DEFAULTS, TARGET_DEFAULTS) if self.stage == "source" else (TARGET_DEFAULTS, SOURCE_DEFAULTS)
        )
        other_fields = list(other) + (
            ["source_tasks"] if self.stage == "target" else ["posterior", "posterior_revision", "target_init_seed"]
        )
        misplaced = [name for name in other_fields if getattr(self, name) is not None]
        if misplaced:
            raise ValueError(
                f"{misplaced} {'is' if len(misplaced) == 1 else 'are'} not used with stage={self.stage!r}; remove "
                f"{'it' if len(misplaced) == 1 else 'them'} (the source stage takes {sorted(SOURCE_DEFAULTS)} and "
                f"source_tasks; the target stage takes posterior, posterior_revision, target_init_seed and "
                f"{sorted(TARGET_DEFAULTS)})."
            )
        for name, default in own.items():
            if getattr(self, name) is None:
                setattr(self, name, default)
        if self.stage == "source":
            self._check_source()
        else:
            self._check_target()

    def _check_source(self) -> None:
        m = self.num_particles
        if isinstance(m, bool) or not isinstance(m, int) or m <= 0:
            raise ValueError(f"num_particles must be a positive integer, got {m!r}.")
        if self.kernel_bandwidth != "median" and not (_is_number(self.kernel_bandwidth) and self.kernel_bandwidth > 0):
            raise ValueError(
                f"kernel_bandwidth must be 'median' (the median heuristic) or a positive number (a fixed bandwidth h "
                f"of exp(-||x - y||^2 / h)), got {self.kernel_bandwidth!r}."
            )
        for name in ("prior_scale", "likelihood_scale"):
            value = getattr(self, name)
            if not (_is_number(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}.")
        if self.particle_assignment not in PARTICLE_ASSIGNMENTS:
            raise ValueError(
                f"particle_assignment must be one of {PARTICLE_ASSIGNMENTS}, got {self.particle_assignment!r}."
            )
        if self.source_tasks is not None:
            tasks = list(self.source_tasks) if isinstance(self.source_tasks, (list, tuple)) else None
            if not tasks or not all(isinstance(t, str) and t for t in tasks) or len(set(tasks)) != len(tasks):
                raise ValueError(
                    "source_tasks must be a non-empty list of distinct task names in task_ids order (e.g. the keys "
                    f"passed to combine_tasks), got {self.source_tasks!r}."
                )
            self.source_tasks = tasks
        if self.prompt_tuning_init == PromptTuningInit.TEXT and m > 1 and self.particle_assignment == "replicated":
            raise ValueError(
                "prompt_tuning_init='TEXT' gives every particle the same prompt, and with "
                "particle_assignment='replicated' every particle also sees the same examples, so the particles would "
                "never separate (the kernel's gradient is zero between identical particles). Use "
                "prompt_tuning_init='SAMPLE_VOCAB' or 'RANDOM', or particle_assignment='sharded'."
            )

    def _check_target(self) -> None:
        if isinstance(self.posterior, os.PathLike):
            self.posterior = os.fspath(self.posterior)
        if not isinstance(self.posterior, str) or not self.posterior:
            raise ValueError(
                "stage='target' needs posterior: the directory where a source-stage model was saved "
                "(model.save_pretrained(...)) or its Hugging Face Hub repo id."
            )
        if self.posterior_revision is not None and not (
            isinstance(self.posterior_revision, str) and self.posterior_revision
        ):
            raise ValueError(
                f"posterior_revision must be a branch, tag or commit name, got {self.posterior_revision!r}."
            )
        parse_target_init(self.target_init)
        if self.target_init_seed is not None and (
            isinstance(self.target_init_seed, bool) or not isinstance(self.target_init_seed, int)
        ):
            raise ValueError(f"target_init_seed must be None or an integer, got {self.target_init_seed!r}.")
        if self.target_prompt not in TARGET_PROMPTS:
            raise ValueError(f"target_prompt must be one of {TARGET_PROMPTS}, got {self.target_prompt!r}.")
        rank = self.decomposition_rank
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"decomposition_rank must be a positive integer, got {rank!r}.")
        if not (_is_number(self.regularization_weight) and self.regularization_weight >= 0):
            raise ValueError(
                f"regularization_weight must be a finite number >= 0 (0 turns the regulariser off), got "
                f"{self.regularization_weight!r}."
            )
        if self.prompt_tuning_init != PromptTuningInit.RANDOM or self.prompt_tuning_init_text is not None:
            raise ValueError(
                "A target-stage prompt is initialised from the posterior (target_init), so prompt_tuning_init and "
                "prompt_tuning_init_text do not apply; remove them."
            )
