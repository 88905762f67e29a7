"""Two-process DDP and FSDP2 training (gloo on the CPU) matches one process with the same global batch and seed.

Each method trains 4 steps with the stock Trainer (tests/ddp_worker.py), launched four ways: one process with 4
examples per step; `torchrun --nproc_per_node 2` and `accelerate launch --multi_gpu --num_processes 2` with DDP and
2 examples per process; `torchrun --nproc_per_node 2` with the Trainer's FSDP2 (each GPT-2 block, then the
PeftModel, sharded). Losses and the trained adapter state must agree to 1e-5 (float32 all-reduce sums in another
order). This covers the SVGD source stage (its gradient transform runs after DDP has averaged the gradients, or,
under FSDP2, on the whole gradient gathered after the reduce-scatter) and ComPT's mixed-task batches. The adapters
that `save_pretrained` (on every rank) and `Trainer.save_model` (a full state dict, saved by rank 0) wrote from the
FSDP2 run load in this one process with the logits of the one-process run's.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODELS, stack_collator
from ddp_worker import dataset
from peft import PeftModel
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("ddp_worker.py")
REPO = WORKER.parent.parent
METHODS = ("residual", "compt", "bayesian")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(prefix: list[str], method: str, out: Path, per_device_batch: int, *worker_args: str) -> dict:
    # PYTHONPATH: the workers import this checkout's package, as the tests do (not another installed copy)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MASTER_ADDR="127.0.0.1", PYTHONPATH=str(REPO))
    command = [
        *prefix,
        str(WORKER),
        "--method",
        method,
        "--out",
        str(out),
        "--per-device-batch",
        str(per_device_batch),
        *worker_args,
    ]
    # a session of its own, so that a hang can be ended with every worker the launcher started
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        _, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        pytest.fail(f"{' '.join(command[:4])} did not finish in 300 s:\n{stderr[-4000:]}")
    assert process.returncode == 0, stderr[-4000:]
    run = json.loads((out / "run.json").read_text())
    assert Path(run["package"]).parent == REPO / "peft_prompt_transfer"
    run["state"] = load_file(out / "state.safetensors")
    run["out"] = out
    return run


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """One-process reference runs, once per method."""
    cache = {}

    def get(method: str) -> dict:
        if method not in cache:
            cache[method] = _launch([sys.executable], method, tmp_path_factory.mktemp(f"single-{method}"), 4)
        return cache[method]

    return get


LAUNCHERS = {
    "torchrun": lambda port: [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
    ],
    "accelerate": lambda port: [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(port),
    ],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
@pytest.mark.parametrize("method", METHODS)
def test_two_processes_match_one(method, launcher, single_process, tmp_path):
    reference = single_process(method)
    _assert_same_training(_launch(LAUNCHERS[launcher](_free_port()), method, tmp_path, 2), reference)


def _assert_same_training(distributed: dict, reference: dict) -> None:
    assert reference["world_size"] == 1 and distributed["world_size"] == 2
    assert reference["losses"][-1] < reference["losses"][0]  # it trained
    assert distributed["losses"] == pytest.approx(reference["losses"], abs=1e-5)
    assert distributed["state"].keys() == reference["state"].keys()
    for key, value in reference["state"].items():
        torch.testing.assert_close(distributed["state"][key], value, atol=1e-5, rtol=0, msg=key)


@pytest.mark.parametrize("method", METHODS)
def test_fsdp2_matches_one_process(method, single_process, tmp_path):
    """FSDP2 shards the prompt encoder's parameters on dim 0 (for the source stage: the particles across ranks)."""
    reference = single_process(method)
    distributed = _launch(LAUNCHERS["torchrun"](_free_port()), method, tmp_path, 2, "--fsdp", "fsdp2")
    _assert_same_training(distributed, reference)

    # what save_pretrained and Trainer.save_model wrote from the sharded run loads in one process, with the
    # one-process run's logits
    inputs = stack_collator(list(dataset(method)))
    del inputs["labels"]
    for folder in ("adapter", "trainer"):
        logits = []
        for run in (reference, distributed):
            model = PeftModel.from_pretrained(TINY_MODELS["gpt2"].build(), run["out"] / folder).eval()
            with torch.no_grad():
                logits.append(model(**inputs).logits)
        torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=0, msg=folder)
