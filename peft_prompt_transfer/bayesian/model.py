"""The prompt encoder of Bayesian multi-task prompt transfer (both stages): the particles of the source stage, the
prompt of the target stage, the SVGD / anchor gradient transform and saving and loading the adapter."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Optional, Union

import torch
from torch import nn

from ..base import TransferPromptEncoder, full_tensor, initial_prompt
from ..multitask import check_task_ids
from .config import BAYESIAN_PROMPT_TUNING, BayesianPromptConfig
from .decomposition import anchor_gradients, initial_task_factors
from .particles import assign_particles
from .posterior import PARTICLES_KEY, Posterior, load_posterior
from .step_transform import _STEP_TRANSFORM_ATTR, register_module_pre_step_gradient_transform
from .svgd import svgd_gradient

POSTERIOR_MEAN_KEY = "posterior_mean"
# a decomposed target's training state (its prompt_embeddings is the product S ⊙ (U V))
SHARED_PROMPT_KEY = "shared_prompt"
TASK_COLS_KEY = "task_cols"
TASK_ROWS_KEY = "task_rows"


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `scale` in backward."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(scale)
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (scale,) = ctx.saved_tensors
        return grad * scale, None


class ParticleEmbedding(nn.Module):
    """The M prompts of the source stage as one `[M, num_virtual_tokens, token_dim]` parameter, `weight`.

    It is named `embedding` on the encoder, where peft's own code looks for the prompt parameter.
    """

    def __init__(self, num_particles: int, num_tokens: int, token_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_particles, num_tokens, token_dim))

    def extra_repr(self) -> str:
        return "num_particles={}, num_virtual_tokens={}, token_dim={}".format(*self.weight.shape)


class BayesianPromptEncoder(TransferPromptEncoder):
    """
    The prompt encoder of Bayesian multi-task prompt transfer (both stages).

    **Source stage.** `embedding.weight` holds the M particles `[M, num_virtual_tokens, token_dim]`. In train mode
    `forward` gives row `b` of the batch the prompt of particle `b mod M` (one forward pass for all particles). Right before
    each optimizer step the particles' gradient is replaced by the SVGD direction ([`svgd_gradient`]):

        phi(P_i) = 1/M sum_j [ k(P_j, P_i) grad log p(P_j) + grad_{P_j} k(P_j, P_i) ],
        grad log p(P_j) = -likelihood_scale * M * dLoss/dP_j - P_j / prior_scale^2,

    and the optimizer sees `-phi`. `dLoss/dP_j` is the gradient of the model's mean loss over the batch, in which
    particle j owns 1/M of the rows, so `M * dLoss/dP_j` is the gradient of particle j's own mean loss (when the
    batch size is not a multiple of M, `forward` rescales each particle's rows so this still holds). The
    transform runs once per optimizer step ([`register_module_pre_step_gradient_transform`]), on the gradient summed over
    gradient-accumulation micro-batches, so the prior and repulsive terms are counted once however many
    micro-batches there are. Under DDP it runs on the gradient DDP has already averaged across processes, with
    particles that are identical on every process, so every process computes the same update. (The transform is
    affine in the loss gradient, so this equals averaging per-process transforms; the prior and repulsive terms,
    which do not depend on the data, are added exactly once.) Under FSDP2, which shards the particles across
    processes, every process gathers the whole reduced gradient and the whole particle matrix, computes the same
    update and keeps its own shard of it.

    **Target stage.** `embedding.weight` holds one prompt `P`, initialised from the posterior (`target_init`);
    before each optimizer step `regularization_weight * (P - mean)` is added to its gradient: the gradient of
    `regularization_weight / 2 * ||P - mean||^2`, counted once per step. The posterior mean is kept in the
    `posterior_mean` buffer and saved with the adapter, so a resumed run keeps its anchor. With
    `target_prompt="decomposed"`, `embedding.weight` holds `S` and `task_cols`, `task_rows` hold `U`, `V`; the
    prompt is `P = S ⊙ (U V)` and the regulariser's gradient with respect to each of the three
    ([`anchor_gradients`]) is added to its gradient before each step. The regulariser is on `P`, the prompt the
    model sees, rather than on `S` alone: on `S` alone `U V` could move `P` away from the posterior unchecked.

    **Inference.** In eval mode (`model.eval()`, as `Trainer.evaluate`, pipelines and `generate` after it run) a
    source posterior gives every row the posterior mean, the prompt `export_prompt_tuning` writes: predictions are
    deterministic and do not depend on a row's position in the batch, the batch size or beam search. Assigning rows
    to particles is a training device; for the posterior predictive (the particles' average and its uncertainty)
    use [`ensemble_predict`], which shows every example to every particle.

    In inference mode (`PeftModel.from_pretrained` without `is_trainable=True`) the encoder holds only what is
    saved: the particles (source) or the prompt (target); a target adapter then does not need its posterior.

    Args:
        config ([`BayesianPromptConfig`]): The configuration.
        word_embeddings (`torch.nn.Module`): The base model's word embeddings (for prompt initialisation).

    Input: `batch_size` and optional `task_ids` (source stage, checked against `source_tasks`).
    Output shape: `(batch_size, num_virtual_tokens, token_dim)`.
    """

    def __init__(self, config: BayesianPromptConfig, word_embeddings: nn.Module):
        super().__init__(config, word_embeddings)
        num_tokens, token_dim = config.num_virtual_tokens, config.token_dim
        self.posterior_mean: Optional[torch.Tensor]
        # a decomposed target's low-rank factors U, V; only while training (inference needs only the saved product)
        self.task_cols: Optional[nn.Parameter] = None
        self.task_rows: Optional[nn.Parameter] = None
        if config.stage == "source":
            self.embedding = ParticleEmbedding(config.num_particles, num_tokens, token_dim)
            self.register_buffer("posterior_mean", None)
            if not config.inference_mode:
                with torch.no_grad():
                    for particle in self.embedding.weight:  # each particle draws its own initial prompt
                        particle.copy_(initial_prompt(config, word_embeddings, num_tokens))
        else:
            self.embedding = nn.Embedding(num_tokens, token_dim)
            if config.inference_mode:
                self.register_buffer("posterior_mean", None)
            else:
                posterior = load_posterior(config.posterior, config.posterior_revision)
                self._check_posterior_fits(posterior)
                seed = config.target_init_seed
                generator = None if seed is None else torch.Generator().manual_seed(seed)
                with torch.no_grad():
                    self.embedding.weight.copy_(posterior.initial_prompt(config.target_init, generator))
                if config.target_prompt == "decomposed":
                    cols, rows = initial_task_factors(num_tokens, token_dim, config.decomposition_rank, generator)
                    self.task_cols, self.task_rows = nn.Parameter(cols), nn.Parameter(rows)
                self.register_buffer("posterior_mean", posterior.mean(), persistent=False)
        if not config.inference_mode:
            self._register_step_transform()
        self._one_particle_per_row = False

    # -- stage-independent views ------------------------------------------------------------------

    @property
    def num_particles(self) -> int:
        """M for the source stage; 1 for the target stage."""
        return self.embedding.weight.shape[0] if self.config.stage == "source" else 1

    @property
    def particles(self) -> torch.Tensor:
        """The source stage's particles `[M, num_virtual_tokens, token_dim]` (the trainable parameter itself)."""
        if self.config.stage != "source":
            raise ValueError("A target-stage adapter has one prompt, not particles; use inference_prompt().")
        return self.embedding.weight

    def mean(self) -> torch.Tensor:
        """The posterior mean prompt `[num_virtual_tokens, token_dim]` (source: of the particles; target: the anchor)."""
        if self.config.stage == "source":
            return self.embedding.weight.detach().mean(dim=0)
        if self.posterior_mean is None:
            raise ValueError(
                "This target-stage adapter was loaded for inference, which does not read its posterior. Load it with "
                "is_trainable=True, or read the posterior itself with load_posterior(config.posterior)."
            )
        return self.posterior_mean.clone()

    # -- forward ----------------------------------------------------------------------------------

    def forward(self, batch_size: int, task_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        prompts, rows = self._prompts_and_rows(batch_size, task_ids)
        if rows is None:
            return prompts.expand(batch_size, -1, -1)
        scale = self._particle_gradient_scale(rows, prompts)
        prompts = prompts.index_select(0, rows)
        if scale is not None:
            prompts = _ScaleGradient.apply(prompts, scale[rows].view(-1, 1, 1))
        return prompts

    def distinct_prompts(
        self, batch_size: int, task_ids: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        prompts, rows = self._prompts_and_rows(batch_size, task_ids)
        if rows is None:
            return prompts, torch.zeros(batch_size, dtype=torch.long, device=prompts.device)
        scale = self._particle_gradient_scale(rows, prompts)
        prompts = prompts[: min(batch_size, prompts.shape[0])]  # particles with at least one row
        if scale is not None:  # per particle: the same factor on each of its rows' gradients
            prompts = _ScaleGradient.apply(prompts, scale[: prompts.shape[0]].view(-1, 1, 1))
        return prompts, rows

    def num_distinct_prompts(self, batch_size: int, task_ids: Optional[torch.Tensor] = None) -> int:
        one_per_particle = self.config.stage == "source" and (self.training or self._one_particle_per_row)
        return min(batch_size, self.num_particles) if one_per_particle else 1

    def _prompts_and_rows(
        self, batch_size: int, task_ids: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The prompts of this forward, and each row's particle (None: the one prompt serves every row)."""
        self._check_task_ids(task_ids, batch_size)
        weight = self.embedding.weight
        training = self.training and weight.requires_grad
        if training:
            self._register_step_transform()  # again: a deep copy of this encoder has a fresh parameter
        if self.config.stage == "target":
            return self._target_prompt().unsqueeze(0), None
        num_particles = weight.shape[0]
        if not (self.training or self._one_particle_per_row):  # inference: the posterior mean for every row
            return weight.mean(dim=0).unsqueeze(0), None
        if training and self.config.particle_assignment == "replicated" and batch_size % num_particles:
            raise ValueError(
                f"particle_assignment='replicated' needs each example repeated num_particles={num_particles} "
                f"times, but the batch has {batch_size} rows. Pass "
                f"data_collator=ParticleReplicationCollator({num_particles}, your_collator) to the Trainer (or "
                "expand_for_particles(batch, num_particles) in your own loop)."
            )
        return weight, assign_particles(batch_size, num_particles, weight.device)

    @staticmethod
    def _particle_gradient_scale(rows: torch.Tensor, particles: torch.Tensor) -> Optional[torch.Tensor]:
        """Each particle's gradient factor when the batch does not split evenly (None when it does, or no gradient).

        Particle j has n_j of the B rows; scaling its rows' gradient by B / (M n_j) makes M * dLoss/dP_j the gradient
        of its own mean loss, as svgd_gradient assumes, instead of weighting it by n_j.
        """
        batch_size, num_particles = rows.shape[0], particles.shape[0]
        if not batch_size % num_particles or not (torch.is_grad_enabled() and particles.requires_grad):
            return None
        counts = torch.bincount(rows, minlength=num_particles).to(particles.dtype)
        return batch_size / (num_particles * counts)

    def _target_prompt(self) -> torch.Tensor:
        """The target stage's prompt: `embedding.weight`, or `S ⊙ (U V)` when decomposed."""
        if self.task_cols is None:
            return self.embedding.weight
        return self.embedding.weight * (self.task_cols @ self.task_rows)

    @contextlib.contextmanager
    def one_particle_per_row(self) -> Iterator[None]:
        """Within this context, row `b` gets particle `b mod M` in eval mode too (as in training)."""
        previous, self._one_particle_per_row = self._one_particle_per_row, True
        try:
            yield
        finally:
            self._one_particle_per_row = previous

    def _check_task_ids(self, task_ids: Optional[torch.Tensor], batch_size: int) -> None:
        if task_ids is None:
            return
        if self.config.stage == "target":
            raise ValueError(
                f"A target-stage {BAYESIAN_PROMPT_TUNING} adapter has a single prompt and takes no task_ids; remove "
                "the `task_ids` argument/column."
            )
        if self.config.source_tasks is None:
            raise ValueError(
                "task_ids were given, but this config has no source_tasks to check them against. Set "
                "BayesianPromptConfig(source_tasks=[...]) to the task names in task_ids order (the keys passed to "
                "combine_tasks), or drop the task_ids column. The posterior is shared by all tasks either way."
            )
        check_task_ids(task_ids, batch_size, len(self.config.source_tasks), BAYESIAN_PROMPT_TUNING)

    # -- the gradient transform -------------------------------------------------------------------

    def _register_step_transform(self) -> None:
        if hasattr(self.embedding.weight, "ds_id"):
            # ZeRO-3 steps its own flat fp32 partitions, never this parameter: the transform would silently not run
            raise NotImplementedError(
                f"Training a {BAYESIAN_PROMPT_TUNING} adapter under DeepSpeed ZeRO-3 is not supported: ZeRO-3's "
                "optimizer steps flattened partitions of the prompt parameters, where the SVGD (source stage) or "
                "anchor (target stage) gradient transform cannot run, so training would silently skip it. Train with "
                "DDP or FSDP2 (see 'Scaling out' in the docs); ZeRO-3 works for inference and for the other methods."
            )
        transforms = [(self.embedding, "weight", self.transform_gradient)]
        if self.task_cols is not None:
            transforms += [(self, "task_cols", self._task_cols_gradient), (self, "task_rows", self._task_rows_gradient)]
        for module, name, transform in transforms:
            if getattr(getattr(getattr(module, name), _STEP_TRANSFORM_ATTR, None), "__self__", None) is not self:
                register_module_pre_step_gradient_transform(module, name, transform)

    def _check_finite(self, grad: torch.Tensor) -> None:
        if not torch.isfinite(grad).all():
            # raised before the optimizer steps: the prompts keep their last finite values
            raise FloatingPointError(
                f"The {BAYESIAN_PROMPT_TUNING} prompt gradient has NaN or inf entries (the loss was probably not "
                "finite), so the optimizer step was stopped and the prompts are unchanged. Lower the learning rate or "
                "likelihood_scale, train in float32, or check the batch for empty or invalid labels."
            )

    def _anchor_gradients(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The regulariser's gradients with respect to `S`, `U` and `V` of a decomposed target."""
        # whole tensors: under FSDP2 each parameter is a shard (the transform is given the whole gradient)
        shared = full_tensor(self.embedding.weight).detach()
        anchor = self.posterior_mean.to(device=shared.device, dtype=shared.dtype)
        return anchor_gradients(
            shared,
            full_tensor(self.task_cols).detach(),
            full_tensor(self.task_rows).detach(),
            anchor,
            self.config.regularization_weight,
        )

    def _task_cols_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        self._check_finite(grad)
        return grad + self._anchor_gradients()[1]

    def _task_rows_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        self._check_finite(grad)
        return grad + self._anchor_gradients()[2]

    def transform_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """The gradient the optimizer should see, from the accumulated loss gradient `grad` of `embedding.weight`.

        Source: `-phi`, the SVGD direction ([`svgd_gradient`]). Target: `grad + regularization_weight * (P - mean)`
        (decomposed: the regulariser's gradient with respect to `S`, [`anchor_gradients`]). Called automatically
        right before each optimizer step; call it yourself only if you update the parameters without a
        `torch.optim.Optimizer`. Under FSDP2, `grad` is the whole gradient and the particles are gathered too (see
        [`register_pre_step_gradient_transform`]).
        """
        weight = full_tensor(self.embedding.weight)
        self._check_finite(grad)
        if self.config.stage == "source":
            return svgd_gradient(
                weight,
                grad,
                likelihood_scale=self.config.likelihood_scale,
                prior_scale=self.config.prior_scale,
                bandwidth=self.config.kernel_bandwidth,
            )
        if self.task_cols is not None:
            return grad + self._anchor_gradients()[0]
        anchor = self.posterior_mean.to(device=weight.device, dtype=weight.dtype)
        return grad + self.config.regularization_weight * (weight.detach() - anchor)

    # -- saving and loading -----------------------------------------------------------------------

    @torch.no_grad()
    def inference_prompt(self, task: Optional[Union[int, str]] = None) -> torch.Tensor:
        if task is not None:
            raise ValueError(f"{BAYESIAN_PROMPT_TUNING} has a single (shared) prompt; call without `task`.")
        if self.config.stage == "source":  # a plain prompt-tuning adapter can only hold one prompt: the mean
            return self.mean()
        return self._target_prompt().detach().clone()

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        state = {"prompt_embeddings": self.inference_prompt()}
        if self.config.stage == "source":
            state[PARTICLES_KEY] = self.embedding.weight.detach().clone()
        elif self.posterior_mean is not None:
            state[POSTERIOR_MEAN_KEY] = self.posterior_mean.detach().clone()
        if self.task_cols is not None:
            state[SHARED_PROMPT_KEY] = self.embedding.weight.detach().clone()
            state[TASK_COLS_KEY] = self.task_cols.detach().clone()
            state[TASK_ROWS_KEY] = self.task_rows.detach().clone()
        return state

    def check_adapter_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        if self.config.stage == "target":
            super().check_adapter_state_dict(state_dict)
            if self.task_cols is not None:
                self._check_decomposition_state(state_dict)
            return
        if PARTICLES_KEY not in state_dict:
            raise ValueError(
                f"The adapter weights have no {PARTICLES_KEY!r} tensor (found {sorted(state_dict)[:8]}), so they are "
                f"not a source-stage {BAYESIAN_PROMPT_TUNING} posterior. Load them with the adapter_config.json they "
                "were saved with, or save the source-stage model again with model.save_pretrained(...)."
            )
        found, expected = tuple(state_dict[PARTICLES_KEY].shape), tuple(self.embedding.weight.shape)
        if found != expected:
            what = (
                f"{found[0]} particles but this config has num_particles={expected[0]}"
                if len(found) == 3 and found[1:] == expected[1:]
                else f"particles of shape {list(found)} but this model expects {list(expected)} (num_particles, "
                f"num_virtual_tokens, token_dim={self.config.token_dim})"
            )
            raise ValueError(
                f"The saved posterior holds {what}. Load it with the adapter_config.json it was saved with (and onto "
                "the base model named there as base_model_name_or_path)."
            )

    @torch.no_grad()
    def load_adapter_state(self, state_dict: dict[str, torch.Tensor]) -> None:
        if self.config.stage == "source":
            self.embedding.weight.copy_(state_dict[PARTICLES_KEY])
            return
        if self.task_cols is not None:
            self.embedding.weight.copy_(state_dict[SHARED_PROMPT_KEY])
            self.task_cols.copy_(state_dict[TASK_COLS_KEY])
            self.task_rows.copy_(state_dict[TASK_ROWS_KEY])
        else:  # a plain target (or a decomposed one continued as plain): the prompt the model saw
            self.embedding.weight.copy_(state_dict["prompt_embeddings"])
        if self.posterior_mean is not None and POSTERIOR_MEAN_KEY in state_dict:
            # the anchor the run started with, even if the posterior directory has changed since
            self.posterior_mean.copy_(state_dict[POSTERIOR_MEAN_KEY])

    def _check_decomposition_state(self, state_dict: dict[str, torch.Tensor]) -> None:
        keys = (SHARED_PROMPT_KEY, TASK_COLS_KEY, TASK_ROWS_KEY)
        if not all(key in state_dict for key in keys):
            raise ValueError(
                f"This target has target_prompt='decomposed', but the adapter weights have no {list(keys)} (found "
                f"{sorted(state_dict)[:8]}): they were saved by a plain target or for inference. Load them with the "
                "adapter_config.json they were saved with, or train a plain target (target_prompt='plain') from them."
            )
        expected = {
            key: tuple(t.shape) for key, t in zip(keys, (self.embedding.weight, self.task_cols, self.task_rows))
        }
        found = {key: tuple(state_dict[key].shape) for key in keys}
        if found != expected:
            raise ValueError(
                f"The saved decomposition has shapes {found}, but this config expects {expected} "
                f"(decomposition_rank={self.config.decomposition_rank}). Load it with the adapter_config.json it was "
                "saved with."
            )

    def _check_posterior_fits(self, posterior: Posterior) -> None:
        found = tuple(posterior.particles.shape[1:])
        expected = (self.config.num_virtual_tokens, self.config.token_dim)
        if found != expected:
            raise ValueError(
                f"The posterior {posterior.location!r} has prompts of shape {list(found)} (num_virtual_tokens, "
                f"token_dim), but this target needs {list(expected)}. Set num_virtual_tokens="
                f"{posterior.config.num_virtual_tokens} and use the base model the posterior was trained on "
                f"({posterior.config.base_model_name_or_path!r}, hidden size {posterior.config.token_dim})."
            )
