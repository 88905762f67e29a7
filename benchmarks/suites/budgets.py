"""The benchmark suites' budgets: seeds, learning-rate sweeps, prompt lengths, steps and tasks, one per suite.

Every method in a comparison gets the same prompt length, steps, batch size, seeds and a learning-rate sweep of
the same size (full fine-tuning sweeps the same number of values, on its own scale).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Union

from benchmarks.core.tasks import KSHOT_SEEDS, TASKS


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
    (`python -m benchmarks study prompt-steps`). Every run records its dev-set score, on which each method's LR is chosen.

    The first `sweep_seeds` seeds run every LR; the LR with the best dev score pooled over them (see
    `benchmarks.core.selection.choose_lr`) is then the only one the later seeds run, which cuts a 5-seed suite with
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
    # the library claim: source prompts trained once on these tasks (their training sets without the targets'
    # held-out text, `benchmarks.core.library_data`), ranked and transferred to 16-shot `library_targets`; the
    # oracle fine-tunes every source on each target with the first `oracle_seeds` seeds
    library_sources: tuple[str, ...] = ()
    library_targets: tuple[str, ...] = ()
    oracle_seeds: int = 0

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
    # first sweep, and at one LR AdamW moves such a prompt 30-130x further per step (python -m benchmarks study prompt-steps)
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
        library_sources=("sst2", "mpqa"),
        library_targets=("mr",),
        oracle_seeds=1,
    ),
    # the library suite (`python -m benchmarks smollm2-library --workers 2`): 8 source prompts (100 steps each) and
    # a posterior over them (800 steps) first, then per target 54 runs (the sweeping seeds: 6 methods x 3 LRs) and
    # 16 oracle runs: 284 runs at about 3 min each on 2 cores, about 15 h
    "smollm2-library": CausalBudget(
        model="smollm2",
        seeds=KSHOT_SEEDS,
        prompt_lrs=(3e-3, 1e-2, 3e-2),
        mlp_prompt_lrs=(1e-3, 3e-3, 1e-2),
        num_virtual_tokens=20,
        short_virtual_tokens=2,
        steps=40,
        max_eval=300,
        residual_tasks=(),
        full_data=None,
        sources=(),
        source_steps=100,
        transfer_targets=(),
        multitask=(),
        sweep_seeds=2,
        library_sources=("sst2", "cola", "rte", "qnli", "mnli", "snli", "qqp", "mpqa"),
        library_targets=("mr", "subj", "trec", "cr"),
        oracle_seeds=2,
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


CLAIMS = ("residual", "transfer", "multitask", "library")
MODELS = ("minilm", "smollm2")
DATA = ("kshot", "fewglue", "full")


def with_tasks(budget: Union[Budget, CausalBudget], tasks: tuple[str, ...]) -> Union[Budget, CausalBudget]:
    """The budget with `tasks` (built in, or added by a task file) as every claim's targets (`--tasks`).

    Every task needs k-shot splits. They become claim 1's targets, claim 2's (except any that is a source: sources
    are never targets) and, if there are two or more, claim 3's task set; in a causal-LM suite the first task with a
    full training set also gets the bigger-training-set runs (none has: those runs are left out)."""
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
    library_targets = tuple(t for t in tasks if t not in budget.library_sources) if budget.library_sources else ()
    if budget.library_sources and not (budget.residual_tasks or budget.transfer_targets or budget.multitask):
        # a library-only suite: the tasks are its targets and nothing else
        return replace(budget, library_targets=library_targets)
    return replace(
        budget,
        residual_tasks=tuple(tasks),
        full_data=full_data,
        transfer_targets=targets,
        multitask=multitask,
        library_targets=library_targets,
    )


def suite_budget(name: str, tasks: Optional[tuple[str, ...]] = None) -> Union[Budget, CausalBudget]:
    """A suite's budget, with `tasks` as its targets if given."""
    return with_tasks(SUITES[name], tuple(tasks)) if tasks else SUITES[name]
