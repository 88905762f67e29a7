"""The benchmark methods: one `Method` entry per method in `METHODS`, with the builder of its model.

An entry says everything the benchmarks need to know about a method: how a run builds its model (`build` for one
task, `joint_config` for several trained together), how it is optimised, which claim of the causal-LM suites
compares it and against what (`claim`, `compared_with`), which source stage it starts from, and how the report
names it. Adding a method means adding its builder and its entry; the suites plan it, the runner trains it and the
report tables it from there. The MiniLM suites (`quick`, `full`) keep the design they were recorded with and name
their methods themselves (`benchmarks.suites.plans`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Optional

import torch
from peft import MultitaskPromptTuningConfig, PeftConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model

import peft_prompt_transfer as ppt
from benchmarks.core.backbone import Backbone
from benchmarks.core.sources import ensure_source, source_prompts
from benchmarks.core.specs import (
    COMPT_ROUTER_LR,
    DECOMPOSED_TASK_LR,
    HEAD_LR,
    RESIDUAL_BOTTLENECK,
    RunSpec,
    SourceSpec,
)
from benchmarks.core.tasks import TASKS
from benchmarks.core.training import prompt_and_head_optimizer

# (backbone, spec, base model, encoded training set) -> (the model to train, details recorded with the run)
Builder = Callable[[Backbone, RunSpec, torch.nn.Module, Any], tuple[torch.nn.Module, dict]]
# (backbone, spec) -> the peft config of one model trained on all of `spec.tasks` at once
JointConfig = Callable[[Backbone, RunSpec], PeftConfig]
# (model, learning rate) -> the optimizer
OptimizerFactory = Callable[[torch.nn.Module, float], torch.optim.Optimizer]


def _vocab_init(spec: RunSpec) -> dict:
    return {"prompt_tuning_init": "SAMPLE_VOCAB"} if spec.init == "vocab" else {}


def prompt_tuning_config(backbone: Backbone, spec: RunSpec) -> PromptTuningConfig:
    """peft's PROMPT_TUNING with the run's prompt length and initialisation."""
    return PromptTuningConfig(
        task_type=backbone.task_type, num_virtual_tokens=spec.num_virtual_tokens, **_vocab_init(spec)
    )


# ------------------------------------------------------------------------------------------------- builders ---


def build_base(backbone: Backbone, spec: RunSpec, base: torch.nn.Module, train_set) -> tuple[torch.nn.Module, dict]:
    """The base model itself: trained whole (full fine-tuning) or not at all (zero-shot)."""
    return base, {}


def build_prompt_tuning(backbone: Backbone, spec: RunSpec, base: torch.nn.Module, train_set) -> tuple:
    return get_peft_model(base, prompt_tuning_config(backbone, spec)), {}


def build_p_tuning(backbone: Backbone, spec: RunSpec, base: torch.nn.Module, train_set) -> tuple:
    config = PromptEncoderConfig(
        task_type=backbone.task_type,
        num_virtual_tokens=spec.num_virtual_tokens,
        encoder_reparameterization_type="MLP",
        encoder_hidden_size=RESIDUAL_BOTTLENECK,
    )
    return get_peft_model(base, config), {}


def build_residual(
    backbone: Backbone,
    spec: RunSpec,
    base: torch.nn.Module,
    train_set,
    layer_norm: bool = True,
    branch_scale: str = "unit",
) -> tuple:
    """Residual prompt tuning; the variants drop the branch's LayerNorm or scale its output to the embeddings' RMS."""
    config = ppt.ResidualPromptConfig(
        task_type=backbone.task_type,
        num_virtual_tokens=spec.num_virtual_tokens,
        bottleneck_size=RESIDUAL_BOTTLENECK,
        layer_norm=layer_norm,
        branch_scale=branch_scale,
        **_vocab_init(spec),
    )
    return get_peft_model(base, config), {}


def _initial_loss(model, dataset, backbone: Backbone) -> float:
    """Mean training loss of a not yet trained model (SPoT-style choice of the source prompt)."""
    model.eval()
    collate, total = backbone.collator(), 0.0
    with torch.no_grad():
        for start in range(0, len(dataset), 16):
            rows = [dataset[i] for i in range(start, min(start + 16, len(dataset)))]
            total += model(**collate(rows)).loss.item() * len(rows)
    return total / len(dataset)


def build_spot(backbone: Backbone, spec: RunSpec, base: torch.nn.Module, train_set) -> tuple:
    """SPoT: the source prompt that fits the target best before training."""
    prompts = source_prompts(backbone, spec)
    model = get_peft_model(base, prompt_tuning_config(backbone, spec))
    weight = model.prompt_encoder["default"].embedding.weight
    losses = {}
    for name, prompt in prompts.items():
        weight.data.copy_(prompt)
        losses[name] = _initial_loss(model, train_set, backbone)
    chosen = min(losses, key=losses.get)
    weight.data.copy_(prompts[chosen])
    return model, {"spot_source": chosen, "spot_initial_losses": losses}


# ------------------------------------------------------------------------------------- the prompt library ---

# how many of the library's top-ranked entries the top-k mean and ComPT start from
LIBRARY_TOP_K = 3


def prompt_library(backbone: Backbone, spec: RunSpec, base: torch.nn.Module) -> ppt.PromptLibrary:
    """The library of the run's source prompts: one entry per source task of its prompt tuning source stage, with
    the template and label words it was trained with."""
    folder = ensure_source(backbone, spec.source("prompt_tuning"))
    phrasing = {t: {"template": TASKS[t].template, "label_words": list(TASKS[t].label_words)} for t in spec.sources}
    return ppt.PromptLibrary.from_adapters(base, {t: folder / t for t in spec.sources}, metadata=phrasing)


def ranked_entries(library: ppt.PromptLibrary, model, train_set, **rank_options) -> tuple[list[str], dict]:
    """The library's entries best first by `rank` on the target's training examples (the model's own prompt is
    ranked as well and recorded, but never chosen: these methods transfer), and the details to record."""
    start = time.perf_counter()
    ranking = library.rank(model, train_set, progress=False, **rank_options)
    entries = [name for name, _ in ranking if name != ppt.CURRENT_PROMPT]
    return entries, {"ranking": ranking, "rank_seconds": time.perf_counter() - start}


def build_library_top(backbone: Backbone, spec: RunSpec, base: torch.nn.Module, train_set, top: int = 1) -> tuple:
    """A prompt started from the library's best entry by `rank` (`top=1`, SPoT through the library API) or from
    the mean of its `top` best, scaled to their token norm."""
    model = get_peft_model(base, prompt_tuning_config(backbone, spec))
    library = prompt_library(backbone, spec, base)
    entries, details = ranked_entries(library, model, train_set)
    library.initialize(model, entries[:top])
    return model, {**details, "initialized_from": entries[:top]}


def build_library_compt(backbone: Backbone, spec: RunSpec, base: torch.nn.Module, train_set) -> tuple:
    """ComPT on the target alone, its shared source prompts started from the library's top entries by `rank`
    (ComPT's premise: a task's prompt composed from source prompts, and a private one)."""
    config = ppt.ComPTConfig(
        task_type=backbone.task_type,
        num_virtual_tokens=spec.num_virtual_tokens,
        task_names=list(spec.tasks),
        num_source_prompts=LIBRARY_TOP_K,
        normalization="sparsemax",
        **_vocab_init(spec),
    )
    model = get_peft_model(base, config)
    library = prompt_library(backbone, spec, base)
    entries, details = ranked_entries(library, model, train_set, task=spec.tasks[0])
    library.initialize(model, entries[:LIBRARY_TOP_K])
    return model, {**details, "initialized_from": entries[:LIBRARY_TOP_K]}


def build_best_particle(backbone: Backbone, spec: RunSpec, base: torch.nn.Module, train_set) -> tuple:
    """A Bayesian target started from the posterior's particle that `rank` puts first on the target's training
    examples; its anchor stays the posterior mean."""
    model, details = BayesianTarget()(backbone, spec, base, train_set)
    posterior = ppt.PromptLibrary.from_adapters(base, {"posterior": ensure_source(backbone, source_stage(spec))})
    entries, ranking = ranked_entries(posterior, model, train_set)
    posterior.initialize(model, entries[0])
    return model, {**details, **ranking, "initialized_from": entries[:1]}


def build_oracle_source(backbone: Backbone, spec: RunSpec, base: torch.nn.Module, train_set) -> tuple:
    """The library oracle's run: prompt tuning started from one source prompt (`spec.init_source`)."""
    model = get_peft_model(base, prompt_tuning_config(backbone, spec))
    model.prompt_encoder["default"].embedding.weight.data.copy_(source_prompts(backbone, spec)[spec.init_source])
    return model, {}


def build_source_average(backbone: Backbone, spec: RunSpec, base: torch.nn.Module, train_set) -> tuple:
    """A prompt started from the mean of the source prompts."""
    prompts = source_prompts(backbone, spec)
    model = get_peft_model(base, prompt_tuning_config(backbone, spec))
    model.prompt_encoder["default"].embedding.weight.data.copy_(torch.stack(list(prompts.values())).mean(0))
    return model, {}


def build_mpt(backbone: Backbone, spec: RunSpec, base: torch.nn.Module, train_set) -> tuple:
    """peft's MULTITASK_PROMPT_TUNING target, started from the average of its source stage's task prompts."""
    folder = ensure_source(backbone, source_stage(spec))
    config = MultitaskPromptTuningConfig(
        task_type=backbone.task_type,
        num_virtual_tokens=spec.num_virtual_tokens,
        num_tasks=1,
        prompt_tuning_init="AVERAGE_SOURCE_TASKS",
        prompt_tuning_init_state_dict_path=str(folder / "adapter_model.safetensors"),
    )
    return get_peft_model(base, config), {}


@dataclass(frozen=True)
class BayesianTarget:
    """The builder of a Bayesian transfer method: a target prompt started from the method's source posterior."""

    target_prompt: str = "plain"  # "plain", or the paper's "decomposed" prompt (shared S and low-rank factors)
    from_particle: bool = False  # start from one particle drawn with the run's seed, not from the particles' mean

    def options(self, spec: RunSpec) -> dict:
        """The `BayesianPromptConfig` target-stage options that tell the Bayesian transfer methods apart."""
        options = {"target_prompt": self.target_prompt}
        if self.from_particle:  # each seed starts from its own posterior sample
            options.update(target_init="particle:random", target_init_seed=spec.seed)
        return options

    def __call__(self, backbone: Backbone, spec: RunSpec, base: torch.nn.Module, train_set) -> tuple:
        folder = ensure_source(backbone, source_stage(spec))
        config = ppt.BayesianPromptConfig(
            task_type=backbone.task_type,
            num_virtual_tokens=spec.num_virtual_tokens,
            stage="target",
            posterior=str(folder),
            **self.options(spec),
        )
        return get_peft_model(base, config), {}


def shared_prompt_config(backbone: Backbone, spec: RunSpec) -> PeftConfig:
    """One prompt shared by every task."""
    return prompt_tuning_config(backbone, spec)


def compt_config(backbone: Backbone, spec: RunSpec) -> PeftConfig:
    """ComPT with this package's defaults: one source prompt per task, sparsemax routing."""
    return ppt.ComPTConfig(
        task_type=backbone.task_type,
        num_virtual_tokens=spec.num_virtual_tokens,
        task_names=list(spec.tasks),
        num_source_prompts=len(spec.tasks),
        normalization="sparsemax",
        **_vocab_init(spec),
    )


def compt_authors_config(backbone: Backbone, spec: RunSpec) -> PeftConfig:
    """`ComPTConfig.authors_recipe`, the authors' design; their initialisation is part of the recipe."""
    return ppt.ComPTConfig.authors_recipe(
        task_type=backbone.task_type,
        num_virtual_tokens=spec.num_virtual_tokens,
        task_names=list(spec.tasks),
        num_source_prompts=len(spec.tasks),
    )


# --------------------------------------------------------------------------------------- optimizers, counts ---


def compt_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """The same learning rates for both ComPT designs: the comparison is of the design."""
    return ppt.create_compt_optimizer(model, source_lr=lr, private_lr=lr, router_lr=COMPT_ROUTER_LR, other_lr=HEAD_LR)


def decomposed_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """The decomposed target's S at `lr`, its low-rank factors at MPT's rate."""
    return torch.optim.AdamW(
        ppt.bayesian_parameter_groups(model, shared_lr=lr, task_lr=DECOMPOSED_TASK_LR, other_lr=HEAD_LR)
    )


def prompt_parameters(model: torch.nn.Module) -> int:
    """Prompt parameters the saved adapter needs at inference (after folding; the head is not counted)."""
    return math.prod(model.get_prompt_embedding_to_save("default").shape)


def mpt_parameters(model: torch.nn.Module) -> int:
    """MPT's prompt and its task-specific low-rank factors."""
    encoder = model.prompt_encoder["default"]
    return prompt_parameters(model) + encoder.prefix_task_cols.numel() + encoder.prefix_task_rows.numel()


def no_parameters(model: torch.nn.Module) -> None:
    """A method with no prompt to save: the whole model (full fine-tuning) or nothing trained (zero-shot)."""
    return None


def routing_weights(model: torch.nn.Module) -> dict:
    return {"routing_weights": model.prompt_encoder["default"].routing_weights().tolist()}


# -------------------------------------------------------------------------------------------------- registry ---


@dataclass(frozen=True)
class Method:
    """A benchmark method: how runs build, train and count it, which suites plan it and how the report names it."""

    name: str
    label: str  # its name in the report's tables
    build: Optional[Builder] = None  # its model on one task; None: it trains several tasks together only
    # its config on several tasks trained together; None: one model per task (`build`), each `steps` steps
    joint_config: Optional[JointConfig] = None
    optimizer: OptimizerFactory = prompt_and_head_optimizer
    claim: Optional[str] = None  # the claim whose causal-LM suites compare it; None: a baseline or an ablation
    compared_with: tuple[str, ...] = ()  # the methods the causal-LM report compares it with, seed by seed
    source_kind: Optional[str] = None  # a transfer method's source stage (`SourceSpec.kind`)
    mlp_prompt: bool = False  # its prompt is made by an MLP: causal-LM suites sweep their `mlp_prompt_lrs`
    task_ids: bool = False  # its model takes `task_ids` (the task's index) with every batch
    trains: bool = True  # False: the frozen base model is scored as it is (causal LMs only)
    inference_params: Callable[[torch.nn.Module], Optional[int]] = prompt_parameters
    record_details: Optional[Callable[[torch.nn.Module], dict]] = None  # details to record after training


def bayesian_method(
    name: str,
    label: str,
    compared_with: tuple[str, ...],
    source_kind: str = "bayesian",
    optimizer: OptimizerFactory = prompt_and_head_optimizer,
    claim: str = "transfer",
    **target_options,
) -> Method:
    """A Bayesian transfer method: a target prompt (`BayesianTarget(**target_options)`) started from the posterior
    `source_kind` (one of `POSTERIORS`), compared in `claim` (claim 2 by default)."""
    return Method(
        name,
        label,
        build=BayesianTarget(**target_options),
        optimizer=optimizer,
        claim=claim,
        compared_with=compared_with,
        source_kind=source_kind,
    )


# both ComPT designs train at the same learning rates and record their routing: the comparison is of the design
compt_method = partial(
    Method, optimizer=compt_optimizer, claim="multitask", task_ids=True, record_details=routing_weights
)


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("prompt_tuning", "peft PROMPT_TUNING", build=build_prompt_tuning),
        Method(
            "residual",
            "residual (ours)",
            build=build_residual,
            claim="residual",
            compared_with=("prompt_tuning",),
            mlp_prompt=True,
        ),
        Method(
            "residual_embedding_rms",
            "residual, branch scaled to the embeddings' RMS",
            build=partial(build_residual, branch_scale="embedding_rms"),
            claim="residual",
            compared_with=("prompt_tuning", "residual"),
            mlp_prompt=True,
        ),
        Method(
            "p_tuning",
            "peft P_TUNING (MLP)",
            build=build_p_tuning,
            claim="residual",
            compared_with=("prompt_tuning",),
            mlp_prompt=True,
        ),
        # the ablation keeps the skip connection but drops the branch's LayerNorm, whose output starts at norm
        # sqrt(hidden) (MiniLM suites only)
        Method(
            "residual_no_layer_norm",
            "residual without LayerNorm (ablation)",
            build=partial(build_residual, layer_norm=False),
            mlp_prompt=True,
        ),
        Method("full_finetuning", "full fine-tuning", build=build_base, inference_params=no_parameters),
        Method(
            "zero_shot",
            "zero-shot (template and label words, no training)",
            build=build_base,
            trains=False,
            inference_params=no_parameters,
        ),
        Method(
            "spot",
            "SPoT init (best single source)",
            build=build_spot,
            claim="transfer",
            compared_with=("prompt_tuning",),
            source_kind="prompt_tuning",
        ),
        Method(
            "source_average",
            "average-of-sources init",
            build=build_source_average,
            claim="transfer",
            compared_with=("prompt_tuning",),
            source_kind="prompt_tuning",
        ),
        Method(
            "mpt",
            "peft MULTITASK_PROMPT_TUNING",
            build=build_mpt,
            claim="transfer",
            compared_with=("prompt_tuning",),
            source_kind="mpt",
            task_ids=True,
            inference_params=mpt_parameters,
        ),
        bayesian_method("bayesian", "Bayesian (ours)", ("prompt_tuning", "spot", "source_average", "mpt")),
        bayesian_method(
            "bayesian_replicated",
            "Bayesian, the authors' replicated particles",
            ("bayesian",),
            source_kind="bayesian_replicated",
        ),
        bayesian_method(
            "bayesian_decomposed",
            "Bayesian, the paper's decomposed target prompt",
            ("bayesian", "prompt_tuning"),
            optimizer=decomposed_optimizer,
            target_prompt="decomposed",
        ),
        bayesian_method(  # the paper's "prompt sampled from the posterior"
            "bayesian_particle",
            "Bayesian, target from one posterior sample (a particle)",
            ("bayesian", "prompt_tuning"),
            from_particle=True,
        ),
        bayesian_method(
            "bayesian_replicated_equal_data",
            "Bayesian, replicated particles on the sharded stage's batches (M× compute)",
            ("bayesian", "bayesian_replicated"),
            source_kind="bayesian_replicated_equal_data",
        ),
        bayesian_method(
            "bayesian_likelihood_scaled",
            "Bayesian, likelihood scaled by the number of particles",
            ("bayesian",),
            source_kind="bayesian_likelihood_scaled",
        ),
        # the library suite: prompts started from a library of source prompts ranked on the target
        Method(
            "library_best",
            "library: best entry by rank",
            build=build_library_top,
            claim="library",
            compared_with=("prompt_tuning",),
            source_kind="prompt_tuning",
        ),
        Method(
            "library_top3",
            f"library: mean of the top {LIBRARY_TOP_K} by rank, at their token norm",
            build=partial(build_library_top, top=LIBRARY_TOP_K),
            claim="library",
            compared_with=("prompt_tuning", "library_best"),
            source_kind="prompt_tuning",
        ),
        bayesian_method(
            "library_bayesian",
            "library: Bayesian posterior over the sources (mean)",
            ("prompt_tuning", "library_best"),
            claim="library",
        ),
        Method(
            "library_best_particle",
            "library: Bayesian, best particle by rank",
            build=build_best_particle,
            claim="library",
            compared_with=("prompt_tuning", "library_bayesian", "library_best"),
            source_kind="bayesian",
        ),
        compt_method(
            "library_compt",
            f"library: ComPT, source prompts from the top {LIBRARY_TOP_K} by rank (and a private prompt)",
            build=build_library_compt,
            claim="library",
            compared_with=("prompt_tuning", "library_best"),
            source_kind="prompt_tuning",
        ),
        Method(
            "oracle_source",
            "oracle: one source prompt fine-tuned on the target",
            build=build_oracle_source,
            source_kind="prompt_tuning",
        ),
        Method("shared_prompt", "one shared prompt", joint_config=shared_prompt_config, claim="multitask"),
        compt_method("compt", "ComPT (ours)", joint_config=compt_config),
        compt_method("compt_authors", "ComPT, the authors' recipe", joint_config=compt_authors_config),
    )
}

LABELS = {name: method.label for name, method in METHODS.items()}
BAYESIAN_METHODS = tuple(name for name, method in METHODS.items() if isinstance(method.build, BayesianTarget))
MLP_PROMPT_METHODS = tuple(name for name, method in METHODS.items() if method.mlp_prompt)


def claim_methods(claim: str) -> tuple[str, ...]:
    """The methods a claim of the causal-LM suites compares with its baselines, in registry order."""
    return tuple(name for name, method in METHODS.items() if method.claim == claim)


def source_stage(spec: RunSpec) -> Optional[SourceSpec]:
    """The source stage a run starts from, or None for a method that transfers nothing."""
    kind = METHODS[spec.method].source_kind
    return spec.source(kind) if kind and spec.sources else None


def bayesian_target_options(spec: RunSpec) -> dict:
    """The `BayesianPromptConfig` target-stage options of a Bayesian transfer run."""
    build = METHODS[spec.method].build
    if not isinstance(build, BayesianTarget):
        raise ValueError(f"{spec.method!r} is not a Bayesian transfer method; expected one of {BAYESIAN_METHODS}")
    return build.options(spec)
