"""What each claim-2 initialisation knows before the target trains: the SmolLM2 suite's prompts scored at step 0.

Claim 2 says that a target prompt started from the Bayesian posterior of the source prompts does better than one
started from the vocabulary, from the best single source prompt (SPoT), from the average of the source prompts or
from peft's MPT. After 40 target steps the suite cannot tell them apart (`benchmarks/RESULTS.md`); this asks what
each starting point carries. It builds every claim-2 method's model as the suite does (the same cached source
stages, the first sweeping seed's prompt initialisation), trains nothing, and scores each starting prompt on the
suite's test subsets of the targets and of the source SST-2: accuracy, and the mean loss of the right label word.
For the posteriors it also scores every particle alone, and gives the particles' spread (mean pairwise distance
over mean norm) and the mean norm of a prompt token, next to the vocabulary's.

    python -m benchmarks study transfer-inits --output benchmarks/results/transfer_inits.json

The source stages come from the cache when the suite has run (`python -m benchmarks smollm2 --claims transfer`);
otherwise they are trained first, as the suite would.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace

import torch
from peft import PeftModel, get_peft_model

import peft_prompt_transfer as ppt
from benchmarks.core.backbone import Backbone
from benchmarks.core.harness import measurement_parser, versions, write_report
from benchmarks.core.methods import prompt_tuning_config
from benchmarks.core.runner import build_model, evaluation_set, training_data
from benchmarks.core.sources import ensure_source, particle_spread, source_prompts
from benchmarks.core.specs import BAYESIAN_PARTICLES, POSTERIOR_KINDS, RunSpec
from benchmarks.core.tasks import TASKS
from benchmarks.suites.budgets import SUITES, CausalBudget
from benchmarks.suites.plans import causal_runs


def _prompt(model) -> torch.Tensor:
    """The prompt a model starts from, as `[num_virtual_tokens, hidden]`."""
    return model.get_prompt_embedding_to_save("default").detach().reshape(-1, model.config.hidden_size)


def starting_points(backbone: Backbone, spec: RunSpec) -> Iterator[tuple[str, PeftModel]]:
    """Every claim-2 starting prompt for `spec`'s target as (name, model ready to score), in the suite's order; one
    model at a time, since each holds its own copy of the base model."""
    task = spec.tasks[0]
    train_set = backbone.encode(training_data(task, spec)[0], task, train=True)
    for method in ("prompt_tuning", "source_average", "mpt", *POSTERIOR_KINDS):
        yield method, build_model(backbone, replace(spec, method=method), train_set)[0]
    for source, prompt in source_prompts(backbone, spec).items():  # SPoT's candidates, each alone
        model = get_peft_model(
            backbone.base_model(TASKS[task].num_labels, spec.seed), prompt_tuning_config(backbone, spec)
        )
        model.prompt_encoder["default"].embedding.weight.data.copy_(prompt)
        yield f"source prompt: {source}", model
    for kind in POSTERIOR_KINDS:
        folder = ensure_source(backbone, spec.source(kind))
        for k in range(BAYESIAN_PARTICLES):
            config = ppt.BayesianPromptConfig(
                task_type=backbone.task_type,
                num_virtual_tokens=spec.num_virtual_tokens,
                stage="target",
                posterior=str(folder),
                target_init=f"particle:{k}",
            )
            yield f"{kind} particle {k}", get_peft_model(backbone.base_model(TASKS[task].num_labels, spec.seed), config)


def posterior_geometry(backbone: Backbone, spec: RunSpec) -> dict:
    """Per posterior: the particles' spread, and the mean token norm of a particle and of the mean."""
    from safetensors.torch import load_file

    geometry = {}
    for kind in POSTERIOR_KINDS:
        particles = load_file(ensure_source(backbone, spec.source(kind)) / "adapter_model.safetensors")["particles"]
        geometry[kind] = {
            "spread": particle_spread(particles),
            "particle_token_norm": particles.norm(dim=-1).mean().item(),
            "mean_token_norm": particles.mean(0).norm(dim=-1).mean().item(),
        }
    return geometry


def table(report: dict) -> str:
    """The report as a markdown table: accuracy (loss) per starting prompt and task."""
    tasks = report["settings"]["tasks"]
    lines = [
        "| starting prompt | token norm | " + " | ".join(f"{t} acc. (loss)" for t in tasks) + " |",
        "|---|---:|" + "---:|" * len(tasks),
    ]
    for name, row in report["results"].items():
        cells = [f"{100 * row[t]['metric']:.1f} ({row[t]['loss']:.2f})" for t in tasks]
        lines.append(f"| {name} | {row['token_norm']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = measurement_parser("study transfer-inits", __doc__, output="transfer_inits.json")
    parser.add_argument(
        "--tasks", nargs="+", default=["mr", "subj", "sst2"], help="Tasks to score every starting prompt on."
    )
    parser.add_argument("--seed", type=int, default=13, help="The k-shot seed whose prompt initialisation is used.")
    parser.add_argument(
        "--suite",
        default="smollm2",
        choices=[name for name, budget in SUITES.items() if isinstance(budget, CausalBudget)],
        help="The suite whose source stages and budget are used.",
    )
    args = parser.parse_args(argv)
    budget = SUITES[args.suite]
    backbone = Backbone.load(budget.model)
    # the suite's own claim-2 run on the first target (its sources, budget and seed), with nothing trained
    suite_run = next(run for run in causal_runs(budget, "transfer", args.seed) if run.method == "bayesian")
    spec = replace(suite_run, method="prompt_tuning", lr=0.0)
    results = {}
    for name, model in starting_points(backbone, spec):
        row = {"token_norm": _prompt(model).norm(dim=-1).mean().item()}
        for task in args.tasks:
            test = evaluation_set(task, replace(spec, tasks=(task,)))
            row[task] = backbone.evaluate(model, test, task, task_id=0 if name == "mpt" else None)  # MPT needs one
        results[name] = row
        print(json.dumps({name: row}), flush=True)
    vocabulary = backbone.base_model(TASKS[spec.tasks[0]].num_labels, args.seed).get_input_embeddings().weight
    report = {
        "settings": {**vars(args), "spec": spec.key()},
        "versions": versions(),
        "vocabulary_token_norm": vocabulary.norm(dim=-1).mean().item(),
        "posteriors": posterior_geometry(backbone, spec),
        "results": results,
    }
    return write_report(report, args.output, table)


if __name__ == "__main__":
    main()
