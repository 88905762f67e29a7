"""Which particle assignment (and likelihood scale) gives the better source-stage posterior for transfer.

In SVGD as its authors wrote it (github.com/DartML/Stein-Variational-Gradient-Descent, `python/svgd.py`), the
gradient of the log posterior is evaluated for every particle on the same data, so every particle sees the whole
minibatch. `particle_assignment="sharded"` (our default) gives particle `m` the rows `b mod M` of a batch: one forward
pass for all particles, but each particle's gradient comes from 1/M of the batch. This trains the source stage on
all-MiniLM-L6-v2 (`SEQ_CLS`, the benchmark suite's source recipe: SST-2 + CoLA mixed, vocabulary init, 4 particles)
in these settings:

- `sharded`: batch 16, each particle sees 4 rows (cost: 16 rows a step);
- `replicated, equal steps`: batch 16 expanded 4 times, each particle sees all 16 (64 rows a step);
- `replicated, equal compute`: batch 4 expanded 4 times, each particle sees all 4 (16 rows a step);
- `sharded, likelihood_scale=M`: sharded, with the data term M times larger,

all for the same number of steps, and reports for each posterior: the particles' spread (mean pairwise distance
over mean norm), the source dev accuracy of the posterior mean (the prompt a target starts from) with the source
head, and the k-shot accuracy of target runs started from that mean on a held-out task.

    python -m benchmarks study svgd-assignment --output benchmarks/results/svgd_assignment.json
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from peft import get_peft_model

import peft_prompt_transfer as ppt
from benchmarks.core.backbone import Backbone
from benchmarks.core.harness import measurement_parser, versions, write_report
from benchmarks.core.sources import label_offsets, num_labels, particle_spread, source_data
from benchmarks.core.specs import BAYESIAN_PARTICLES, SourceSpec
from benchmarks.core.tasks import TASKS, load_split
from benchmarks.core.training import prompt_and_head_optimizer, train

# (name, particle_assignment, source batch size, likelihood_scale)
SETTINGS = (
    ("sharded", "sharded", 16, 1.0),
    ("replicated, equal steps", "replicated", 16, 1.0),
    ("replicated, equal compute", "replicated", 4, 1.0),
    ("sharded, likelihood_scale=M", "sharded", 16, float(BAYESIAN_PARTICLES)),
)


def source_stage(backbone: Backbone, args, assignment: str, batch_size: int, likelihood_scale: float, folder: Path):
    """Train and save one source-stage posterior; returns its measurements."""
    source = SourceSpec(
        "bayesian",
        "minilm",
        tuple(args.sources),
        args.num_virtual_tokens,
        steps=args.source_steps,
        batch_size=batch_size,
        lr=args.source_lr,
        seed=args.seed,
    )
    data = ppt.combine_tasks(source_data(backbone, source, multitask=True), sampling="equal", seed=args.seed)
    config = ppt.BayesianPromptConfig(
        task_type="SEQ_CLS",
        num_virtual_tokens=args.num_virtual_tokens,
        num_particles=BAYESIAN_PARTICLES,
        source_tasks=list(args.sources),
        particle_assignment=assignment,
        likelihood_scale=likelihood_scale,
        prompt_tuning_init="SAMPLE_VOCAB",
    )
    model = get_peft_model(backbone.base_model(num_labels(args.sources), args.seed), config)
    collator = (
        ppt.ParticleReplicationCollator(BAYESIAN_PARTICLES, backbone.collator()) if assignment == "replicated" else None
    )
    log = train(
        model,
        data,
        backbone,
        prompt_and_head_optimizer(model, args.source_lr),
        args.source_steps * len(args.sources),
        batch_size,
        args.seed,
        collator=collator,
    )
    model.save_pretrained(folder)
    source_accuracy = {}
    for task, offset in zip(args.sources, label_offsets(args.sources)):
        dev = load_split(task, "dev").shuffle(seed=0).select(range(args.max_eval))
        source_accuracy[task] = backbone.evaluate(model, dev, task, label_offset=offset)["metric"]
    return {
        "spread": particle_spread(model.prompt_encoder["default"].particles.detach()),
        "source_dev": source_accuracy,
        "source_seconds": log["train_seconds"],
        "rows_per_step": batch_size * (BAYESIAN_PARTICLES if assignment == "replicated" else 1),
    }


def target_stage(backbone: Backbone, args, folder: Path, seed: int) -> float:
    """k-shot accuracy of a target prompt started from the posterior mean."""
    task = args.target
    train_set = backbone.encode(load_split(task, "kshot-train", seed=seed), task, train=True)
    config = ppt.BayesianPromptConfig(
        task_type="SEQ_CLS", num_virtual_tokens=args.num_virtual_tokens, stage="target", posterior=str(folder)
    )
    model = get_peft_model(backbone.base_model(TASKS[task].num_labels, seed), config)
    train(model, train_set, backbone, prompt_and_head_optimizer(model, args.target_lr), args.target_steps, 8, seed)
    test = load_split(task, "kshot-test", seed=seed).shuffle(seed=0).select(range(args.max_eval))
    return backbone.evaluate(model, test, task)["metric"]


def table(report: dict) -> str:
    sources = report["settings"]["sources"]
    lines = [
        f"| setting | rows/step | source s | spread | {' | '.join(f'{s} dev (mean)' for s in sources)} | "
        f"{report['settings']['target']} k-shot from mean |",
        "|---" + "|---:" * (4 + len(sources)) + "|",
    ]
    for r in report["results"]:
        target = r["target"]
        lines.append(
            f"| {r['setting']} | {r['rows_per_step']} | {r['source_seconds']:.0f} | {r['spread']:.3f} | "
            + " | ".join(f"{r['source_dev'][s]:.3f}" for s in sources)
            + f" | {sum(target.values()) / len(target):.3f} ({', '.join(f'{v:.3f}' for v in target.values())}) |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = measurement_parser("study svgd-assignment", __doc__, output="svgd_assignment.json")
    parser.add_argument("--sources", nargs="+", default=["sst2", "cola"])
    parser.add_argument("--target", default="mr")
    parser.add_argument("--source-steps", type=int, default=50, help="Steps per source task.")
    parser.add_argument("--source-lr", type=float, default=1e-1)
    parser.add_argument("--target-steps", type=int, default=50)
    parser.add_argument("--target-lr", type=float, default=1e-1)
    parser.add_argument("--target-seeds", type=int, nargs="+", default=[13, 21])
    parser.add_argument("--num-virtual-tokens", type=int, default=20)
    parser.add_argument("--max-eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--settings",
        nargs="+",
        choices=[name for name, *_ in SETTINGS],
        default=[name for name, *_ in SETTINGS],
        help="Which settings to run (default: all).",
    )
    args = parser.parse_args(argv)
    backbone, results = Backbone.load("minilm"), []
    for name, assignment, batch_size, likelihood_scale in SETTINGS:
        if name not in args.settings:
            continue
        with tempfile.TemporaryDirectory() as folder:
            result = {
                "setting": name,
                **source_stage(backbone, args, assignment, batch_size, likelihood_scale, Path(folder)),
            }
            result["target"] = {seed: target_stage(backbone, args, Path(folder), seed) for seed in args.target_seeds}
        results.append(result)
        print(json.dumps(result), flush=True)
    report = {
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
        "versions": versions(),
        "results": results,
    }
    return write_report(report, args.output, table)


if __name__ == "__main__":
    main()
