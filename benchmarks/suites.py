"""The benchmark suites: which runs test which claim, with what budget.

Every method in a comparison gets the same prompt length, steps, batch size, seeds and a learning-rate sweep of
the same size (full fine-tuning sweeps the same number of values, on its own scale). Runs are ordered seed by
seed across all claims, so a suite stopped early still covers every claim with fewer seeds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Optional, Union

import pandas as pd

from benchmarks.experiments import TRANSFER_METHODS, RunSpec
from benchmarks.tasks import KSHOT_SEEDS


@dataclass(frozen=True)
class Budget:
    """The knobs that separate the quick smoke suite from the full one."""

    seeds: tuple[int, ...]
    prompt_lrs: dict  # model -> the prompt learning rates swept
    finetune_lrs: tuple[float, ...]
    num_virtual_tokens: int
    steps: int
    source_steps: int
    max_eval: int
    smollm2_steps: int
    residual_tasks: tuple[str, ...]
    transfer_targets: tuple[tuple[str, str], ...]  # (task, "kshot" | "fewglue")
    sources: tuple[str, ...]
    multitask: tuple[str, ...]


@dataclass(frozen=True)
class CausalBudget:
    """A suite on a causal LM with verbalised labels (SmolLM2), where the frozen model already scores some tasks
    well: every table gets a zero-shot row, and the targets include tasks it does not know (SUBJ, TREC).

    Prompts given straight to the model (prompt tuning and everything initialised from source prompts) sweep
    `prompt_lrs`; prompts made by an MLP (residual, P-tuning) sweep `mlp_prompt_lrs`, the same number of values a
    factor 3 lower, because AdamW moves an MLP-made prompt 30-130x further per step at one LR
    (`python -m benchmarks.prompt_steps`). Every run records its dev-set score, on which each method's LR is chosen.

    The first `sweep_seeds` seeds run every LR; the LR with the best dev score pooled over them (see
    `benchmarks.selection.choose_lr`) is then the only one the later seeds run, which cuts a 5-seed suite with
    3-value sweeps by 40% and still pairs every comparison over all seeds. 0: every seed runs every LR.
    """

    model: str
    seeds: tuple[int, ...]
    prompt_lrs: tuple[float, ...]
    mlp_prompt_lrs: tuple[float, ...]
    num_virtual_tokens: int
    short_virtual_tokens: int
    steps: int
    max_eval: int
    residual_tasks: tuple[str, ...]  # claim 1, 16-shot
    full_data: Optional[tuple[str, int, int]]  # claim 1 on a bigger training set: (task, examples, steps), or None
    sources: tuple[str, ...]  # claim 2: trained on their full training sets
    source_steps: int
    transfer_targets: tuple[str, ...]  # claim 2, 16-shot, never a source
    multitask: tuple[str, ...]  # claim 3, 16-shot each
    sweep_seeds: int = 0

    @property
    def sweeping_seeds(self) -> tuple[int, ...]:
        """The seeds that run every learning rate and choose it for the others."""
        return self.seeds[: self.sweep_seeds or None]


SUITES = {
    "quick": Budget(
        seeds=(13,),
        prompt_lrs={"minilm": (1e-1,), "smollm2": (1e-2,)},
        finetune_lrs=(3e-5,),
        num_virtual_tokens=4,
        steps=8,
        source_steps=4,
        max_eval=48,
        smollm2_steps=2,
        residual_tasks=("sst2",),
        transfer_targets=(("rte", "kshot"), ("cb", "fewglue")),
        sources=("sst2", "cola"),
        multitask=("sst2", "subj"),
    ),
    # SmolLM2 sweeps 1e-3 too: every MLP-made prompt (residual, P-tuning) did best at 3e-3, the lowest value of the
    # first sweep, and at one LR AdamW moves such a prompt 30-130x further per step (python -m benchmarks.prompt_steps)
    # with 2 workers on 2 CPU cores (python -m benchmarks smollm2 --workers 2, about 3 min per run) a sweeping seed
    # (102 runs) takes about 5 h and a later seed (34) under 2 h: 311 runs, about 15 h (where the time goes: RESULTS.md)
    "smollm2": CausalBudget(
        model="smollm2",
        seeds=KSHOT_SEEDS,
        prompt_lrs=(3e-3, 1e-2, 3e-2),
        mlp_prompt_lrs=(1e-3, 3e-3, 1e-2),
        num_virtual_tokens=20,
        short_virtual_tokens=2,
        steps=40,
        max_eval=300,
        residual_tasks=("sst2", "subj", "trec"),
        full_data=("sst2", 800, 100),
        sources=("sst2", "cola"),
        source_steps=100,
        transfer_targets=("mr", "subj"),
        multitask=("sst2", "subj", "trec"),
        sweep_seeds=2,
    ),
    "smollm2-quick": CausalBudget(
        model="smollm2",
        seeds=(13,),
        prompt_lrs=(1e-2,),
        mlp_prompt_lrs=(3e-3,),
        num_virtual_tokens=4,
        short_virtual_tokens=1,
        steps=2,
        max_eval=16,
        residual_tasks=("sst2",),
        full_data=("sst2", 16, 2),
        sources=("sst2", "cola"),
        source_steps=2,
        transfer_targets=("mr",),
        multitask=("sst2", "trec"),
    ),
    "full": Budget(
        seeds=KSHOT_SEEDS,
        prompt_lrs={"minilm": (3e-2, 1e-1, 3e-1), "smollm2": (1e-3, 3e-3, 1e-2, 3e-2)},
        finetune_lrs=(1e-5, 3e-5, 1e-4),
        num_virtual_tokens=20,
        steps=100,
        source_steps=300,
        max_eval=500,
        smollm2_steps=50,
        residual_tasks=("sst2",),
        transfer_targets=(("cr", "kshot"), ("cb", "fewglue")),
        sources=("sst2", "cola"),
        multitask=("sst2", "cr", "subj"),
    ),
}


CLAIMS = ("residual", "transfer", "multitask")
MODELS = ("minilm", "smollm2")
DATA = ("kshot", "fewglue", "full")


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


CLAIM_RUNS = {"residual": residual_runs, "transfer": transfer_runs, "multitask": multitask_runs}

MLP_PROMPT_METHODS = ("residual", "residual_embedding_rms", "p_tuning")


# a later seed's run whose learning rate the sweeping seeds have not chosen yet (they are still running)
WAITING_LR = None

# a run -> the learning rate the sweeping seeds chose for its method and data, or None while they have not finished
LRChooser = Callable[[RunSpec], Optional[float]]


def _lrs(budget: CausalBudget, run: RunSpec) -> tuple[float, ...]:
    return budget.mlp_prompt_lrs if run.method in MLP_PROMPT_METHODS else budget.prompt_lrs


def _causal_sweep(budget: CausalBudget, chosen_lr: Optional[LRChooser], run: RunSpec) -> list[RunSpec]:
    if run.seed in budget.sweeping_seeds:
        return [replace(run, lr=lr) for lr in _lrs(budget, run)]
    return [replace(run, lr=chosen_lr(run) if chosen_lr else WAITING_LR)]


def lr_chooser(budget: CausalBudget, records: list[dict]) -> LRChooser:
    """Choose a later seed's learning rate from the sweeping seeds' records: `choose_lr` over every LR of every
    sweeping seed (None until all of those runs have a record)."""
    from benchmarks.selection import choose_lr

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

    - residual: prompt tuning, residual (the paper's branch and the one scaled to the embeddings' RMS) and
      P-tuning on 16-shot tasks and on `full_data`, and prompt tuning vs residual with `short_virtual_tokens`;
    - transfer: no transfer, SPoT, the average of the source prompts, peft's MPT and the Bayesian variants
      (`experiments.BAYESIAN_METHODS`: sharded or replicated particles, at equal compute or equal data, the
      likelihood scaled by M, plain or decomposed target prompt, starting from the particles' mean or from one
      particle) on 16-shot targets, every source stage initialised as the target prompts are;
    - multitask: one shared prompt and ComPT in both designs trained on all tasks; one prompt per task is the
      single-task prompt tuning runs of the same tasks, seed, LRs and steps (listed here, run once).
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
    if claim == "residual":
        targets = [replace(base, tasks=(t,)) for t in budget.residual_tasks]
        if budget.full_data:
            task, examples, steps = budget.full_data
            targets.append(replace(base, tasks=(task,), data="full", train_examples=examples, steps=steps))
        runs += [replace(run, method="zero_shot", steps=0) for run in targets if seed == budget.seeds[0]]
        for run in targets:
            for method in ("prompt_tuning", "residual", "residual_embedding_rms", "p_tuning"):
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
            for method in TRANSFER_METHODS:
                runs += _causal_sweep(budget, chosen_lr, replace(target, method=method))
    elif budget.multitask:
        runs += zero_shot(budget.multitask)
        runs += [
            run for task in budget.multitask for run in _causal_sweep(budget, chosen_lr, replace(base, tasks=(task,)))
        ]
        for method in ("shared_prompt", "compt", "compt_authors"):
            runs += _causal_sweep(budget, chosen_lr, replace(base, method=method, tasks=budget.multitask))
    return runs


def with_tasks(budget: Union[Budget, CausalBudget], tasks: tuple[str, ...]) -> Union[Budget, CausalBudget]:
    """The budget with `tasks` (built in, or added by a task file) as every claim's targets (`--tasks`).

    Every task needs k-shot splits. They become claim 1's targets, claim 2's (except any that is a source: sources
    are never targets) and, if there are two or more, claim 3's task set; in a causal-LM suite the first task with a
    full training set also gets the bigger-training-set runs (none has: those runs are left out)."""
    from benchmarks.tasks import TASKS

    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"Unknown tasks {unknown}: choose from {sorted(TASKS)} or add them with --task-file.")
    no_kshot = [t for t in tasks if "kshot-train" not in TASKS[t].splits]
    if no_kshot:
        raise ValueError(f"Tasks {no_kshot} have no k-shot splits, which every claim trains on.")
    targets = tuple(t for t in tasks if t not in budget.sources)
    multitask = tuple(tasks) if len(tasks) > 1 else ()
    if isinstance(budget, Budget):
        return replace(
            budget,
            residual_tasks=tuple(tasks),
            transfer_targets=tuple((t, "kshot") for t in targets),
            multitask=multitask,
        )
    full = next((t for t in tasks if "train" in TASKS[t].splits), None)
    full_data = (full, *budget.full_data[1:]) if full and budget.full_data else None
    return replace(
        budget, residual_tasks=tuple(tasks), full_data=full_data, transfer_targets=targets, multitask=multitask
    )


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


def suite_budget(name: str, tasks: Optional[tuple[str, ...]] = None) -> Union[Budget, CausalBudget]:
    """A suite's budget, with `tasks` as its targets if given."""
    return with_tasks(SUITES[name], tuple(tasks)) if tasks else SUITES[name]
