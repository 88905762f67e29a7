"""Training step time, peak memory and inference latency of every method, side by side with peft's own.

All methods run on the same model, batch and prompt length: peft PROMPT_TUNING (the reference), P_TUNING (MLP
reparameterisation), MULTITASK_PROMPT_TUNING, and this package's methods (the Bayesian one as its SVGD source
stage, whose step includes the SVGD gradient transform).

- **Time is measured interleaved, in one process.** Every method gets its own copy of the base model; then each of
  `--rounds` rounds times one training step (forward + backward + AdamW step) of every method in turn, in an order
  that rotates each round. Each round gives every method's time relative to PROMPT_TUNING's in the same round, so
  machine load that drifts over seconds cancels out of the ratio. Reported: the median ratio over rounds with a
  95% bootstrap interval of that median (scipy). Inference (the saved adapter reloaded with
  `PeftModel.from_pretrained`, and its export to plain PROMPT_TUNING, which should be 1.00x) is timed the same way.
- **Peak training memory** is measured in a separate process per method, so that the peak is its own: on CUDA
  `torch.cuda.max_memory_allocated`, on CPU the growth of the process's peak resident set size (ru_maxrss) over
  its size after the model is loaded and its weights read (they are memory-mapped: a first read pages them in).

`--model minilm` times sequence classification (all-MiniLM-L6-v2), `--model smollm2` a causal LM (SmolLM2-135M,
language-modelling loss over the whole sequence).

    python -m benchmarks cost [--model minilm|smollm2] [--batch-size 16] [--seq-len 64] [--num-virtual-tokens 20]
                              [--rounds 30] [--output benchmarks/results/cost-minilm.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

METHODS = (
    "PROMPT_TUNING",
    "P_TUNING",
    "MULTITASK_PROMPT_TUNING",
    "RESIDUAL_PROMPT_TUNING",
    "COMPT",
    "BAYESIAN_PROMPT_TUNING",
)
OURS = ("RESIDUAL_PROMPT_TUNING", "COMPT", "BAYESIAN_PROMPT_TUNING")
NUM_TASKS = 2
CAUSAL_MODELS = ("smollm2",)


def peft_config(method: str, args):
    """The config of `method` for the benchmark's model, prompt length and bottleneck."""
    from peft import MultitaskPromptTuningConfig, PromptEncoderConfig, PromptTuningConfig

    import peft_prompt_transfer as ppt

    common = dict(task_type=_task_type(args), num_virtual_tokens=args.num_virtual_tokens)
    if method == "PROMPT_TUNING":
        return PromptTuningConfig(**common)
    if method == "P_TUNING":
        return PromptEncoderConfig(**common, encoder_hidden_size=args.bottleneck_size)
    if method == "MULTITASK_PROMPT_TUNING":
        return MultitaskPromptTuningConfig(**common, num_tasks=NUM_TASKS)
    if method == "RESIDUAL_PROMPT_TUNING":
        return ppt.ResidualPromptConfig(**common, bottleneck_size=args.bottleneck_size)
    if method == "COMPT":
        return ppt.ComPTConfig(**common, num_tasks=NUM_TASKS, num_source_prompts=4)
    if method == "BAYESIAN_PROMPT_TUNING":  # the source stage: 4 SVGD particles, one per quarter of the batch
        return ppt.BayesianPromptConfig(**common, num_particles=4)
    raise ValueError(f"unknown method {method!r}")


def _task_type(args) -> str:
    return "CAUSAL_LM" if args.model in CAUSAL_MODELS else "SEQ_CLS"


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _device(args):
    import torch

    return torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")


def _load_base(args):
    from benchmarks.core.models import load_causal_lm, load_classifier

    if _task_type(args) == "CAUSAL_LM":
        return load_causal_lm(args.model)[1]
    return load_classifier(args.model, num_labels=2, seed=0)[1]


def _inputs(method: str, args, vocab_size: int, device) -> dict:
    """The one batch every method trains on (and, without labels, infers on)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, vocab_size, (args.batch_size, args.seq_len), generator=generator)
    labels = (
        input_ids.clone()
        if _task_type(args) == "CAUSAL_LM"
        else torch.randint(0, 2, (args.batch_size,), generator=generator)
    )
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    if method in ("MULTITASK_PROMPT_TUNING", "COMPT"):
        batch["task_ids"] = torch.arange(args.batch_size) % NUM_TASKS
    return {k: v.to(device) for k, v in batch.items()}


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def training(method: str, args, config=None):
    """A method's model on its own copy of the base model, and a closure running one training step.

    `config` replaces the method's default config (`peft_config(method, args)`).
    """
    import torch
    from peft import get_peft_model

    device = _device(args)
    torch.manual_seed(0)
    model = get_peft_model(_load_base(args), config or peft_config(method, args)).to(device).train()
    batch = _inputs(method, args, model.config.vocab_size, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()
        _synchronize(device)

    return model, train_step


def measure_memory(method: str, args, config=None) -> dict:
    """Run in a fresh process: the peak memory of training one method (`config` as for `training`)."""
    import torch

    torch.set_num_threads(args.threads)
    device = _device(args)
    model, train_step = training(method, args, config)
    # the weights are memory-mapped from their file and paged in when first read: read them all now, so that the
    # growth below is the training step's and not the model's size (which would dilute every ratio towards 1)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.sum()
    rss_before = _rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    for _ in range(args.warmup + 2):
        train_step()
    if device.type == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
    return {
        "method": method,
        "trainable_params": model.get_nb_trainable_parameters()[0],
        "peak_training_mb": peak_mb,
        "vocab_size": model.config.vocab_size,
    }


def in_fresh_process(module_and_options: list[str], name: str) -> dict:
    """Run `python -m <module> <options>` (a measurement's `--memory-worker`) in a fresh process, so that the peak
    memory it reports is its own, and return the JSON its last output line holds; a failure stops the measurement
    with the worker's error."""
    result = subprocess.run(
        [sys.executable, "-m", *module_and_options],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def interleaved_seconds(calls: dict, rounds: int, warmup: int) -> dict:
    """Seconds of each call in each of `rounds` rounds; each round runs every call once, starting one later than
    the round before (so no call always follows the same one)."""
    names = list(calls)
    for name in names:
        for _ in range(warmup):
            calls[name]()
    seconds = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            calls[name]()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def ratio_with_interval(seconds: list, reference: list) -> dict:
    """The median over rounds of `seconds / reference` (paired by round) and a 95% bootstrap interval of it."""
    import numpy as np
    from scipy.stats import bootstrap

    if len(seconds) < 2:
        raise ValueError(
            f"a ratio's interval is a bootstrap over rounds: run at least 2 (--rounds), got {len(seconds)}"
        )
    ratios = np.asarray(seconds) / np.asarray(reference)
    interval = bootstrap(
        (ratios,), np.median, confidence_level=0.95, n_resamples=2000, method="percentile", random_state=0
    ).confidence_interval
    return {"median": float(np.median(ratios)), "low": float(interval.low), "high": float(interval.high)}


def measure_times(args) -> dict:
    """Interleaved training-step and inference times of every method, in this process."""
    import gc

    import torch
    from peft import PeftModel

    import peft_prompt_transfer as ppt

    torch.set_num_threads(args.threads)
    device = _device(args)
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        steps, folders = {}, {}
        for method in args.methods:
            model, steps[method] = training(method, args)
            folders[(method, "reloaded")] = os.path.join(tmp, method)
            model.save_pretrained(folders[(method, "reloaded")])
            if method in OURS:
                folders[(method, "exported")] = os.path.join(tmp, method + "-exported")
                ppt.export_prompt_tuning(model, folders[(method, "exported")], task=0 if method == "COMPT" else None)
        times["step"] = interleaved_seconds(steps, args.rounds, args.warmup)
        del steps, model
        gc.collect()

        inferences = {}
        for (method, kind), folder in folders.items():
            loaded = PeftModel.from_pretrained(_load_base(args), folder).to(device).eval()
            inputs = {
                k: v
                for k, v in _inputs(method, args, loaded.config.vocab_size, device).items()
                if k != "labels" and not (kind == "exported" and k == "task_ids")
            }

            def infer(loaded=loaded, inputs=inputs):
                with torch.no_grad():
                    loaded(**inputs)
                _synchronize(device)

            inferences[f"{method}/{kind}"] = infer
        times["inference"] = interleaved_seconds(inferences, args.rounds, args.warmup)
    return times


def main(argv=None) -> list[dict]:
    import statistics

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm", choices=("minilm", "smollm2"))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--num-virtual-tokens", type=int, default=20)
    parser.add_argument("--bottleneck-size", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even if CUDA is available")
    parser.add_argument("--output", default=None, help="write the records as JSON here")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if "PROMPT_TUNING" not in args.methods:
        parser.error("--methods must include PROMPT_TUNING, the reference of every ratio")

    if args.memory_worker:  # one method, in this process
        print(json.dumps(measure_memory(args.memory_worker, args)))
        return []

    given = list(argv if argv is not None else sys.argv[1:])
    # the workers get every option but --output (and its value)
    forwarded = [
        a
        for i, a in enumerate(given)
        if a != "--output" and not a.startswith("--output=") and not (i and given[i - 1] == "--output")
    ]
    memory = {
        method: in_fresh_process(["benchmarks.cost.ratios", *forwarded, "--memory-worker", method], method)
        for method in args.methods
    }
    times = measure_times(args)
    from benchmarks.core.harness import versions

    package_versions = versions()
    reference_step, reference_inference = times["step"]["PROMPT_TUNING"], times["inference"]["PROMPT_TUNING/reloaded"]
    reference_memory = memory["PROMPT_TUNING"]["peak_training_mb"]
    records = []
    for method in args.methods:
        exported = times["inference"].get(f"{method}/exported")
        records.append(
            {
                **memory[method],
                "model": args.model,
                "device": str(_device(args)),
                "batch_size": args.batch_size,
                "seq_len": args.seq_len,
                "num_virtual_tokens": args.num_virtual_tokens,
                "rounds": args.rounds,
                "step_seconds": statistics.median(times["step"][method]),
                "step_ratio": ratio_with_interval(times["step"][method], reference_step),
                "memory_ratio": memory[method]["peak_training_mb"] / reference_memory if reference_memory > 0 else None,
                "inference_seconds": statistics.median(times["inference"][f"{method}/reloaded"]),
                "inference_ratio": ratio_with_interval(times["inference"][f"{method}/reloaded"], reference_inference),
                "exported_inference_ratio": None
                if exported is None
                else ratio_with_interval(exported, reference_inference),
                "versions": package_versions,
            }
        )

    def show(ratio):
        return "-" if ratio is None else f"{ratio['median']:.2f}x [{ratio['low']:.2f}, {ratio['high']:.2f}]"

    print(
        f"\n{args.model}, batch {args.batch_size} x {args.seq_len} tokens, {args.num_virtual_tokens} virtual tokens, "
        f"{records[0]['device']}; ratios to PROMPT_TUNING: median over {args.rounds} interleaved rounds [95% interval]"
    )
    print(
        f"{'method':<26}{'trainable':>11}{'step ms':>9}  {'step':<22}{'peak MB':>9}{'memory':>8}  {'infer':<22}{'exported':<22}"
    )
    for r in records:
        memory_ratio = "-" if r["memory_ratio"] is None else f"{r['memory_ratio']:.2f}x"
        print(
            f"{r['method']:<26}{r['trainable_params']:>11,}{1000 * r['step_seconds']:>9.1f}  {show(r['step_ratio']):<22}"
            f"{r['peak_training_mb']:>9.1f}{memory_ratio:>8}  {show(r['inference_ratio']):<22}"
            f"{show(r['exported_inference_ratio']):<22}"
        )
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump({"command": "python -m benchmarks cost " + " ".join(forwarded), "records": records}, f, indent=2)
    return records


if __name__ == "__main__":
    main()
