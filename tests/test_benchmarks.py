"""The benchmark suite's machinery: run specs, resumable records, sharding, task data, and the quick suite end to end."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from benchmarks.__main__ import main, parse_shard
from benchmarks.core.harness import append_record, being_built, build_once, load_records
from benchmarks.core.methods import source_stage
from benchmarks.core.specs import RunSpec
from benchmarks.core.tasks import KSHOT_SEEDS, TASKS, load_split
from benchmarks.report.page import commands_used, render, versions_used
from benchmarks.suites.budgets import SUITES
from benchmarks.suites.plans import suite_runs
from benchmarks.suites.scheduler import claim_run, stage_claim_name, wait_elsewhere

ROOT = Path(__file__).resolve().parents[1]


def test_records_survive_a_kill_mid_write(tmp_path):
    path = tmp_path / "runs.jsonl"
    append_record(path, {"key": "a", "metric": 0.5})
    append_record(path, {"key": "b", "metric": 0.7})
    with open(path, "a") as f:
        f.write('{"key": "c", "met')  # the process was killed here
    assert [r["key"] for r in load_records(path)] == ["a", "b"]
    assert load_records(tmp_path / "missing.jsonl") == []


BUILD_ONCE = """
import sys, time
from pathlib import Path
from benchmarks.core.harness import build_once

def build(staging):
    with open(sys.argv[2], "a") as log:
        log.write("built\\n")
    time.sleep(2)  # long enough for the other process to ask for the same folder meanwhile
    (staging / "done.json").write_text("{}")

print(build_once(Path(sys.argv[1]), build))
"""


def test_concurrent_shards_build_a_cached_folder_once(tmp_path):
    folder, log = tmp_path / "sources" / "sst2", tmp_path / "builds.log"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", BUILD_ONCE, str(folder), str(log)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=120)[0].strip() for process in processes]
    assert [process.returncode for process in processes] == [0, 0]
    assert outputs == [str(folder)] * 2
    assert log.read_text() == "built\n"  # the second process waited for the first one's build
    assert sorted(path.name for path in folder.parent.iterdir()) == [".sst2.lock", "sst2"]  # no staging left


def test_a_failed_build_leaves_nothing_and_is_retried(tmp_path):
    folder = tmp_path / "sources" / "sst2"

    def interrupted(staging):
        (staging / "adapter_model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_once(folder, interrupted)
    assert not folder.exists() and not list(folder.parent.glob(".staging-*"))
    with pytest.raises(RuntimeError, match="did not write its done.json"):
        build_once(folder, lambda staging: None)
    assert build_once(folder, lambda staging: (staging / "done.json").write_text("{}")) == folder
    assert build_once(folder, interrupted) == folder  # built: not called again


def test_a_build_killed_without_cleanup_leaves_no_staging_behind_the_next_build(tmp_path):
    folder = tmp_path / "sources" / "sst2"
    folder.parent.mkdir()
    stale = folder.parent / ".staging-sst2-k1ll3d"  # SIGKILL runs no `finally`: this is what it leaves
    (stale / "cola").mkdir(parents=True)
    build_once(folder, lambda staging: (staging / "done.json").write_text("{}"))
    assert sorted(path.name for path in folder.parent.iterdir()) == [".sst2.lock", "sst2"]


def test_being_built_is_true_only_while_a_build_holds_the_lock(tmp_path):
    folder, seen = tmp_path / "sources" / "sst2", []

    def build(staging):
        seen.append(being_built(folder))  # the lock is held through another file descriptor: as by another process
        (staging / "done.json").write_text("{}")

    assert not being_built(folder)  # nothing started
    with pytest.raises(RuntimeError):
        build_once(folder, lambda staging: None)
    assert not being_built(folder)  # a failed build released the lock
    build_once(folder, build)
    assert seen == [True] and not being_built(folder)


def test_a_worker_leaves_a_run_whose_source_stage_another_builds_for_one_that_can_start(tmp_path, monkeypatch):
    """Both workers of a suite start with runs needing the same source stage: the second builds the next stage."""
    monkeypatch.setenv("PEFT_PROMPT_TRANSFER_CACHE", str(tmp_path))
    queue = tmp_path / "queue"
    queue.mkdir()
    run = lambda method, **extra: ("transfer", RunSpec(method, "smollm2", ("mr",), 13, 0.01, 20, **extra))  # noqa: E731
    spot, average, mpt = (run(method, sources=("sst2", "cola")) for method in ("spot", "source_average", "mpt"))
    no_transfer = run("prompt_tuning")
    assert source_stage(spot[1]) == source_stage(average[1]) != source_stage(mpt[1])
    assert source_stage(no_transfer[1]) is None
    wait = lambda runs, queue=None: wait_elsewhere(runs[0][1], runs[1:], queue)  # noqa: E731
    decisions = []

    def build(staging):  # the lock is held through another file descriptor: as by another process
        decisions.append(wait([average, spot]))  # nothing else to do: wait for the stage
        decisions.append(wait([average, spot, mpt]))
        decisions.append(wait([average, no_transfer]))
        claim_run(str(queue), no_transfer[1].key())
        decisions.append(wait([average, no_transfer], str(queue)))  # another worker has it
        (staging / "done.json").write_text("{}")

    assert not wait([spot, mpt])  # nobody builds the stage: build it
    # a worker that claimed a run of the stage has not yet taken the stage's lock (loading the model): its claim says so
    (queue / stage_claim_name(source_stage(spot[1]))).touch()
    assert wait([average, mpt], str(queue)) and not wait([average, spot], str(queue)) and not wait([average, mpt])
    build_once(source_stage(spot[1]).folder(), build)
    assert decisions == [False, True, True, False]
    assert not wait([average, mpt], str(queue))  # built: start


def test_a_source_stage_killed_mid_training_resumes_from_its_checkpoint_and_ends_where_an_unkilled_one_does(
    tmp_path, monkeypatch
):
    """A source stage can outlast a sitting: `train` with `checkpoints` picks up where a killed build stopped."""
    import datasets
    from peft import get_peft_model
    from transformers import default_data_collator

    import peft_prompt_transfer as ppt
    from benchmarks.core import training
    from benchmarks.core.backbone import Backbone
    from tests.conftest import TINY_MODELS

    ids = torch.randint(3, 64, (32, 6), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[:, -1] = 5 + torch.arange(32) % 2  # one label word per row, as the suite's causal examples have
    rows = {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "labels": labels.tolist()}
    dataset = datasets.Dataset.from_dict(rows)
    backbone = Backbone("smollm2", tokenizer=None)
    config = ppt.BayesianPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, num_particles=2, source_tasks=["a"])

    def fit(checkpoints=None):
        model = get_peft_model(TINY_MODELS["llama"].build(), config)  # the same particles every time (seeded)
        optimizer = training.prompt_and_head_optimizer(model, 0.1)
        log = training.train(model, dataset, backbone, optimizer, 8, 4, 0, default_data_collator, checkpoints)
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, log

    reference, reference_log = fit()
    assert "resumed_from_step" not in reference_log
    steps_taken, original_step = [], training.LabelWordTrainer.training_step

    def killed_at_step_6(self, *args, **kwargs):
        steps_taken.append(1)
        if len(steps_taken) == 6:
            raise RuntimeError("killed")
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(training.LabelWordTrainer, "training_step", killed_at_step_6)
    with pytest.raises(RuntimeError, match="killed"):
        fit(tmp_path / "checkpoints")
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["checkpoint-5"]  # only the last one is kept
    resumed, log = fit(tmp_path / "checkpoints")
    assert len(steps_taken) == 6 + 3  # steps 6 to 8 only, not a fresh start
    assert log["resumed_from_step"] == 5
    assert len(log["losses"]) == len(reference_log["losses"]) and log["losses"][:5] == reference_log["losses"][:5]
    assert resumed.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name])


def test_a_transfer_run_records_which_build_of_its_source_stage_it_started_from(tmp_path, monkeypatch):
    """Two builds of one source stage share a folder name; the digest of the weights tells them apart."""
    from safetensors.torch import save_file

    from benchmarks.core import runner
    from benchmarks.core.models import CACHE_ENV
    from benchmarks.core.sources import stage_weights_digest

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    spec = RunSpec("library_best", "smollm2", ("mr",), 13, 1e-2, 4, sources=("sst2", "cola"))
    folder = source_stage(spec).folder()

    def build(seed: int) -> str:
        for task in spec.sources:
            (folder / task).mkdir(parents=True, exist_ok=True)
            torch.manual_seed(seed)
            save_file({"prompt_embeddings": torch.randn(4, 8)}, folder / task / "adapter_model.safetensors")
            (folder / task / "README.md").write_text(f"built with seed {seed}")  # not weights: not digested
        return stage_weights_digest(folder)

    first = build(0)
    assert build(0) == first and len(first) == 12  # the same weights, the same digest
    second = build(1)
    assert second != first

    class StubBackbone:
        def base_model(self, num_labels, seed):
            return None

    ranking = {"ranking": [["sst2", 0.4]]}
    monkeypatch.setitem(
        runner.METHODS, "library_best", replace(runner.METHODS["library_best"], build=lambda *args: ("model", ranking))
    )
    model, details = runner.build_model(StubBackbone(), spec, train_set=None)
    assert details == {"ranking": [["sst2", 0.4]], "source_weights": second}
    baseline = RunSpec("prompt_tuning", "smollm2", ("mr",), 13, 1e-2, 4)  # no source stage, nothing to name
    monkeypatch.setitem(
        runner.METHODS, "prompt_tuning", replace(runner.METHODS["prompt_tuning"], build=lambda *args: ("model", {}))
    )
    assert runner.build_model(StubBackbone(), baseline, train_set=None) == ("model", {})


def test_full_suite_covers_every_claim_method_and_seed():
    runs = suite_runs("full")
    keys = [spec.key() for _, spec in runs]
    assert len(keys) == len(set(keys))
    methods = {spec.method for _, spec in runs}
    assert methods == {
        "prompt_tuning",
        "p_tuning",
        "residual",
        "residual_no_layer_norm",
        "residual_embedding_rms",
        "full_finetuning",
        "spot",
        "source_average",
        "mpt",
        "bayesian",
        "compt",
        "compt_authors",
        "shared_prompt",
    }
    assert {claim for claim, _ in runs} == {"residual", "transfer", "multitask"}
    assert {spec.seed for _, spec in runs} == set(KSHOT_SEEDS)
    assert {spec.model for _, spec in runs} == {"minilm", "smollm2"}
    # seed-major order: a suite stopped early has every claim for the first seeds
    seeds = [spec.seed for _, spec in runs]
    assert seeds == sorted(seeds, key=KSHOT_SEEDS.index)
    # equal budgets: every method in a comparison sweeps the same number of learning rates
    for claim in ("residual", "transfer", "multitask"):
        sweeps = {}
        for c, spec in runs:
            if c == claim and spec.seed == KSHOT_SEEDS[0]:
                sweeps.setdefault((spec.model, spec.method, spec.init, spec.num_virtual_tokens, spec.tasks), set()).add(
                    spec.lr
                )
        for model in {key[0] for key in sweeps}:  # a comparison is on one model
            assert len({len(lrs) for key, lrs in sweeps.items() if key[0] == model}) == 1, (claim, model)
    # sources never overlap the targets
    for _, spec in runs:
        assert not set(spec.sources) & set(spec.tasks)
    assert all(spec.steps == SUITES["full"].steps for _, spec in runs if spec.model == "minilm")


def test_shards_partition_the_suite():
    runs = suite_runs("full")
    assert len(runs) == sum(len([r for i, r in enumerate(runs) if i % 3 == k]) for k in range(3))
    assert parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "x", "1/", "-1/2"):
        with pytest.raises(Exception, match="K/N"):
            parse_shard(bad)


def test_every_task_split_reads_with_integer_labels():
    for name, task in TASKS.items():
        for split in task.splits:
            data = load_split(name, split, seed=13)
            assert len(data) > 0, (name, split)
            assert set(data["label"]) <= set(range(task.num_labels)), (name, split)
            if split == "kshot-train":
                assert len(data) == 16 * task.num_labels


def test_model_and_data_filters_keep_only_matching_runs():
    everything = suite_runs("full")
    kshot_minilm = suite_runs("full", models=("minilm",), data=("kshot",))
    assert kshot_minilm == [(c, s) for c, s in everything if s.model == "minilm" and s.data == "kshot"]
    fewglue = suite_runs("full", data=("fewglue",))
    assert fewglue and {s.tasks for _, s in fewglue} == {("cb",)}
    assert len(kshot_minilm) + len(fewglue) + len(suite_runs("full", models=("smollm2",))) == len(everything)


def test_workers_get_the_same_filters_and_the_users_command(monkeypatch, tmp_path):
    """Shards index the filtered run list, so every worker must get the same filters, and records name the user's command."""
    launched = []

    class FakeWorker:
        def __init__(self, command):
            launched.append(command)

        def wait(self):
            return 0

        def poll(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", FakeWorker)
    argv = [
        "full",
        "--workers",
        "2",
        "--models",
        "minilm",
        "--data",
        "kshot",
        "--claims",
        "transfer",
        "--results-dir",
        str(tmp_path),
        "--no-report",
    ]
    assert main(argv) == 0
    assert len(launched) == 2
    for k, command in enumerate(launched):
        options = command[command.index("benchmarks") + 1 :]
        assert options[options.index("--models") + 1] == "minilm" and options[options.index("--data") + 1] == "kshot"
        assert options[options.index("--claims") + 1] == "transfer" and "--shard" not in options
        assert options[options.index("--invoked-as") + 1] == "python -m benchmarks " + " ".join(argv)
    queues = {command[command.index("--queue") + 1] for command in launched}
    assert len(queues) == 1 and not os.path.exists(queues.pop())  # one shared queue, removed afterwards


def test_killing_the_suite_stops_its_workers_and_removes_their_queue(monkeypatch, tmp_path):
    launched, terminated = [], []

    class RunningWorker:
        def __init__(self, command):
            self.command, self.running = command, True
            launched.append(self)

        def wait(self):
            if self.running:  # `kill PID` of the suite while its workers run
                signal.raise_signal(signal.SIGTERM)
            return -signal.SIGTERM

        def poll(self):
            return None if self.running else -signal.SIGTERM

        def terminate(self):
            self.running = False
            terminated.append(self)

    def unhandled(signum, frame):  # what the signal would meet if the suite did not handle it (not a kill of pytest)
        raise AssertionError("the suite left SIGTERM to the handler it found")

    monkeypatch.setattr(subprocess, "Popen", RunningWorker)
    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        with pytest.raises(SystemExit) as stopped:
            main(["quick", "--workers", "2", "--results-dir", str(tmp_path), "--no-report"])
        assert signal.getsignal(signal.SIGTERM) is unhandled  # restored
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert terminated == launched and len(launched) == 2  # no orphan goes on running the suite
    queue = launched[0].command[launched[0].command.index("--queue") + 1]
    assert not os.path.exists(queue)


def test_workers_sharing_a_queue_each_take_the_next_unclaimed_run(tmp_path):
    """A worker stuck on slow runs must not hold back runs the other worker could do; no run is done twice."""
    keys = [f"run {i}" for i in range(12)]
    done, start = {"slow": [], "fast": []}, threading.Barrier(2)

    def worker(name, seconds):
        start.wait()
        for key in keys:
            if claim_run(str(tmp_path), key):
                done[name].append(key)
                time.sleep(seconds)

    threads = [
        threading.Thread(target=worker, args=("slow", 1.0)),
        threading.Thread(target=worker, args=("fast", 0.01)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(done["slow"] + done["fast"], key=keys.index) == keys
    assert len(done["slow"]) <= 2  # fixed shards would give each worker 6


def test_report_names_the_commands_its_records_came_from(tmp_path):
    records_dir = tmp_path / "quick"
    records_dir.mkdir()
    for command in (
        "python -m benchmarks quick --claims multitask",
        "python -m benchmarks quick --workers 2",
        "python -m benchmarks quick --workers 2",
        None,
    ):
        append_record(
            records_dir / "runs.jsonl",
            {
                "key": "k",
                "date": "2026-11-22T00:00:00+00:00",
                "versions": {},
                **({"command": command} if command else {}),
                "error": "x",
            },
        )
        append_record(
            records_dir / "runs.jsonl",
            {
                "key": "k",
                "date": "2026-11-22T00:00:00+00:00",
                "versions": {},
                **({"command": command} if command else {}),
            },
        )
    assert commands_used(load_records(records_dir / "runs.jsonl")) == (
        "`python -m benchmarks quick --claims multitask` (1 run); `python -m benchmarks quick --workers 2` (2 runs); "
        "1 run from earlier starts that did not record their command"
    )


def test_report_names_every_package_version_its_runs_used():
    records = [
        {"versions": {"peft": "0.21.2", "transformers": "5.24.0"}},
        {"versions": {"peft": "0.21.2", "transformers": "5.24.0"}},
        {"versions": {"peft": "0.21.2", "transformers": "5.25.0"}},
        {"versions": {"peft": "0.21.3", "transformers": "5.26.0"}, "error": "a failed attempt is not a run"},
    ]
    assert versions_used(records) == "peft 0.21.2, transformers 5.24.0 (2 runs), 5.25.0 (1 run)"


def test_report_pairs_the_branch_variants_with_residual_and_prompt_tuning(tmp_path):
    scores = {
        "prompt_tuning": (0.80, 0.82),
        "residual": (0.78, 0.79),
        "residual_no_layer_norm": (0.83, 0.81),
        "residual_embedding_rms": (0.84, 0.80),
    }
    planned = {(spec.method, spec.seed, spec.lr): spec for _, spec in suite_runs("full") if spec.model == "smollm2"}
    (tmp_path / "full").mkdir()
    for method, by_seed in scores.items():
        for seed, score in zip((13, 21), by_seed):
            for lr, offset in ((0.01, 0.0), (0.03, -0.1)):  # the best LR is 0.01 for every method
                spec = planned[method, seed, lr]
                append_record(
                    tmp_path / "full" / "runs.jsonl",
                    {
                        "key": spec.key(),
                        "claim": "residual",
                        **json.loads(spec.key()),
                        "metric": score + offset,
                        "metrics": {"sst2": score + offset},
                        "date": "2026-11-23T00:00:00+00:00",
                        "versions": {},
                    },
                )
    report = render("full", tmp_path / "full", tmp_path / "RESULTS.md").read_text()
    variant = "{}, vocab init, 20 tokens"
    ablation, residual, prompt_tuning = (
        variant.format(label)
        for label in ("residual without LayerNorm (ablation)", "residual (ours)", "peft PROMPT_TUNING")
    )
    assert f"{ablation} − {prompt_tuning}: +1.0 ± 2.8 points (1 of 2 seeds better)" in report
    assert f"{ablation} − {residual}: +3.5 ± 2.1 points (2 of 2 seeds better)" in report
    assert f"{residual} − {prompt_tuning}: -2.5 ± 0.7 points (0 of 2 seeds better)" in report
    scaled = variant.format("residual, branch scaled to the embeddings' RMS")
    assert f"{scaled} − {prompt_tuning}: +1.0 ± 4.2 points (1 of 2 seeds better)" in report
    assert f"{scaled} − {residual}: +3.5 ± 3.5 points (2 of 2 seeds better)" in report


def test_prompt_steps_measure_what_adamw_does_to_each_prompt():
    """AdamW's first step moves a plain prompt by lr per coordinate; the residual MLP moves the prompt much further,
    and its LayerNorm branch starts at norm sqrt(hidden), far from the vocabulary embeddings it was initialised from."""
    from peft import get_peft_model

    from benchmarks.studies.prompt_steps import first_steps, prompt_configs
    from tests.conftest import TINY_MODELS

    hidden, lr = 32, 0.01
    results = {}
    for name, config in prompt_configs("CAUSAL_LM", num_virtual_tokens=4, bottleneck_size=64).items():
        torch.manual_seed(0)
        results[name] = first_steps(get_peft_model(TINY_MODELS["gpt2"].build(hidden), config), lr, steps=3)
    plain, residual, no_norm = results["prompt_tuning"], results["residual"], results["residual_no_layer_norm"]
    scaled = results["residual_embedding_rms"]
    assert plain["moves"] == pytest.approx([lr * hidden**0.5] * 3, rel=1e-3)
    assert plain["step0_cosine_to_vocab_init"] == pytest.approx(1.0)
    assert residual["step0_norm"] == pytest.approx(hidden**0.5, rel=0.05)  # the LayerNorm output dominates
    assert residual["step0_cosine_to_vocab_init"] < 0.5 < no_norm["step0_cosine_to_vocab_init"]
    assert residual["moves"][0] > 5 * plain["moves"][0] and no_norm["moves"][0] > 5 * plain["moves"][0]
    # scaled to the embeddings' RMS, the branch is as long as a vocabulary token: the init is kept, not drowned
    assert scaled["step0_norm"] < 2 * scaled["vocab_norm"] and scaled["step0_cosine_to_vocab_init"] > 0.5


def test_task_errors_say_what_exists():
    with pytest.raises(ValueError, match="Unknown task 'nope'"):
        load_split("nope", "train")
    with pytest.raises(ValueError, match=r"'mr' has no 'train' split; it has \['kshot-train'"):
        load_split("mr", "train")
    with pytest.raises(ValueError, match="seeds"):
        load_split("sst2", "kshot-train", seed=7)


def test_unknown_suite_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["huge"])
    assert "invalid choice: 'huge'" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_suite_runs_resumes_and_renders(tmp_path):
    """The CI smoke test: every method and claim on a tiny budget, on the real models; no numbers are asserted."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PEFT_PROMPT_TRANSFER_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    smollm2_cache = Path.home() / ".cache" / "peft_prompt_transfer" / "smollm2-135m-instruct"
    if smollm2_cache.exists():  # reuse the converted model, not the source stages
        (tmp_path / "cache").mkdir()
        os.symlink(smollm2_cache, tmp_path / "cache" / "smollm2-135m-instruct")
    command = [sys.executable, "-m", "benchmarks", "quick", "--results-dir", str(tmp_path / "results")]
    first = subprocess.run(
        command + ["--claims", "multitask", "--no-report"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    done_first = len(load_records(tmp_path / "results" / "quick" / "runs.jsonl"))
    assert done_first == len(suite_runs("quick", claims=("multitask",)))

    second = subprocess.run(
        command + ["--workers", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert second.stdout.count(f"{done_first} runs already recorded") == 2  # both workers resumed, nothing redone
    records = load_records(tmp_path / "results" / "quick" / "runs.jsonl")
    assert len(records) == len(suite_runs("quick"))
    for record in records:
        assert "error" not in record
        assert {
            "method",
            "model",
            "tasks",
            "seed",
            "lr",
            "num_virtual_tokens",
            "steps",
            "metric",
            "metrics",
            "train_seconds",
            "versions",
            "date",
        } <= set(record)
        assert record["versions"]["peft"]
        assert record["command"].startswith("python -m benchmarks quick --results-dir")  # the user's, not a shard's
        assert "--shard" not in record["command"]
        assert record["losses"], record["method"]
    compt = next(r for r in records if r["method"] == "compt")
    assert len(compt["details"]["routing_weights"]) == 2
    report = (tmp_path / "results" / "quick" / "RESULTS.md").read_text()
    assert "--workers 2` (" in report and "--claims multitask --no-report` (" in report
    for heading in ("## Claim 1", "## Claim 2", "## Claim 3"):
        assert heading in report
    figures = tmp_path / "results" / "quick" / "figures"
    assert (figures / "claim3-minilm-routing.png").stat().st_size > 1000


def test_every_registered_method_can_be_built_and_is_compared_with_registered_methods():
    from benchmarks.core.methods import BAYESIAN_METHODS, METHODS
    from benchmarks.core.specs import POSTERIORS
    from benchmarks.suites.budgets import CLAIMS

    for method in METHODS.values():
        assert method.build or method.joint_config, method.name
        assert set(method.compared_with) <= set(METHODS) - {method.name}, method.name
        assert method.claim in (None, *CLAIMS), method.name
    # every posterior a Bayesian method starts from is a source stage that `ensure_source` knows how to train
    assert {METHODS[name].source_kind for name in BAYESIAN_METHODS} == set(POSTERIORS)


@pytest.mark.parametrize(
    "argv, module, forwarded",
    [
        (["cost", "--model", "smollm2"], "benchmarks.cost.ratios", ["--model", "smollm2"]),
        (["cost", "svgd-scaling", "--repeats", "1"], "benchmarks.cost.svgd_scaling", ["--repeats", "1"]),
        (["cost", "shared-prefix", "--cells", "4,8,2"], "benchmarks.cost.shared_prefix", ["--cells", "4,8,2"]),
        (["cost", "rank", "--entries", "2"], "benchmarks.cost.rank", ["--entries", "2"]),
        (["study", "prompt-steps", "--lr", "0.1"], "benchmarks.studies.prompt_steps", ["--lr", "0.1"]),
        (["study", "transfer-inits"], "benchmarks.studies.transfer_inits", []),
    ],
)
def test_the_entry_point_hands_cost_and_study_options_to_the_measurement(monkeypatch, argv, module, forwarded):
    import importlib

    calls = []
    monkeypatch.setattr(importlib.import_module(module), "main", calls.append)
    assert main(argv) == 0 and calls == [forwarded]


def test_the_shared_prefix_grid_parses_cells_and_states_the_token_bound():
    import argparse

    from benchmarks.cost.shared_prefix import DEFAULT_CELLS, distinct_prompts, parse_cell, token_bound

    assert len(DEFAULT_CELLS) == 18 and parse_cell("100,64,8") == (100, 64, 8)
    for bad in ("100,64", "a,b,c", "0,64,8"):
        with pytest.raises(argparse.ArgumentTypeError, match="three positive integers"):
            parse_cell(bad)
    # one prompt: (P + B L) / (B (P + L)); at the papers' prompt length about 0.46
    assert token_bound(1, 100, 64, 8) == pytest.approx((100 + 512) / (8 * 164))
    assert [distinct_prompts(m, 8) for m in ("RESIDUAL_PROMPT_TUNING", "COMPT", "BAYESIAN_PROMPT_TUNING")] == [1, 2, 4]
    assert distinct_prompts("BAYESIAN_PROMPT_TUNING", 2) == 2
    # in evaluation a Bayesian source runs its posterior mean: one prompt
    assert distinct_prompts("BAYESIAN_PROMPT_TUNING", 8, training=False) == 1


def test_a_ratio_needs_two_rounds_for_its_interval():
    from benchmarks.cost.ratios import ratio_with_interval

    ratio = ratio_with_interval([1.0, 2.0, 1.5], [2.0, 2.0, 2.0])
    assert ratio["median"] == pytest.approx(0.75) and ratio["low"] <= 0.75 <= ratio["high"]
    with pytest.raises(ValueError, match="run at least 2"):
        ratio_with_interval([1.0], [2.0])


def test_the_shared_prefix_grid_keeps_each_measure_apart_and_resumes_its_cells(monkeypatch, tmp_path):
    from benchmarks.cost import shared_prefix

    measured = []

    def fake_cell(args, num_virtual_tokens, length, batch_size):
        measured.append((args.measure, num_virtual_tokens, length, batch_size))
        return [
            {"method": m, "num_virtual_tokens": num_virtual_tokens, "seq_len": length, "batch_size": batch_size}
            for m in args.methods
        ]

    monkeypatch.setattr(shared_prefix, "MEASURE_CELLS", dict.fromkeys(shared_prefix.MEASURE_CELLS, fake_cell))
    monkeypatch.setattr(shared_prefix, "_show", lambda measure, record: "")
    output = tmp_path / "shared_prefix.json"
    common = ["--methods", "RESIDUAL_PROMPT_TUNING", "--output", str(output)]
    shared_prefix.main(["--cells", "10,64,8", *common])
    shared_prefix.main(["--measure", "scoring", "--cells", "10,64,8", "20,64,8", *common])
    # an interrupted grid run again measures only the cells it lacks, and other measures' records stay
    shared_prefix.main(["--cells", "10,64,8", "100,64,8", *common])
    assert measured == [("step", 10, 64, 8), ("scoring", 10, 64, 8), ("scoring", 20, 64, 8), ("step", 100, 64, 8)]
    saved = json.loads(output.read_text())
    assert [r["num_virtual_tokens"] for r in saved["records"]] == [10, 100]
    assert [r["num_virtual_tokens"] for r in saved["scoring"]] == [10, 20]
    assert saved["scoring"][0]["command"].startswith("python -m benchmarks cost shared-prefix --measure scoring")


def test_a_memory_worker_runs_in_a_fresh_process_and_a_failure_names_it(monkeypatch, tmp_path):
    from benchmarks.cost.ratios import in_fresh_process

    (tmp_path / "worker_ok.py").write_text(
        'import json, os\nprint("loading")\nprint(json.dumps({"pid": os.getpid(), "offline": os.environ["HF_HUB_OFFLINE"]}))\n'
    )
    (tmp_path / "worker_bad.py").write_text('raise RuntimeError("the worker ran out of memory")\n')
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    measured = in_fresh_process(["worker_ok"], "ok")
    assert measured["pid"] != os.getpid() and measured["offline"] == "1"
    with pytest.raises(SystemExit, match="bad failed:(.|\n)*the worker ran out of memory"):
        in_fresh_process(["worker_bad"], "bad")


def test_the_rank_cost_scores_as_the_peft_loop_and_resumes_its_cells(monkeypatch, tmp_path, capsys):
    """`cost rank` on a tiny decoder: rank's scores equal the peft PROMPT_TUNING loop's, the record states its bound,
    a cell already measured is skipped, and the report renders it."""
    from conftest import TINY_MODELS

    from benchmarks.cost import rank, ratios
    from benchmarks.cost.tables import rank_table

    loads = []
    monkeypatch.setattr(ratios, "_load_base", lambda args: loads.append(args) or TINY_MODELS["llama"].build())
    output = tmp_path / "rank.json"
    common = ["--entries", "2", "--examples", "6", "--rounds", "2", "--threads", "1", "--output", str(output)]
    rank.main(["--cells", "4,8,4", *common])
    records = rank.main(["--cells", "4,8,4", "6,5,2", *common])
    assert len(loads) == 2 and [r["num_virtual_tokens"] for r in records] == [4, 6]
    first = records[0]
    assert first["max_relative_score_difference"] < 1e-5
    assert first["positions"] == pytest.approx((4 + 6 * 8) / (6 * 12))
    assert first["command"] == "python -m benchmarks cost rank --cells 4,8,4 " + " ".join(common)
    table = "\n".join(rank_table(json.loads(output.read_text())))
    assert "| 4 | 8 | 4 | 2 | 6 | 1 | 0.72 |" in table and "| 6 | 5 | 2 | 2 | 6 | 1 |" in table


def test_an_unknown_study_is_refused_with_the_names_there_are(capsys):
    assert main(["study", "nope"]) == 2
    assert "transfer-inits" in capsys.readouterr().err


def test_the_reproduction_study_finds_its_recorded_runs_and_compares_loss_curves():
    from benchmarks.studies import shared_prefix_reproduction as study

    for method, task, lr in study.DEFAULT_RUNS:
        record = study.recorded_run(method, task, lr)
        assert record["losses"] and record["metric"] > 0
    assert study.max_relative_difference([1.0, 2.2], [1.0, 2.0]) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="No recorded SmolLM2 run of residual on mr"):
        study.recorded_run("residual", "mr", 0.01)


def test_saved_for_backward_counts_what_a_step_keeps_by_kind_without_the_weights(monkeypatch):
    """`cost shared-prefix --measure saved`: the loss reads B·(P+L) vocabulary rows concatenated and B·(L+1) shared
    (the rows' positions and the last prompt position, which predicts the first token)."""
    from conftest import TINY_MODELS, VOCAB
    from peft import get_peft_model

    from benchmarks.cost.shared_prefix import SAVED_KINDS, saved_for_backward
    from peft_prompt_transfer import ResidualPromptConfig

    P, B, L = 12, 4, 6
    input_ids = torch.randint(3, VOCAB, (B, L), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}
    saved = {}
    for mode in ("on", "off"):
        config = ResidualPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, shared_prefix=mode)
        model = get_peft_model(TINY_MODELS["llama"].build(hidden=48), config).train()  # 48: no dim equals VOCAB
        saved[mode] = saved_for_backward(model, inputs)
        assert list(saved[mode]) == list(SAVED_KINDS) and saved[mode]["attention"] > 0
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)  # it ran the backward
    row_mb = VOCAB * 4 / 2**20
    assert saved["off"]["vocabulary"] == pytest.approx(B * (P + L) * row_mb)
    assert saved["on"]["vocabulary"] == pytest.approx(B * (L + 1) * row_mb)
    assert saved["on"]["other"] < saved["off"]["other"]  # the layers' activations of U·P + B·L positions
    # the weights the layers keep for their input gradients are left out: counted, they add to the rest
    monkeypatch.setattr(model, "parameters", lambda: iter(()))
    assert saved_for_backward(model, inputs)["other"] > saved["off"]["other"]
