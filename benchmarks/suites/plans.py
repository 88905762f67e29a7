"""The benchmark suites' plans: which runs test which claim, from a suite's budget (`benchmarks.suites.budgets`).

Runs are ordered seed by seed across all claims, so a suite stopped early still covers every claim with fewer
seeds. The causal-LM suites plan every method of a claim in the method registry (`benchmarks.core.methods`); the
MiniLM suites keep the design they were recorded with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Optional

import pandas as pd

from benchmarks.core.library_data import SOURCE_DATA_VERSION
from benchmarks.core.methods import METHODS, claim_methods
from benchmarks.core.selection import choose_lr
from benchmarks.core.specs import ORACLE_LR, RunSpec
from benchmarks.suites.budgets import CLAIMS, DATA, MODELS, Budget, CausalBudget, suite_budget


def residual_runs(budget: Budget, seed: int) -> list[RunSpec]:
    """Claim 1: residual vs plain prompt tuning (and P-tuning, full fine-tuning) across LRs, inits, lengths.

    The ablation without the branch's LayerNorm runs from the vocab init: it tests whether the LayerNorm, whose
    output starts at norm sqrt(hidden), drowns that init (a random init already has that norm). The variant whose
    LayerNorm output is scaled to the word embeddings' RMS (`branch_scale="embedding_rms"`) runs from the vocab
    init too: it keeps the LayerNorm's cap without drowning the init.
    """
    runs = []
    for task in budget.residual_tasks:
        base = RunSpec(
            method="prompt_tuning",
            model="minilm",
            tasks=(task,),
            seed=seed,
            lr=0.0,
            num_virtual_tokens=budget.num_virtual_tokens,
            steps=budget.steps,
            max_eval=budget.max_eval,
        )
        for lr in budget.prompt_lrs["minilm"]:
            for method in ("prompt_tuning", "residual"):
                for init in ("random", "vocab"):
                    runs.append(replace(base, method=method, lr=lr, init=init))
                # 10x shorter prompts
                runs.append(
                    replace(base, method=method, lr=lr, num_virtual_tokens=max(1, budget.num_virtual_tokens // 10))
                )
            runs.append(replace(base, method="p_tuning", lr=lr))
            runs += [
                replace(base, method=method, lr=lr, init="vocab")
                for method in ("residual_no_layer_norm", "residual_embedding_rms")
            ]
        runs += [replace(base, method="full_finetuning", lr=lr) for lr in budget.finetune_lrs]
    # the causal LM with verbalised labels, on the first task
    causal = RunSpec(
        method="prompt_tuning",
        model="smollm2",
        tasks=(budget.residual_tasks[0],),
        seed=seed,
        lr=0.0,
        num_virtual_tokens=budget.num_virtual_tokens,
        init="vocab",
        steps=budget.smollm2_steps,
        max_eval=budget.max_eval,
    )
    for lr in budget.prompt_lrs["smollm2"]:
        runs += [
            replace(causal, method=method, lr=lr)
            for method in ("prompt_tuning", "residual", "p_tuning", "residual_no_layer_norm", "residual_embedding_rms")
        ]
    return runs


def transfer_runs(budget: Budget, seed: int) -> list[RunSpec]:
    """Claim 2: Bayesian transfer vs no transfer, SPoT, the average of source prompts and peft's MPT."""
    runs = []
    for task, data in budget.transfer_targets:
        for lr in budget.prompt_lrs["minilm"]:
            common = RunSpec(
                method="prompt_tuning",
                model="minilm",
                tasks=(task,),
                seed=seed,
                lr=lr,
                num_virtual_tokens=budget.num_virtual_tokens,
                steps=budget.steps,
                data=data,
                max_eval=budget.max_eval,
            )
            runs.append(common)
            runs += [
                replace(common, method=method, sources=budget.sources, source_steps=budget.source_steps)
                for method in ("spot", "source_average", "mpt", "bayesian")
            ]
    return runs


def multitask_runs(budget: Budget, seed: int) -> list[RunSpec]:
    """Claim 3: ComPT (this package's defaults and the authors' recipe) vs one prompt per task vs one prompt shared
    by all tasks, trained on few-shot tasks."""
    if not budget.multitask:
        return []
    return [
        RunSpec(
            method=method,
            model="minilm",
            tasks=budget.multitask,
            seed=seed,
            lr=lr,
            num_virtual_tokens=budget.num_virtual_tokens,
            steps=budget.steps,
            max_eval=budget.max_eval,
        )
        for lr in budget.prompt_lrs["minilm"]
        for method in ("prompt_tuning", "shared_prompt", "compt", "compt_authors")
    ]


def no_runs(budget: Budget, seed: int) -> list[RunSpec]:
    """The library claim in a MiniLM suite: none (a classifier's new head gives `rank` nothing to score)."""
    return []


CLAIM_RUNS = {"residual": residual_runs, "transfer": transfer_runs, "multitask": multitask_runs, "library": no_runs}


# a later seed's run whose learning rate the sweeping seeds have not chosen yet (they are still running)
WAITING_LR = None

# a run -> the learning rate the sweeping seeds chose for its method and data, or None while they have not finished
LRChooser = Callable[[RunSpec], Optional[float]]


def _lrs(budget: CausalBudget, run: RunSpec) -> tuple[float, ...]:
    return budget.mlp_prompt_lrs if METHODS[run.method].mlp_prompt else budget.prompt_lrs


def _causal_sweep(budget: CausalBudget, chosen_lr: Optional[LRChooser], run: RunSpec) -> list[RunSpec]:
    if run.seed in budget.sweeping_seeds:
        return [replace(run, lr=lr) for lr in _lrs(budget, run)]
    return [replace(run, lr=chosen_lr(run) if chosen_lr else WAITING_LR)]


def lr_chooser(budget: CausalBudget, records: list[dict]) -> LRChooser:
    """Choose a later seed's learning rate from the sweeping seeds' records: `choose_lr` over every LR of every
    sweeping seed (None until all of those runs have a record)."""
    by_key = {record["key"]: record for record in records if "error" not in record}

    def chosen_lr(run: RunSpec) -> Optional[float]:
        swept = [
            by_key.get(replace(run, seed=seed, lr=lr).key())
            for seed in budget.sweeping_seeds
            for lr in _lrs(budget, run)
        ]
        return None if None in swept else choose_lr(pd.DataFrame(swept))

    return chosen_lr


# every prompt of a causal-LM suite, source stages included, starts from sampled vocabulary embeddings: peft's
# random init (N(0, 1), token norm sqrt(hidden) = 24 on SmolLM2) is 7x as long as a token the model reads (3.3)
CAUSAL_PROMPT_INIT = "vocab"


def causal_runs(budget: CausalBudget, claim: str, seed: int, chosen_lr: Optional[LRChooser] = None) -> list[RunSpec]:
    """The runs of one claim and seed in a causal-LM suite (zero-shot runs with the first seed only: they train
    nothing, and the test sets are the same for every seed). A seed after the sweeping seeds runs each method at
    the LR `chosen_lr` gives (`WAITING_LR` while it gives None, or without `chosen_lr`).

    Each claim runs prompt tuning and the claim's methods in the registry (`claim_methods`):

    - residual: residual (the paper's branch and the one scaled to the embeddings' RMS) and P-tuning on 16-shot
      tasks and on `full_data`, and prompt tuning vs residual with `short_virtual_tokens`;
    - transfer: no transfer, SPoT, the average of the source prompts, peft's MPT and the Bayesian variants
      (`BAYESIAN_METHODS`: sharded or replicated particles, at equal compute or equal data, the likelihood scaled
      by M, plain or decomposed target prompt, starting from the particles' mean or from one particle) on 16-shot
      targets, every source stage initialised as the target prompts are;
    - multitask: one shared prompt and ComPT in both designs trained on all tasks; one prompt per task is the
      single-task prompt tuning runs of the same tasks, seed, LRs and steps (listed here, run once);
    - library: no transfer and the library methods (a library of `library_sources` prompts, trained without the
      targets' held-out text, ranked on each 16-shot target: its best entry, the mean of the top entries, the
      Bayesian posterior over the same sources from its mean and from its best particle, ComPT from the top
      entries), and the oracle: every source fine-tuned on the target at `ORACLE_LR`, with the first
      `oracle_seeds` seeds.
    """
    base = RunSpec(
        method="prompt_tuning",
        model=budget.model,
        tasks=(),
        seed=seed,
        lr=0.0,
        num_virtual_tokens=budget.num_virtual_tokens,
        init=CAUSAL_PROMPT_INIT,
        steps=budget.steps,
        max_eval=budget.max_eval,
    )
    zero_shot = lambda tasks: [  # noqa: E731
        replace(base, method="zero_shot", tasks=(task,), steps=0) for task in tasks if seed == budget.seeds[0]
    ]
    runs = []
    if claim == "residual" and budget.residual_tasks:
        targets = [replace(base, tasks=(t,)) for t in budget.residual_tasks]
        if budget.full_data:
            task, examples, steps = budget.full_data
            targets.append(replace(base, tasks=(task,), data="full", train_examples=examples, steps=steps))
        runs += [replace(run, method="zero_shot", steps=0) for run in targets if seed == budget.seeds[0]]
        for run in targets:
            for method in ("prompt_tuning", *claim_methods("residual")):
                runs += _causal_sweep(budget, chosen_lr, replace(run, method=method))
        short = replace(base, tasks=(budget.residual_tasks[0],), num_virtual_tokens=budget.short_virtual_tokens)
        for method in ("prompt_tuning", "residual"):
            runs += _causal_sweep(budget, chosen_lr, replace(short, method=method))
    elif claim == "transfer":
        runs += zero_shot(budget.transfer_targets)
        for task in budget.transfer_targets:
            target = replace(
                base, tasks=(task,), sources=budget.sources, source_steps=budget.source_steps, source_init=base.init
            )
            runs += _causal_sweep(budget, chosen_lr, replace(base, tasks=(task,)))  # no transfer
            for method in claim_methods("transfer"):
                runs += _causal_sweep(budget, chosen_lr, replace(target, method=method))
    elif claim == "library":
        runs += zero_shot(budget.library_targets)
        for task in budget.library_targets:
            target = replace(
                base,
                tasks=(task,),
                sources=budget.library_sources,
                source_steps=budget.source_steps,
                source_init=base.init,
                held_out=budget.library_targets,
                source_data_version=SOURCE_DATA_VERSION,
            )
            runs += _causal_sweep(budget, chosen_lr, replace(base, tasks=(task,)))  # no transfer
            for method in claim_methods("library"):
                runs += _causal_sweep(budget, chosen_lr, replace(target, method=method))
            if seed in budget.seeds[: budget.oracle_seeds]:
                runs += [
                    replace(target, method="oracle_source", init_source=source, lr=ORACLE_LR)
                    for source in budget.library_sources
                ]
    elif claim == "multitask" and budget.multitask:
        runs += zero_shot(budget.multitask)
        runs += [
            run for task in budget.multitask for run in _causal_sweep(budget, chosen_lr, replace(base, tasks=(task,)))
        ]
        for method in claim_methods("multitask"):
            runs += _causal_sweep(budget, chosen_lr, replace(base, method=method, tasks=budget.multitask))
    return runs


def suite_runs(
    name: str,
    claims=CLAIMS,
    models=MODELS,
    data=DATA,
    tasks: Optional[tuple[str, ...]] = None,
    records: Optional[list[dict]] = None,
) -> list[tuple[str, RunSpec]]:
    """(claim, run) pairs of a suite, seed by seed; a run shared by two claims is listed once.

    `models` and `data` ("kshot": LM-BFF 16-shot splits, "fewglue", "full": part of a full training set) keep only
    the runs on those models and data; `tasks` replaces the suite's target tasks (see `with_tasks`). In a causal-LM
    suite the later seeds' LRs are chosen from `records`; a run whose sweep has not finished has `lr=WAITING_LR`.
    """
    budget, seen, runs = suite_budget(name, tasks), set(), []
    chosen_lr = lr_chooser(budget, records or []) if isinstance(budget, CausalBudget) else None
    for seed in budget.seeds:
        for claim in claims:
            claim_runs = (
                causal_runs(budget, claim, seed, chosen_lr)
                if isinstance(budget, CausalBudget)
                else CLAIM_RUNS[claim](budget, seed)
            )
            for spec in claim_runs:
                if spec.model in models and spec.data in data and spec.key() not in seen:
                    seen.add(spec.key())
                    runs.append((claim, spec))
    return runs


@dataclass(frozen=True)
class RetiredDesign:
    """Recorded runs of a design a suite no longer plans: kept in its records as evidence, left out of its report."""

    suite: str
    reason: str
    matches: Callable[[dict], bool]  # the fields of a recorded run's key


RETIRED_DESIGNS = (
    RetiredDesign(
        "smollm2",
        "claim 2's first pass, whose source stages started from peft's random init instead of the vocabulary like "
        "every other prompt of the suite (`CAUSAL_PROMPT_INIT`); its runs have no `source_init` in their keys",
        lambda fields: bool(fields["sources"]) and "source_init" not in fields,
    ),
)
