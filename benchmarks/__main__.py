"""Run a benchmark suite and render its report.

    python -m benchmarks quick                # a few minutes: every method and claim on a tiny budget (CI smoke test)
    python -m benchmarks full --workers 2     # about 7 h on 2 CPU cores: benchmarks/RESULTS.md
    python -m benchmarks full --claims transfer --models minilm --data kshot
    python -m benchmarks report full          # re-render RESULTS.md and the plots from the records
    python -m benchmarks cost [...]           # step time, memory and inference ratios to PROMPT_TUNING
    python -m benchmarks svgd-scaling [...]   # SVGD source-stage step time vs the number of particles

Each finished run appends one JSON record to `<results-dir>/<suite>/runs.jsonl` (method, model, tasks, seed,
hyperparameters, metrics, times, package versions). A killed suite continues where it stopped: runs that already
have a record are skipped, and a run that failed is tried again.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def run_workers(args) -> int:
    """Run the suite in `args.workers` processes (the threads divided) that share one run queue, then render once.

    Each worker takes the next run no worker has claimed yet, so a worker that drew the slow runs (SmolLM2 takes
    ten times as long as MiniLM) never leaves the others idle, however the remaining runs are ordered.
    """
    import shutil
    import signal
    import subprocess
    import tempfile

    threads = max(1, args.threads // args.workers)
    queue = tempfile.mkdtemp(prefix="benchmarks-queue-")  # per invocation: a killed run leaves no stale claims
    options = (
        [
            args.suite,
            "--claims",
            *args.claims,
            "--models",
            *args.models,
            "--data",
            *args.data,
            "--results-dir",
            args.results_dir,
            "--threads",
            str(threads),
            "--no-report",
            "--queue",
            queue,
            "--invoked-as",
            _command(args),
        ]
        + (["--data-dir", args.data_dir] if args.data_dir else [])
        + _task_options(args)
    )
    # `kill PID` of this process stops its workers too (they would go on, orphaned) and removes the queue
    stop = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    workers = []
    try:
        for k in range(args.workers):
            workers.append(
                subprocess.Popen([sys.executable, "-m", "benchmarks", *options, "--progress-position", str(k)])
            )
        failed = sum(worker.wait() != 0 for worker in workers)
    finally:
        for worker in workers:
            if worker.poll() is None:  # a record is synced as it is appended: a run in progress is all that is lost
                worker.terminate()
                worker.wait()
        shutil.rmtree(queue, ignore_errors=True)
        signal.signal(signal.SIGTERM, stop)
    _report(args)
    return 1 if failed else 0


def claim_run(queue: str, key: str) -> bool:
    """Claim a run for this worker; False when another worker of the same invocation already has it."""
    path = os.path.join(queue, _claim_name(key))
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))  # atomic: exactly one worker succeeds
    except FileExistsError:
        return False
    return True


def _claim_name(key: str) -> str:
    import hashlib

    return hashlib.sha1(key.encode()).hexdigest()


def _command(args) -> str:
    """The command line a record is attributed to: the user's, not a worker's internal one."""
    return args.invoked_as or "python -m benchmarks " + " ".join(args.argv)


def _task_options(args) -> list[str]:
    """The task options a worker needs to see the same runs as the user's command."""
    return (["--task-file", *args.task_file] if args.task_file else []) + (
        ["--tasks", *args.tasks] if args.tasks else []
    )


def _report(args) -> None:
    if not args.no_report:
        from benchmarks.report import render

        report = render(
            args.suite,
            Path(args.results_dir) / args.suite,
            Path(args.report) if args.report else None,
            tasks=args.tasks,
        )
        print(f"report: {report}")


def run_suite(args) -> int:
    import datasets
    import torch
    import transformers
    from tqdm.auto import tqdm

    from benchmarks import experiments
    from benchmarks.harness import append_record, is_built, versions

    if args.data_dir:
        os.environ["PEFT_PROMPT_TRANSFER_DATA"] = args.data_dir
    torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()  # one progress bar for the suite, not one per map() call
    transformers.logging.set_verbosity_error()  # "newly initialised head" reports, once per run
    transformers.logging.disable_progress_bar()
    out = Path(args.results_dir) / args.suite
    out.mkdir(parents=True, exist_ok=True)
    records_path = out / "runs.jsonl"
    backbones, failures, attempted, package_versions = {}, 0, set(), versions()
    name = (
        f"{args.suite} worker {args.progress_position}"
        if args.queue
        else (f"{args.suite} {args.shard[0]}/{args.shard[1]}" if args.shard[1] > 1 else args.suite)
    )
    # rounds: the later seeds' runs become runnable once the sweeping seeds have chosen their learning rates
    announce = True  # how many runs are left, once
    while runs := _runs_to_do(args, records_path, attempted, announce):
        announce = False
        progress = tqdm(runs, desc=name, unit="run", dynamic_ncols=True, position=args.progress_position)
        for index, (claim, spec) in enumerate(progress):  # with a queue the bar counts the runs any worker has started
            if _wait_elsewhere(spec, runs[index + 1 :], args.queue):
                continue  # unclaimed: the next round plans it again
            if args.queue and (stage := spec.source_stage()) and not is_built(stage.folder()):
                # before the claim: whichever worker wins it builds the stage, and the other sees that at once
                Path(args.queue, _stage_claim_name(stage)).touch()
            if args.queue and not claim_run(args.queue, spec.key()):
                continue
            attempted.add(spec.key())
            progress.set_postfix_str(f"{claim}: {spec.method} {'+'.join(spec.tasks)} seed {spec.seed} lr {spec.lr:g}")
            record = {"key": spec.key(), "claim": claim, **json.loads(spec.key())}
            try:
                if spec.model not in backbones:
                    backbones[spec.model] = experiments.Backbone.load(spec.model)
                record.update(experiments.run(spec, backbones[spec.model]))
            except Exception as exc:  # recorded and retried on the next run; the suite goes on
                failures += 1
                record["error"] = "".join(traceback.format_exception(exc))[-4000:]
                progress.write(f"FAILED {spec.method} {spec.tasks} seed {spec.seed}: {exc!r}")
            record.update(
                versions=package_versions,
                command=_command(args),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            )
            append_record(records_path, record)
        progress.close()
    _report(args)
    if failures:
        print(f"{failures} run(s) failed; their tracebacks are in {records_path} (run the command again to retry)")
    return 1 if failures else 0


def _claimed(queue: str | None, spec) -> bool:
    return bool(queue) and os.path.exists(os.path.join(queue, _claim_name(spec.key())))


def _stage_claim_name(stage) -> str:
    return f"stage-{stage.folder().name}"


def _wait_elsewhere(spec, later: list, queue: str | None) -> bool:
    """Whether to leave `spec` for a later round: the source stage it needs is not built, another process builds it
    (or a worker of this queue has claimed a run that will), and one of the `later` runs that no worker has claimed
    can start now. The workers of a suite all start with runs that need the same stage; the second one builds the
    next stage rather than wait an hour for the first."""
    from benchmarks.harness import being_built, is_built

    def blocked(run) -> bool:
        stage = run.source_stage()
        if stage is None or is_built(stage.folder()):
            return False
        return (
            bool(queue) and os.path.exists(os.path.join(queue, _stage_claim_name(stage))) or being_built(stage.folder())
        )

    return blocked(spec) and any(not _claimed(queue, run) and not blocked(run) for _, run in later)


def _runs_to_do(args, records_path: Path, attempted: set, announce: bool) -> list:
    """The runs of this worker's share that have no record, that this process has not attempted and (with a queue)
    no worker has claimed, planned from the records so far. When only runs that wait for the sweeping seeds' learning
    rates are left while other workers still run sweeping runs, it waits for those rather than leave the later seeds
    to the other workers."""
    import time

    from benchmarks.harness import load_records
    from benchmarks.suites import WAITING_LR, suite_runs

    shard, num_shards = args.shard
    while True:
        records = load_records(records_path)
        done = {r["key"] for r in records if "error" not in r}
        failed = {r["key"] for r in records if "error" in r} - done  # in this invocation: not retried, not waited for
        planned = [
            (claim, spec)
            for index, (claim, spec) in enumerate(
                suite_runs(args.suite, args.claims, args.models, args.data, args.tasks, records=records)
            )
            if index % num_shards == shard and spec.key() not in done
        ]
        if announce:
            announce = False
            print(f"{args.suite}: {len(done)} runs already recorded in {records_path}, {len(planned)} to go")
        open_runs = [
            (claim, spec)
            for claim, spec in planned
            if spec.lr is not WAITING_LR
            and spec.key() not in attempted
            and not (_claimed(args.queue, spec) and spec.key() in failed)
        ]
        todo = [(claim, spec) for claim, spec in open_runs if not _claimed(args.queue, spec)]
        waiting = any(spec.lr is WAITING_LR for _, spec in planned)
        if todo or not waiting or len(todo) == len(open_runs):  # nothing runs elsewhere that could unblock them
            return todo
        time.sleep(30)


def _shard(text: str) -> tuple[int, int]:
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
        "files, a template and label words; see benchmarks.tasks.register_tasks), to use with --tasks",
    )
    command.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        help="run every claim on these tasks instead of the suite's (each needs k-shot splits; sources are never "
        "targets; claim 3 needs two or more); give the same --tasks to `report`",
    )


def main(argv=None) -> int:
    from benchmarks.suites import CLAIMS, DATA, MODELS, SUITES

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("cost", "svgd-scaling"):  # the cost benchmarks keep their own options
        from benchmarks import cost, svgd_scaling

        {"cost": cost, "svgd-scaling": svgd_scaling}[argv[0]].main(argv[1:])
        return 0
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
            type=_shard,
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
    args = parser.parse_args(argv)
    args.argv = argv
    if args.task_file:
        from benchmarks.tasks import register_tasks

        for path in args.task_file:
            register_tasks(path)
    if args.tasks:
        from benchmarks.suites import suite_budget

        try:
            suite_budget(args.suite, args.tasks)
        except ValueError as exc:
            parser.error(str(exc))
    if args.command == "report":
        from benchmarks.report import render

        out = Path(args.report) if args.report else None
        print(render(args.suite, Path(args.results_dir) / args.suite, out, tasks=args.tasks))
        return 0
    return run_workers(args) if args.workers > 1 else run_suite(args)


if __name__ == "__main__":
    sys.exit(main())
