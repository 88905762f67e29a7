"""Recorded SmolLM2 suite runs reproduced with the prompt concatenated and with it shared.

The SmolLM2 suite (`benchmarks/results/smollm2/runs.jsonl`) was recorded before the shared-prefix path existed:
every prompt was concatenated in front of every row. This study runs some of those runs again, as the suite's runner
runs them, once with `shared_prefix="off"` (peft's concatenation) and once with `"on"` (peft's own `PROMPT_TUNING`
and `P_TUNING` through `enable_shared_prefix`), and compares the logged training losses (the mean over each tenth of
the steps) and the final test and dev metrics with each other and with the record. The runs were recorded with
transformers 5.24.0; a reproduction on another release may differ from the record by that release's numerics, and
the two paths are compared with each other on the same release.

The training times are paired ratios of the two paths on the same machine and load, and are set against the
recorded time (measured by a suite worker sharing 2 cores with another). The study resumes: runs already in
`--output` are kept, and each new one is recorded with its command, threads and versions.

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


def first_batch_difference(spec: RunSpec, backbone: Backbone) -> dict:
    """The relative differences of the loss and of the prompt's gradient on the first 8 training examples, shared
    against concatenated, before any step: the paths' exactness on the real model, apart from training's dynamics."""
    train_split, _ = runner.training_data(spec.tasks[0], spec)
    train_set = backbone.encode(train_split, spec.tasks[0], train=True)
    batch = backbone.collator()([train_set[i] for i in range(spec.batch_size)])
    found = {}
    for mode in ("off", "on"):
        original = METHODS[spec.method]
        with_shared_prefix(spec.method, mode)
        try:
            model, _ = runner.build_model(backbone, spec, train_set)
        finally:
            METHODS[spec.method] = original
        loss = model(**batch).loss
        loss.backward()
        gradient = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        found[mode] = (loss.detach(), gradient)
    (loss_on, grad_on), (loss_off, grad_off) = found["on"], found["off"]
    return {
        "loss": ((loss_on - loss_off).abs() / loss_off.abs()).item(),
        "gradient": ((grad_on - grad_off).norm() / grad_off.norm()).item(),
    }


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
        "first_batch": first_batch_difference(spec, backbone),
        "on_over_off_seconds": on["train_seconds"] / off["train_seconds"],
        "on_over_recorded_seconds": on["train_seconds"] / record["train_seconds"],
    }


def table(report: dict) -> str:
    lines = [
        "| run | first batch: loss, gradient, on vs off | losses: on vs off | off vs recorded | "
        "test: recorded / off / on | dev: recorded / off / on | train s: on / off (recorded) |",
        "|---|---:|---:|---:|---|---|---|",
    ]
    for r in report["results"]:
        first = r.get("first_batch", {})
        lines.append(
            f"| {r['method']} {r['task']} lr {r['lr']:g} | "
            f"{first.get('loss', float('nan')):.1e}, {first.get('gradient', float('nan')):.1e} | "
            f"{r['on_vs_off_losses']:.1e} | "
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
    # resumable: runs already in the output are kept, the others run and are added
    output = Path(args.output)
    earlier = json.loads(output.read_text()) if output.exists() else {"results": []}
    results = [  # a report of the first format gave every run the command, threads and versions of the report
        {key: earlier[key] for key in ("command", "threads", "versions") if key in earlier} | result
        for result in earlier["results"]
    ]
    done = {(r["method"], r["task"], r["lr"]) for r in results}
    command = "python -m benchmarks study shared-prefix-reproduction " + " ".join(argv or [])
    backbone = Backbone.load("smollm2")
    report = {"results": results}
    for result in results:  # runs measured before the first-batch comparison existed get it now
        if "first_batch" not in result:
            fields = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(result["key"]).items()}
            result["first_batch"] = first_batch_difference(RunSpec(**fields), backbone)
            write_report(report, args.output, table)
    for run in args.runs:
        method, task, lr = run.split(":")
        if (method, task, float(lr)) in done:
            continue
        result = reproduce(method, task, float(lr), backbone)
        results.append({**result, "command": command, "threads": args.threads, "versions": versions()})
        report = {"results": results}
        write_report(report, args.output, table)  # after each run: a killed study keeps what it measured
    return report
