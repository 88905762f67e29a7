"""Bayesian multi-task prompt transfer: the prompt encoder of both stages, the posterior file, the gradient
transform that turns any torch optimizer into SVGD, and ensemble prediction with a posterior."""

from __future__ import annotations

import contextlib
import json
import os
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Union

import torch
from safetensors.torch import load_file
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ..base import TransferPromptEncoder, initial_prompt
from ..multitask import check_task_ids
from .config import BAYESIAN_PROMPT_TUNING, BayesianPromptConfig, parse_target_init
from .svgd import svgd_gradient

PARTICLES_KEY = "particles"
POSTERIOR_MEAN_KEY = "posterior_mean"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"

# ----------------------------------------------------------------------------------------------
# Gradient transforms applied once per optimizer step
# ----------------------------------------------------------------------------------------------

_STEP_TRANSFORM_ATTR = "_peft_prompt_transfer_step_transform"
_TRANSFORMED_ATTR = "_peft_prompt_transfer_transformed_grad"
_step_hook_handle = None


def register_pre_step_gradient_transform(
    parameter: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    """Have `parameter.grad` replaced by `transform(parameter.grad)` right before every optimizer step.

    The transform runs in a global torch optimizer step pre-hook, so it works with any `torch.optim.Optimizer`
    (and the transformers Trainer, which steps one) without changing the training loop, and it runs once per
    optimizer step, on the gradient accumulated over all micro-batches (and, under DDP, already averaged across
    processes). It runs after the Trainer's gradient clipping. A parameter whose `grad` is None (no backward pass
    since the last `zero_grad`) is left alone. Registering again replaces the transform.
    """
    global _step_hook_handle
    if _step_hook_handle is None:
        _step_hook_handle = register_optimizer_step_pre_hook(_apply_step_transforms)
    setattr(parameter, _STEP_TRANSFORM_ATTR, transform)


def _apply_step_transforms(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    for group in optimizer.param_groups:
        for param in group["params"]:
            transform = getattr(param, _STEP_TRANSFORM_ATTR, None)
            grad = param.grad
            if transform is None or grad is None:
                continue
            # A wrapper optimizer that steps an inner one, or a parameter in two optimizers, reaches this hook twice
            # for one gradient: transform it only once. Backward and zero_grad replace the grad or bump its version.
            done = getattr(param, _TRANSFORMED_ATTR, None)
            if done is not None and done[0]() is grad and done[1] == grad._version:
                continue
            with torch.no_grad():
                grad.copy_(transform(grad))  # in place: DDP's gradient buckets may be views of this tensor
            setattr(param, _TRANSFORMED_ATTR, (weakref.ref(grad), grad._version))


# ----------------------------------------------------------------------------------------------
# Particle assignment and replicated batches
# ----------------------------------------------------------------------------------------------


def assign_particles(batch_size: int, num_particles: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """The particle of each row of a batch: row `b` goes to particle `b mod M`.

    Round robin (rather than contiguous blocks) keeps the assignment the same when a batch is split into
    micro-batches whose size is a multiple of M (gradient accumulation, data parallelism), and it is exactly
    the layout of [`expand_for_particles`], whose row `b * M + m` is example `b` for particle `m`.
    """
    return torch.arange(batch_size, device=device) % num_particles


def _check_num_particles(num_particles: int) -> None:
    if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles <= 0:
        raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}.")


def expand_for_particles(batch: Mapping[str, Any], num_particles: int) -> dict[str, Any]:
    """Repeat every example of a batch M times in a row, so that every particle sees every example.

    Row `b * M + m` of the result is example `b`, and the encoder gives it to particle `m`
    ([`assign_particles`]), so one forward pass over the expanded batch evaluates all M particles on all
    examples. Every tensor whose first dimension is the batch size (`input_ids`, `attention_mask`, `labels`,
    `task_ids`, `decoder_input_ids`, ...) is expanded; other values are kept as they are.
    """
    _check_num_particles(num_particles)
    reference = batch.get("input_ids", batch.get("inputs_embeds"))
    if reference is None:
        raise ValueError(f"expand_for_particles needs input_ids or inputs_embeds in the batch, got keys {sorted(batch)}.")
    batch_size = reference.shape[0]
    return {
        key: value.repeat_interleave(num_particles, dim=0)
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch_size
        else value
        for key, value in batch.items()
    }


class ParticleReplicationCollator:
    """
    A data collator for `particle_assignment="replicated"`: collates a batch, then expands it M times
    ([`expand_for_particles`]).

    With `per_device_train_batch_size=B` the model sees `B * M` rows per step and every particle is trained on all
    B examples. peft calls the prompt encoder with the batch size only, so the expansion must happen before the
    model: in the collator, where the Trainer's saving, checkpointing and resuming are untouched.

    Args:
        num_particles (`int`): M, the config's `num_particles`.
        collator (`Callable`, *optional*): The collator to wrap; defaults to transformers' `default_data_collator`.
    """

    def __init__(self, num_particles: int, collator: Optional[Callable] = None):
        _check_num_particles(num_particles)
        if collator is None:
            from transformers import default_data_collator

            collator = default_data_collator
        self.num_particles = num_particles
        self.collator = collator

    def __call__(self, features: list) -> dict[str, Any]:
        return expand_for_particles(self.collator(features), self.num_particles)


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


# ----------------------------------------------------------------------------------------------
# The posterior file
# ----------------------------------------------------------------------------------------------


@dataclass
class Posterior:
    """The particles of a source-stage adapter and its config, as [`load_posterior`] reads them.

    Attributes:
        particles (`torch.Tensor`): `[num_particles, num_virtual_tokens, token_dim]`.
        config (`BayesianPromptConfig`): The source-stage config (`num_particles`, kernel, `source_tasks`, ...).
        location (`str`): Where it was loaded from.
    """

    particles: torch.Tensor
    config: BayesianPromptConfig
    location: str

    def mean(self) -> torch.Tensor:
        """The posterior mean prompt `[num_virtual_tokens, token_dim]`: the average of the particles."""
        return self.particles.mean(dim=0)

    def initial_prompt(self, target_init: str) -> torch.Tensor:
        """A target prompt `[num_virtual_tokens, token_dim]` as `target_init` says.

        `"mean"`: the posterior mean. `"particle:<k>"`: particle k. `"sample"`: a draw from the Gaussian with the
        particles' mean and per-entry variance (torch's global random generator; zero variance with one particle).
        """
        kind, index = parse_target_init(target_init)
        if kind == "mean":
            return self.mean()
        num_particles = self.particles.shape[0]
        if kind == "particle":
            if index >= num_particles:
                raise ValueError(
                    f"target_init={target_init!r}, but the posterior {self.location!r} has {num_particles} particles "
                    f"(indices 0..{num_particles - 1}). Choose one of them, or 'mean' or 'sample'."
                )
            return self.particles[index].clone()
        std = self.particles.std(dim=0) if num_particles > 1 else torch.zeros_like(self.particles[0])
        return self.mean() + std * torch.randn(std.shape, dtype=std.dtype)


def _posterior_file(posterior: str, revision: Optional[str], filename: str) -> str:
    if os.path.isdir(posterior):
        path = os.path.join(posterior, filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"The posterior directory {posterior!r} has no {filename}. Save the source-stage model there with "
                "model.save_pretrained(directory), or point BayesianPromptConfig(posterior=...) at the directory that "
                "holds its adapter_config.json and adapter_model.safetensors."
            )
        return path
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id=posterior, filename=filename, revision=revision)
    except Exception as exc:  # offline, unknown repo, invalid id, missing file: all mean "not found here"
        at_revision = f" at revision {revision!r}" if revision else ""
        raise FileNotFoundError(
            f"Cannot find the posterior {posterior!r}: it is not a local directory, and downloading {filename} from "
            f"the Hugging Face Hub repo {posterior!r}{at_revision} failed ({type(exc).__name__}: {exc}). Set "
            "BayesianPromptConfig(posterior=...) to the directory where the source-stage model was saved "
            "(model.save_pretrained(directory)) or to a Hub repo id that is reachable (check the name, the network "
            "and HF_HUB_OFFLINE)."
        ) from exc


def load_posterior(posterior: Union[str, os.PathLike], revision: Optional[str] = None) -> Posterior:
    """Read the particles and config of a source-stage adapter from a local directory or a Hub repo id.

    Only safetensors is read (never pickle). Raises `FileNotFoundError` naming what was tried when the posterior
    cannot be found, and `ValueError` when the files are not a source-stage posterior or do not agree (a particles
    tensor whose shape is not the config's `[num_particles, num_virtual_tokens, token_dim]`).
    """
    posterior = os.fspath(posterior)
    with open(_posterior_file(posterior, revision, ADAPTER_CONFIG_NAME), encoding="utf-8") as f:
        config_dict = json.load(f)
    peft_type, stage = config_dict.get("peft_type"), config_dict.get("stage")
    if peft_type != BAYESIAN_PROMPT_TUNING or stage != "source":
        found = f"a {peft_type} adapter" + (f" of stage {stage!r}" if stage else "")
        raise ValueError(
            f"The posterior {posterior!r} holds {found}, not a source-stage {BAYESIAN_PROMPT_TUNING} posterior. Point "
            "posterior at a model trained and saved with BayesianPromptConfig(stage='source')."
        )
    fields = BayesianPromptConfig.__dataclass_fields__
    config = BayesianPromptConfig(**{key: value for key, value in config_dict.items() if key in fields})
    weights = load_file(_posterior_file(posterior, revision, ADAPTER_WEIGHTS_NAME))
    if PARTICLES_KEY not in weights:
        raise ValueError(
            f"The posterior {posterior!r} has no {PARTICLES_KEY!r} tensor in {ADAPTER_WEIGHTS_NAME} (found "
            f"{sorted(weights)[:8]}); the file is damaged or was not written by a source-stage model. Save the "
            "source-stage model again with model.save_pretrained(directory)."
        )
    particles = weights[PARTICLES_KEY]
    expected = (config.num_particles, config.num_virtual_tokens, config.token_dim)
    if tuple(particles.shape) != expected:
        raise ValueError(
            f"The posterior {posterior!r} holds particles of shape {list(particles.shape)}, but its "
            f"{ADAPTER_CONFIG_NAME} describes {list(expected)} (num_particles, num_virtual_tokens, token_dim): the "
            "weights and the config do not belong together. Save the source-stage model again with "
            "model.save_pretrained(directory)."
        )
    return Posterior(particles=particles.float(), config=config, location=posterior)


# ----------------------------------------------------------------------------------------------
# The encoder
# ----------------------------------------------------------------------------------------------


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
    transform runs once per optimizer step ([`register_pre_step_gradient_transform`]), on the gradient summed over
    gradient-accumulation micro-batches, so the prior and repulsive terms are counted once however many
    micro-batches there are. Under DDP it runs on the gradient DDP has already averaged across processes, with
    particles that are identical on every process, so every process computes the same update. (The transform is
    affine in the loss gradient, so this equals averaging per-process transforms; the prior and repulsive terms,
    which do not depend on the data, are added exactly once.)

    **Target stage.** `embedding.weight` holds one prompt `P`, initialised from the posterior (`target_init`);
    before each optimizer step `regularization_weight * (P - mean)` is added to its gradient: the gradient of
    `regularization_weight / 2 * ||P - mean||^2`, counted once per step. The posterior mean is kept in the
    `posterior_mean` buffer and saved with the adapter, so a resumed run keeps its anchor.

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
                with torch.no_grad():
                    self.embedding.weight.copy_(posterior.initial_prompt(config.target_init))
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
        self._check_task_ids(task_ids, batch_size)
        weight = self.embedding.weight
        if self.config.stage == "target":
            return weight.unsqueeze(0).expand(batch_size, -1, -1)
        num_particles = weight.shape[0]
        if not (self.training or self._one_particle_per_row):  # inference: the posterior mean for every row
            return weight.mean(dim=0).unsqueeze(0).expand(batch_size, -1, -1)
        training = self.training and weight.requires_grad
        if training:
            self._register_step_transform()  # again: a deep copy of this encoder has a fresh parameter
            if self.config.particle_assignment == "replicated" and batch_size % num_particles:
                raise ValueError(
                    f"particle_assignment='replicated' needs each example repeated num_particles={num_particles} "
                    f"times, but the batch has {batch_size} rows. Pass "
                    f"data_collator=ParticleReplicationCollator({num_particles}, your_collator) to the Trainer (or "
                    "expand_for_particles(batch, num_particles) in your own loop)."
                )
        rows = assign_particles(batch_size, num_particles, weight.device)
        prompts = weight.index_select(0, rows)
        if batch_size % num_particles and torch.is_grad_enabled() and weight.requires_grad:
            # Particle j has n_j of the B rows; scaling its rows' gradient by B / (M n_j) makes M * dLoss/dP_j the
            # gradient of its own mean loss, as svgd_gradient assumes, instead of weighting it by n_j.
            counts = torch.bincount(rows, minlength=num_particles).to(prompts.dtype)
            scale = (batch_size / (num_particles * counts))[rows].view(-1, 1, 1)
            prompts = _ScaleGradient.apply(prompts, scale)
        return prompts

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
        weight = self.embedding.weight
        if getattr(getattr(weight, _STEP_TRANSFORM_ATTR, None), "__self__", None) is not self:
            register_pre_step_gradient_transform(weight, self.transform_gradient)

    def transform_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """The gradient the optimizer should see, from the accumulated loss gradient `grad` of `embedding.weight`.

        Source: `-phi`, the SVGD direction ([`svgd_gradient`]). Target: `grad + regularization_weight * (P - mean)`.
        Called automatically right before each optimizer step; call it yourself only if you update the parameters
        without a `torch.optim.Optimizer`.
        """
        weight = self.embedding.weight
        if not torch.isfinite(grad).all():
            # raised before the optimizer steps: the prompts keep their last finite values
            raise FloatingPointError(
                f"The {BAYESIAN_PROMPT_TUNING} prompt gradient has NaN or inf entries (the loss was probably not "
                "finite), so the optimizer step was stopped and the prompts are unchanged. Lower the learning rate or "
                "likelihood_scale, train in float32, or check the batch for empty or invalid labels."
            )
        if self.config.stage == "source":
            return svgd_gradient(
                weight,
                grad,
                likelihood_scale=self.config.likelihood_scale,
                prior_scale=self.config.prior_scale,
                bandwidth=self.config.kernel_bandwidth,
            )
        anchor = self.posterior_mean.to(device=weight.device, dtype=weight.dtype)
        return grad + self.config.regularization_weight * (weight.detach() - anchor)

    # -- saving and loading -----------------------------------------------------------------------

    @torch.no_grad()
    def inference_prompt(self, task: Optional[Union[int, str]] = None) -> torch.Tensor:
        if task is not None:
            raise ValueError(f"{BAYESIAN_PROMPT_TUNING} has a single (shared) prompt; call without `task`.")
        if self.config.stage == "source":  # a plain prompt-tuning adapter can only hold one prompt: the mean
            return self.mean()
        return self.embedding.weight.detach().clone()

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        state = {"prompt_embeddings": self.inference_prompt()}
        if self.config.stage == "source":
            state[PARTICLES_KEY] = self.embedding.weight.detach().clone()
        elif self.posterior_mean is not None:
            state[POSTERIOR_MEAN_KEY] = self.posterior_mean.detach().clone()
        return state

    def check_adapter_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        if self.config.stage == "target":
            super().check_adapter_state_dict(state_dict)
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
        self.embedding.weight.copy_(state_dict["prompt_embeddings"])
        if self.posterior_mean is not None and POSTERIOR_MEAN_KEY in state_dict:
            # the anchor the run started with, even if the posterior directory has changed since
            self.posterior_mean.copy_(state_dict[POSTERIOR_MEAN_KEY])

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


# ----------------------------------------------------------------------------------------------
# Ensemble prediction
# ----------------------------------------------------------------------------------------------


@dataclass
class EnsemblePrediction:
    """
    The posterior predictive of a source-stage model: its M particles' predictions and their average.

    For classification the distribution is over labels; for causal LMs it is the next-token distribution after the
    last non-padding token of each row; for seq2seq LMs it is the next decoder token after `decoder_input_ids`.

    Attributes:
        probs (`torch.Tensor`): `[batch, classes]`, the average over particles of their predicted distributions.
        particle_probs (`torch.Tensor`): `[batch, M, classes]`, each particle's distribution.
        entropy (`torch.Tensor`): `[batch]`, the predictive entropy `H[probs]` in nats: the total uncertainty.
        mutual_information (`torch.Tensor`): `[batch]`, `H[probs] - mean_m H[particle_probs[:, m]]`: the part of the
            uncertainty that comes from the particles disagreeing (epistemic uncertainty; 0 with one particle).
    """

    probs: torch.Tensor
    particle_probs: torch.Tensor
    entropy: torch.Tensor
    mutual_information: torch.Tensor


def _last_positions(mask: Optional[torch.Tensor], length: int, rows: int, device) -> torch.Tensor:
    """Index of the last non-padding position of each row (left or right padding)."""
    if mask is None:
        return torch.full((rows,), length - 1, device=device)
    return (length - 1) - mask.flip(dims=[1]).argmax(dim=1)


def ensemble_predict(model, inputs: Mapping[str, Any], adapter_name: Optional[str] = None) -> EnsemblePrediction:
    """Average the predictions of a source-stage model's M particles in one batched forward pass.

    The batch is expanded M times ([`expand_for_particles`]) so that particle m predicts every example, under
    `torch.no_grad()`; call `model.eval()` first if the base model has dropout.

    Args:
        model (`PeftModel`): A model whose adapter is a source-stage `BAYESIAN_PROMPT_TUNING` posterior (for
            example `PeftModel.from_pretrained(base, posterior_dir)`), for `SEQ_CLS`, `CAUSAL_LM` or `SEQ_2_SEQ_LM`.
        inputs (`Mapping`): The model inputs (`input_ids`, `attention_mask`, ...); `labels` are ignored. For seq2seq
            models, `decoder_input_ids` default to the decoder start token.
        adapter_name (`str`, *optional*): The adapter; defaults to the active one.

    Returns:
        An [`EnsemblePrediction`].
    """
    adapter_name = adapter_name or model.active_adapter
    config = model.peft_config[adapter_name]
    encoder = model.prompt_encoder[adapter_name] if hasattr(model, "prompt_encoder") else None
    if not isinstance(encoder, BayesianPromptEncoder) or config.stage != "source":
        raise ValueError(
            f"ensemble_predict needs a source-stage {BAYESIAN_PROMPT_TUNING} adapter (a posterior), but adapter "
            f"{adapter_name!r} is {getattr(config, 'peft_type', None)}"
            + (f" of stage {config.stage!r}" if isinstance(encoder, BayesianPromptEncoder) else "")
            + ". Load the posterior with PeftModel.from_pretrained(base_model, posterior_dir)."
        )
    task_type = getattr(config.task_type, "value", config.task_type)
    if task_type not in ("SEQ_CLS", "CAUSAL_LM", "SEQ_2_SEQ_LM"):
        raise ValueError(f"ensemble_predict supports SEQ_CLS, CAUSAL_LM and SEQ_2_SEQ_LM models, not {task_type}.")
    num_particles = encoder.num_particles
    batch = {key: value for key, value in inputs.items() if key != "labels"}
    reference = batch.get("input_ids", batch.get("inputs_embeds"))
    if task_type == "SEQ_2_SEQ_LM" and batch.get("decoder_input_ids") is None and batch.get("decoder_inputs_embeds") is None:
        start = model.config.decoder_start_token_id
        batch["decoder_input_ids"] = torch.full((reference.shape[0], 1), start, device=reference.device)
    with torch.no_grad(), encoder.one_particle_per_row():
        logits = model(**expand_for_particles(batch, num_particles)).logits
    rows = logits.shape[0]
    if task_type == "CAUSAL_LM":  # logits cover the virtual tokens first, then the input
        mask = batch.get("attention_mask")
        length = reference.shape[1]
        positions = config.num_virtual_tokens + _last_positions(mask, length, reference.shape[0], logits.device)
        logits = logits[torch.arange(rows, device=logits.device), positions.repeat_interleave(num_particles)]
    elif task_type == "SEQ_2_SEQ_LM":
        decoder_mask = batch.get("decoder_attention_mask")
        positions = _last_positions(decoder_mask, logits.shape[1], reference.shape[0], logits.device)
        logits = logits[torch.arange(rows, device=logits.device), positions.repeat_interleave(num_particles)]
    particle_probs = logits.float().softmax(dim=-1).view(-1, num_particles, logits.shape[-1])
    probs = particle_probs.mean(dim=1)
    entropy = torch.special.entr(probs).sum(dim=-1)
    expected_entropy = torch.special.entr(particle_probs).sum(dim=-1).mean(dim=1)
    return EnsemblePrediction(
        probs=probs,
        particle_probs=particle_probs,
        entropy=entropy,
        mutual_information=(entropy - expected_entropy).clamp_min(0.0),
    )
