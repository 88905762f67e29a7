"""Recorded SmolLM2 suite runs reproduced with the prompt concatenated and with it shared.

The SmolLM2 suite (`benchmarks/results/smollm2/runs.jsonl`) was recorded before the shared-prefix path existed:
every prompt was concatenated in front of every row. This study runs some of those runs again, as the suite's runner
runs them, once with `shared_prefix="off"` (peft's concatenation) and once with `"on"` (peft's own `PROMPT_TUNING`
and `P_TUNING` through `enable_shared_prefix`), and compares the logged training losses (the mean over each tenth of
the steps) and the final test and dev metrics with each other and with the record. The runs were recorded with
transformers 5.24.0; a reproduction on another release may differ from the record by that release's numerics, and
the two paths are compared with each other on the same release.

The training times are paired ratios of the two paths on the same machine and load, and are set against the
recorded time (measured by a suite worker sharing 2 cores with another).

    python -m benchmarks study shared-prefix-reproduction --output benchmarks/results/shared_prefix_reproduction.json
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

import peft_prompt_transfer as ppt
from benchmarks.core import runner
from benchmarks.core.backbone import Backbone
from benchmarks.core.harness import load_records, measurement_parser, versions, write_report
from benchmarks.core.methods import METHODS
from benchmarks.core.specs import RunSpec

RECORDS = Path(__file__).resolve().parents[1] / "results" / "smollm2" / "runs.jsonl"
# (method, task, lr) of seed 13, 20 virtual tokens, 16-shot: each method family once, and a task with longer inputs
DEFAULT_RUNS = (
    ("prompt_tuning", "trec", 0.01),
    ("p_tuning", "trec", 0.01),
    ("residual", "trec", 0.01),
    ("prompt_tuning", "subj", 0.01),
)


def recorded_run(method: str, task: str, lr: float) -> dict:
    """The SmolLM2 suite's record of `method` on 16-shot `task`, seed 13, 20 virtual tokens, at `lr`."""
    for record in load_records(RECORDS):
        if (
            "error" not in record
            and record["method"] == method
            and record["tasks"] == [task]
            and record["seed"] == 13
            and record["lr"] == lr
            and record["num_virtual_tokens"] == 20
            and record.get("data", "kshot") == "kshot"
        ):
            return record
    raise ValueError(f"No recorded SmolLM2 run of {method} on {task} at lr {lr} (seed 13, 20 tokens).")


def with_shared_prefix(method: str, mode: str) -> None:
    """Make the runner build `method` with its prompt run as `mode` says (this process only)."""
    build = METHODS[method].build

    def build_with_mode(backbone, spec, base, train_set):
        model, details = build(backbone, spec, base, train_set)
        config = model.active_peft_config
        if isinstance(config, (ppt.ResidualPromptConfig, ppt.ComPTConfig, ppt.BayesianPromptConfig)):
            config.shared_prefix = mode
        else:
            ppt.enable_shared_prefix(model, mode)
        return model, details

    METHODS[method] = dataclasses.replace(METHODS[method], build=build_with_mode)


def max_relative_difference(a: list[float], b: list[float]) -> float:
    """The largest |a - b| / |b| over two logged loss curves of one length."""
    if len(a) != len(b):
        raise ValueError(f"loss curves of different lengths: {len(a)} and {len(b)}")
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def reproduce(method: str, task: str, lr: float, backbone: Backbone) -> dict:
    record = recorded_run(method, task, lr)
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(record["key"]).items()}
    spec = RunSpec(**fields)
    original = METHODS[method]
    runs = {}
    try:
        for mode in ("off", "on"):
            with_shared_prefix(method, mode)
            runs[mode] = runner.run(spec, backbone)
            METHODS[method] = original
    finally:
        METHODS[method] = original
    off, on = runs["off"], runs["on"]
    return {
        "method": method,
        "task": task,
        "lr": lr,
        "key": record["key"],
        "recorded": {k: record[k] for k in ("losses", "metric", "dev_metric", "train_seconds")},
        "off": {k: off[k] for k in ("losses", "metric", "dev_metric", "train_seconds")},
        "on": {k: on[k] for k in ("losses", "metric", "dev_metric", "train_seconds")},
        "on_vs_off_losses": max_relative_difference(on["losses"], off["losses"]),
        "off_vs_recorded_losses": max_relative_difference(off["losses"], record["losses"]),
        "on_vs_recorded_losses": max_relative_difference(on["losses"], record["losses"]),
        "on_over_off_seconds": on["train_seconds"] / off["train_seconds"],
        "on_over_recorded_seconds": on["train_seconds"] / record["train_seconds"],
    }


def table(report: dict) -> str:
    lines = [
        "| run | losses: on vs off | off vs recorded | test: recorded / off / on | dev: recorded / off / on | "
        "train s: on / off (recorded) |",
        "|---|---:|---:|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['method']} {r['task']} lr {r['lr']:g} | {r['on_vs_off_losses']:.1e} | "
            f"{r['off_vs_recorded_losses']:.1e} | "
            f"{r['recorded']['metric']:.3f} / {r['off']['metric']:.3f} / {r['on']['metric']:.3f} | "
            f"{r['recorded']['dev_metric']:.3f} / {r['off']['dev_metric']:.3f} / {r['on']['dev_metric']:.3f} | "
            f"{r['on']['train_seconds']:.0f} / {r['off']['train_seconds']:.0f} ({r['recorded']['train_seconds']:.0f}) |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = measurement_parser("study shared-prefix-reproduction", __doc__, "shared_prefix_reproduction.json")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--runs",
        nargs="+",
        default=[f"{m}:{t}:{lr:g}" for m, t, lr in DEFAULT_RUNS],
        help="METHOD:TASK:LR of recorded seed-13 runs (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    backbone = Backbone.load("smollm2")
    results = []
    for run in args.runs:
        method, task, lr = run.split(":")
        results.append(reproduce(method, task, float(lr), backbone))
        report = {
            "command": "python -m benchmarks study shared-prefix-reproduction " + " ".join(argv or []),
            "threads": args.threads,
            "versions": versions(),
            "results": results,
        }
        write_report(report, args.output, table)  # after each run: a killed study keeps what it measured
    return report
