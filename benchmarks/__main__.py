"""The benchmarks' one entry point: run a suite, render its report, measure cost, or run a one-off study.

    python -m benchmarks quick                   # a few minutes: every method and claim on a tiny budget (CI smoke test)
    python -m benchmarks full --workers 2        # about 7 h on 2 CPU cores: benchmarks/RESULTS.md
    python -m benchmarks full --claims transfer --models minilm --data kshot
    python -m benchmarks report full             # re-render RESULTS.md and the plots from the records
    python -m benchmarks cost [...]              # step time, memory and inference ratios to PROMPT_TUNING
    python -m benchmarks cost svgd-scaling [...] # SVGD source-stage step time vs the number of particles
    python -m benchmarks cost shared-prefix [...] # the shared prefix's step time against concatenation, on a grid
    python -m benchmarks cost rank [...]         # PromptLibrary.rank against a peft PROMPT_TUNING scoring loop
    python -m benchmarks study NAME [...]        # a one-off measurement behind the docs: prompt-steps,
                                                 # svgd-assignment, transfer-inits or shared-prefix-reproduction

Each finished run appends one JSON record to `<results-dir>/<suite>/runs.jsonl` (method, model, tasks, seed,
hyperparameters, metrics, times, package versions). A killed suite continues where it stopped: runs that already
have a record are skipped, and a run that failed is tried again.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# the measurements `cost` and `study` run: name -> module with a `main(argv)`; each keeps its own options
COST = {
    "ratios": "benchmarks.cost.ratios",
    "svgd-scaling": "benchmarks.cost.svgd_scaling",
    "shared-prefix": "benchmarks.cost.shared_prefix",
    "rank": "benchmarks.cost.rank",
}
STUDIES = {
    "prompt-steps": "benchmarks.studies.prompt_steps",
    "svgd-assignment": "benchmarks.studies.svgd_assignment",
    "transfer-inits": "benchmarks.studies.transfer_inits",
    "shared-prefix-reproduction": "benchmarks.studies.shared_prefix_reproduction",
}


def render_report(args: argparse.Namespace) -> Path:
    """Render the report of `args.suite`'s records (see `benchmarks.report.page.render`)."""
    from benchmarks.report.page import render

    return render(
        args.suite, Path(args.results_dir) / args.suite, Path(args.report) if args.report else None, tasks=args.tasks
    )


def run_measurement(argv: list[str]) -> int:
    """`cost [NAME] ...` (NAME defaults to ratios) or `study NAME ...`: the measurement's own `main`."""
    command, rest = argv[0], argv[1:]
    measurements = COST if command == "cost" else STUDIES
    if command == "cost" and (not rest or rest[0] not in COST):
        rest = ["ratios", *rest]
    if not rest or rest[0] not in measurements:
        names = ", ".join(measurements)
        print(f"usage: python -m benchmarks {command} NAME [options]; NAME is one of {names}", file=sys.stderr)
        return 2
    importlib.import_module(measurements[rest[0]]).main(rest[1:])
    return 0


def parse_shard(text: str) -> tuple[int, int]:
    """`--shard K/N` as (K, N)."""
    shard, _, count = text.partition("/")
    if not (shard.isdigit() and count.isdigit() and int(shard) < int(count)):
        raise argparse.ArgumentTypeError(f"expected K/N with 0 <= K < N, e.g. 0/2; got {text!r}")
    return int(shard), int(count)


def _add_task_options(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--task-file",
        nargs="+",
        default=None,
        metavar="JSON",
        help="add the tasks these JSON files describe (your data: LM-BFF k-shot folders or GLUE-style train/dev "
        "files, a template and label words; see benchmarks.core.tasks.register_tasks), to use with --tasks",
    )
    command.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        help="run every claim on these tasks instead of the suite's (each needs k-shot splits; sources are never "
        "targets; claim 3 needs two or more); give the same --tasks to `report`",
    )


def main(argv=None) -> int:
    from benchmarks.suites.budgets import CLAIMS, DATA, MODELS, SUITES

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("cost", "study"):
        return run_measurement(argv)
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUITES:
        suite = sub.add_parser(name, help=f"run the {name} suite")
        suite.set_defaults(suite=name)
        suite.add_argument("--claims", nargs="+", choices=CLAIMS, default=list(CLAIMS))
        suite.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
        suite.add_argument(
            "--data",
            nargs="+",
            choices=DATA,
            default=list(DATA),
            help="keep the runs on these target data: kshot (LM-BFF 16-shot splits), fewglue, or full (a part of "
            "a full training set)",
        )
        suite.add_argument(
            "--data-dir",
            default=None,
            help="the shared data folder (default: $PEFT_PROMPT_TRANSFER_DATA or ../shared/data)",
        )
        suite.add_argument(
            "--results-dir", default=str(RESULTS_DIR), help="records go to <results-dir>/<suite>/runs.jsonl"
        )
        suite.add_argument(
            "--report",
            default=None,
            help="where to write the Markdown report "
            "(default: benchmarks/RESULTS.md for full, <results-dir>/<suite>/RESULTS.md otherwise)",
        )
        suite.add_argument("--threads", type=int, default=os.cpu_count() or 1)
        suite.add_argument("--no-report", action="store_true")
        suite.add_argument(
            "--workers",
            type=int,
            default=1,
            help="processes to split the suite over (each gets --threads / workers threads); "
            "on 2 cores, 2 workers of 1 thread finish sooner than 1 of 2",
        )
        suite.add_argument("--progress-position", type=int, default=0, help=argparse.SUPPRESS)
        suite.add_argument("--invoked-as", default=None, help=argparse.SUPPRESS)  # set by --workers for its workers
        suite.add_argument("--queue", default=None, help=argparse.SUPPRESS)  # the claims folder --workers shares
        suite.add_argument(
            "--shard",
            type=parse_shard,
            default=(0, 1),
            metavar="K/N",
            help="run every N-th run starting at the K-th (0-based), to split a suite over N processes "
            "that append to the same records file",
        )
    report = sub.add_parser("report", help="render the report of a suite's records")
    report.add_argument("suite", choices=list(SUITES))
    report.add_argument("--results-dir", default=str(RESULTS_DIR))
    report.add_argument("--report", default=None)
    for command in (*sub.choices.values(),):
        _add_task_options(command)
    # listed for --help only: `main` hands a measurement's arguments to the measurement itself
    sub.add_parser("cost", help=f"measure cost: {' | '.join(COST)} (default ratios), each with its own options")
    sub.add_parser("study", help=f"run a one-off study: {' | '.join(STUDIES)}, each with its own options")
    args = parser.parse_args(argv)
    args.argv = argv
    if args.task_file:
        from benchmarks.core.tasks import register_tasks

        for path in args.task_file:
            register_tasks(path)
    if args.tasks:
        from benchmarks.suites.budgets import suite_budget

        try:
            suite_budget(args.suite, args.tasks)
        except ValueError as exc:
            parser.error(str(exc))
    if args.command == "report":
        print(render_report(args))
        return 0
    from benchmarks.suites.scheduler import run_suite, run_workers

    status = run_workers(args) if args.workers > 1 else run_suite(args)
    if not args.no_report:
        print(f"report: {render_report(args)}")
    return status


if __name__ == "__main__":
    sys.exit(main())
