"""The job scheduler of a suite: run the planned runs that have no record, in one process or in several that share
one run queue, and append a record per run.

A killed suite continues where it stopped: runs that already have a record are skipped, and a run that failed is
tried again. Workers of one invocation claim runs in a queue folder (one file per run, created atomically), and a
worker whose next run needs a source stage that another process is building takes a run it can start instead.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional

import datasets
import torch
import transformers
from tqdm.auto import tqdm

from benchmarks.core import runner
from benchmarks.core.backbone import Backbone
from benchmarks.core.harness import append_record, being_built, is_built, load_records, versions
from benchmarks.core.methods import source_stage
from benchmarks.core.specs import RunSpec, SourceSpec
from benchmarks.suites.plans import WAITING_LR, suite_runs


def run_workers(args: argparse.Namespace) -> int:
    """Run the suite in `args.workers` processes (the threads divided) that share one run queue; 1 if one failed.

    Each worker takes the next run no worker has claimed yet, so a worker that drew the slow runs (SmolLM2 takes
    ten times as long as MiniLM) never leaves the others idle, however the remaining runs are ordered.
    """
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
            invoked_as(args),
        ]
        + (["--data-dir", args.data_dir] if args.data_dir else [])
        + task_options(args)
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
    return 1 if failed else 0


def claim_run(queue: str, key: str) -> bool:
    """Claim a run for this worker; False when another worker of the same invocation already has it."""
    path = os.path.join(queue, claim_name(key))
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))  # atomic: exactly one worker succeeds
    except FileExistsError:
        return False
    return True


def claim_name(key: str) -> str:
    """The queue file that claims the run of `key`."""

    return hashlib.sha1(key.encode()).hexdigest()


def invoked_as(args: argparse.Namespace) -> str:
    """The command line a record is attributed to: the user's, not a worker's internal one."""
    return args.invoked_as or "python -m benchmarks " + " ".join(args.argv)


def task_options(args: argparse.Namespace) -> list[str]:
    """The task options a worker needs to see the same runs as the user's command."""
    return (["--task-file", *args.task_file] if args.task_file else []) + (
        ["--tasks", *args.tasks] if args.tasks else []
    )


def run_suite(args: argparse.Namespace) -> int:
    """Run the runs of this process's share of the suite that have no record; 1 if a run failed."""
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
    while runs := runs_to_do(args, records_path, attempted, announce):
        announce = False
        progress = tqdm(runs, desc=name, unit="run", dynamic_ncols=True, position=args.progress_position)
        for index, (claim, spec) in enumerate(progress):  # with a queue the bar counts the runs any worker has started
            if wait_elsewhere(spec, runs[index + 1 :], args.queue):
                continue  # unclaimed: the next round plans it again
            if args.queue and (stage := source_stage(spec)) and not is_built(stage.folder()):
                # before the claim: whichever worker wins it builds the stage, and the other sees that at once
                Path(args.queue, stage_claim_name(stage)).touch()
            if args.queue and not claim_run(args.queue, spec.key()):
                continue
            attempted.add(spec.key())
            progress.set_postfix_str(f"{claim}: {spec.method} {'+'.join(spec.tasks)} seed {spec.seed} lr {spec.lr:g}")
            record = {"key": spec.key(), "claim": claim, **json.loads(spec.key())}
            try:
                if spec.model not in backbones:
                    backbones[spec.model] = Backbone.load(spec.model)
                record.update(runner.run(spec, backbones[spec.model]))
            except Exception as exc:  # recorded and retried on the next run; the suite goes on
                failures += 1
                record["error"] = "".join(traceback.format_exception(exc))[-4000:]
                progress.write(f"FAILED {spec.method} {spec.tasks} seed {spec.seed}: {exc!r}")
            record.update(
                versions=package_versions,
                command=invoked_as(args),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            )
            append_record(records_path, record)
        progress.close()
    if failures:
        print(f"{failures} run(s) failed; their tracebacks are in {records_path} (run the command again to retry)")
    return 1 if failures else 0


def claimed(queue: Optional[str], spec: RunSpec) -> bool:
    """Whether a worker of `queue` has claimed the run `spec`."""
    return bool(queue) and os.path.exists(os.path.join(queue, claim_name(spec.key())))


def stage_claim_name(stage: SourceSpec) -> str:
    """The queue file that says a worker of the queue builds `stage`."""
    return f"stage-{stage.folder().name}"


def wait_elsewhere(spec: RunSpec, later: list[tuple[str, RunSpec]], queue: Optional[str]) -> bool:
    """Whether to leave `spec` for a later round: the source stage it needs is not built, another process builds it
    (or a worker of this queue has claimed a run that will), and one of the `later` runs that no worker has claimed
    can start now. The workers of a suite all start with runs that need the same stage; the second one builds the
    next stage rather than wait an hour for the first."""

    def blocked(run) -> bool:
        stage = source_stage(run)
        if stage is None or is_built(stage.folder()):
            return False
        return (
            bool(queue) and os.path.exists(os.path.join(queue, stage_claim_name(stage))) or being_built(stage.folder())
        )

    return blocked(spec) and any(not claimed(queue, run) and not blocked(run) for _, run in later)


def runs_to_do(
    args: argparse.Namespace, records_path: Path, attempted: set[str], announce: bool
) -> list[tuple[str, RunSpec]]:
    """The runs of this worker's share that have no record, that this process has not attempted and (with a queue)
    no worker has claimed, planned from the records so far. When only runs that wait for the sweeping seeds' learning
    rates are left while other workers still run sweeping runs, it waits for those rather than leave the later seeds
    to the other workers."""
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
            and not (claimed(args.queue, spec) and spec.key() in failed)
        ]
        todo = [(claim, spec) for claim, spec in open_runs if not claimed(args.queue, spec)]
        waiting = any(spec.lr is WAITING_LR for _, spec in planned)
        if todo or not waiting or len(todo) == len(open_runs):  # nothing runs elsewhere that could unblock them
            return todo
        time.sleep(30)
