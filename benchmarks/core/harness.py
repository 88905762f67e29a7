"""What every benchmark shares: the timing harness (warm-up calls, then timed repeats),
the package versions each record carries, the append-only JSON-lines file the suites keep their records in, and
cached artefacts that concurrent suite shards build only once."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock, Timeout


def time_repeats(fn: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    """Seconds taken by each of `repeats` calls of `fn`, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def versions() -> dict:
    """The versions of the packages a benchmark result depends on."""
    import platform

    import peft
    import torch
    import transformers

    import peft_prompt_transfer

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "peft_prompt_transfer": peft_prompt_transfer.__version__,
        "python": platform.python_version(),
    }


def load_records(path: Path) -> list[dict]:
    """The records of a results file; a last line cut short by a kill is ignored."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def append_record(path: Path, record: dict) -> None:
    """Append one record as a line and sync it to disk, so a kill loses at most the run in progress."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def build_once(folder: Path, build: Callable[[Path], None], marker: str = "done.json") -> Path:
    """Return `folder`, first calling `build(staging)` to create it if it has no `marker` file yet.

    `build` writes into an empty staging folder, which becomes `folder` only once `build` has returned and the
    marker is there: a killed build leaves nothing that looks finished, and the next build clears what it left. A
    lock file beside `folder` makes other processes that want the same folder (the shards of a suite all start with
    runs needing the same source stages) wait for the first one's build instead of repeating it.
    """
    if is_built(folder, marker):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(_lock_path(folder)):
        if is_built(folder, marker):  # built by another process while this one waited for the lock
            return folder
        for stale in folder.parent.glob(f".staging-{folder.name}-*"):  # left by a killed build: the lock is ours
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".staging-{folder.name}-", dir=folder.parent))
        try:
            build(staging)
            if not (staging / marker).exists():
                raise RuntimeError(f"Building {folder} did not write its {marker}.")
            os.replace(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def is_built(folder: Path, marker: str = "done.json") -> bool:
    """Whether `build_once` has finished building `folder`."""
    return (folder / marker).exists()


def being_built(folder: Path, marker: str = "done.json") -> bool:
    """Whether another process is building `folder` with `build_once` now (it holds the lock and has not finished):
    a run that needs the folder would only wait for it."""
    if is_built(folder, marker) or not _lock_path(folder).exists():
        return False
    lock = FileLock(_lock_path(folder))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False


def _lock_path(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.lock"


def measurement_parser(command: str, doc: str, output: str = "") -> argparse.ArgumentParser:
    """The command line of a measurement (`python -m benchmarks <command>`) with its docstring as the help; with
    `output`, an `--output` option for its JSON report, defaulting to that file name."""
    parser = argparse.ArgumentParser(
        prog=f"python -m benchmarks {command}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    if output:
        parser.add_argument("--output", default=output, help="Where to write the JSON report.")
    return parser


def write_report(report: dict, output: str, table: Callable[[dict], str]) -> dict:
    """Write a measurement's JSON report to `output`, print it as a markdown table and return it."""
    with open(output, "w") as f:
        json.dump(report, f, indent=2)
    print(table(report))
    return report
