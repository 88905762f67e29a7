"""The benchmark suites: which runs test which claim, with what budget.

Every method in a comparison gets the same prompt length, steps, batch size, seeds and a learning-rate sweep of
the same size (full fine-tuning sweeps the same number of values, on its own scale). Runs are ordered seed by
seed across all claims, so a suite stopped early still covers every claim with fewer seeds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from benchmarks.experiments import RunSpec
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
DATA = ("kshot", "fewglue")


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


def suite_runs(name: str, claims=CLAIMS, models=MODELS, data=DATA) -> list[tuple[str, RunSpec]]:
    """(claim, run) pairs of a suite, seed by seed; a run shared by two claims is listed once.

    `models` and `data` ("kshot": LM-BFF 16-shot splits, "fewglue") keep only the runs on those models and data.
    """
    budget, seen, runs = SUITES[name], set(), []
    for seed in budget.seeds:
        for claim in claims:
            for spec in CLAIM_RUNS[claim](budget, seed):
                if spec.model in models and spec.data in data and spec.key() not in seen:
                    seen.add(spec.key())
                    runs.append((claim, spec))
    return runs
