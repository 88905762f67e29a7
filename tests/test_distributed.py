"""Two-process DDP training (gloo on the CPU) matches one process with the same global batch and seed.

Each method trains 4 steps with the stock Trainer (tests/ddp_worker.py), launched three ways: one process with 4
examples per step, `torchrun --nproc_per_node 2` and `accelerate launch --multi_gpu --num_processes 2` with 2 examples
per process. Losses and the trained adapter state must agree to 1e-5 (float32 all-reduce sums in another order).
This covers the SVGD source stage (its gradient transform runs after DDP has averaged the gradients) and ComPT's
mixed-task batches.
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
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("ddp_worker.py")
METHODS = ("residual", "compt", "bayesian")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(prefix: list[str], method: str, out: Path, per_device_batch: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MASTER_ADDR="127.0.0.1")
    command = [*prefix, str(WORKER), "--method", method, "--out", str(out), "--per-device-batch", str(per_device_batch)]
    # a session of its own, so that a hang can be ended with every worker the launcher started
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        pytest.fail(f"{' '.join(command[:4])} did not finish in 300 s:\n{stderr[-4000:]}")
    assert process.returncode == 0, stderr[-4000:]
    run = json.loads((out / "run.json").read_text())
    run["state"] = load_file(out / "state.safetensors")
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
    "torchrun": lambda port: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                              "--master_addr", "127.0.0.1", "--master_port", str(port)],
    "accelerate": lambda port: [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                                "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                                "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
@pytest.mark.parametrize("method", METHODS)
def test_two_processes_match_one(method, launcher, single_process, tmp_path):
    reference = single_process(method)
    distributed = _launch(LAUNCHERS[launcher](_free_port()), method, tmp_path, 2)
    assert reference["world_size"] == 1 and distributed["world_size"] == 2
    assert reference["losses"][-1] < reference["losses"][0]  # it trained
    assert distributed["losses"] == pytest.approx(reference["losses"], abs=1e-5)
    assert distributed["state"].keys() == reference["state"].keys()
    for key, value in reference["state"].items():
        torch.testing.assert_close(distributed["state"][key], value, atol=1e-5, rtol=0, msg=key)
