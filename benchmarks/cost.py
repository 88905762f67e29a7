"""Training step time, peak memory and inference latency of every method, side by side with peft's own.

Each method runs in its own process (so peak memory is its own) on the same model, batch and prompt length:
peft PROMPT_TUNING (the reference), P_TUNING (MLP reparameterisation), MULTITASK_PROMPT_TUNING, and this package's
methods. Reported per method, as ratios to PROMPT_TUNING:

- training step time (forward + backward + AdamW step, which for the Bayesian source stage includes the SVGD
  gradient transform): median of `--repeats` timed steps after `--warmup` steps;
- peak memory while training: on CUDA `torch.cuda.max_memory_allocated`, on CPU the growth of the process's peak
  resident set size (ru_maxrss) over the size after the model is loaded;
- inference latency (median forward time, no grad) of the saved adapter reloaded for inference with
  `PeftModel.from_pretrained`, and of its export to plain PROMPT_TUNING (which should be 1.00x).

    python -m benchmarks.cost [--model minilm] [--batch-size 16] [--seq-len 64] [--num-virtual-tokens 20]
                              [--output benchmarks/results/cost.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

METHODS = (
    "PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "RESIDUAL_PROMPT_TUNING", "COMPT", "BAYESIAN_PROMPT_TUNING"
)
OURS = ("RESIDUAL_PROMPT_TUNING", "COMPT", "BAYESIAN_PROMPT_TUNING")
NUM_TASKS = 2


def _peft_config(method: str, args):
    from peft import MultitaskPromptTuningConfig, PromptEncoderConfig, PromptTuningConfig

    import peft_prompt_transfer as ppt

    common = dict(task_type="SEQ_CLS", num_virtual_tokens=args.num_virtual_tokens)
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


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(method: str, args) -> dict:
    """Run in a fresh process: time training steps and inference for one method."""
    import torch
    from peft import PeftModel, get_peft_model

    import peft_prompt_transfer as ppt
    from benchmarks.harness import median_and_iqr, time_repeats
    from benchmarks.models import load_classifier

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    _, base = load_classifier(args.model, num_labels=2, seed=0)
    vocab = base.config.vocab_size
    model = get_peft_model(base, _peft_config(method, args)).to(device)
    batch = {
        "input_ids": torch.randint(1000, vocab, (args.batch_size, args.seq_len), device=device),
        "attention_mask": torch.ones(args.batch_size, args.seq_len, dtype=torch.long, device=device),
        "labels": torch.randint(0, 2, (args.batch_size,), device=device),
    }
    if method in ("MULTITASK_PROMPT_TUNING", "COMPT"):
        batch["task_ids"] = torch.arange(args.batch_size, device=device) % NUM_TASKS
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    model.train()
    rss_before = _rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    step, step_iqr = median_and_iqr(time_repeats(train_step, args.warmup, args.repeats))
    if device.type == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    latencies = {}
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(os.path.join(tmp, "adapter"))
        folders = {"reloaded": os.path.join(tmp, "adapter")}
        if method in OURS:
            ppt.export_prompt_tuning(model, os.path.join(tmp, "exported"), task=0 if method == "COMPT" else None)
            folders["exported"] = os.path.join(tmp, "exported")
        for name, folder in folders.items():
            loaded = PeftModel.from_pretrained(load_classifier(args.model, num_labels=2)[1], folder).to(device).eval()
            run_inputs = inputs if name == "reloaded" else {k: v for k, v in inputs.items() if k != "task_ids"}

            def infer():
                with torch.no_grad():
                    loaded(**run_inputs)
                if device.type == "cuda":
                    torch.cuda.synchronize()

            latencies[name] = median_and_iqr(time_repeats(infer, args.warmup, args.repeats))[0]
    return {
        "method": method,
        "model": args.model,
        "device": str(device),
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "num_virtual_tokens": args.num_virtual_tokens,
        "trainable_params": model.get_nb_trainable_parameters()[0],
        "step_seconds": step,
        "step_iqr_seconds": step_iqr,
        "peak_training_mb": peak_mb,
        "inference_seconds": latencies["reloaded"],
        "exported_inference_seconds": latencies.get("exported"),
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--num-virtual-tokens", type=int, default=20)
    parser.add_argument("--bottleneck-size", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even if CUDA is available")
    parser.add_argument("--output", default=None, help="write the records as JSON here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:  # one method, in this process
        print(json.dumps(measure(args.worker, args)))
        return []

    given = list(argv if argv is not None else sys.argv[1:])
    # the workers get every option but --output (and its value)
    forwarded = [a for i, a in enumerate(given)
                 if a != "--output" and not a.startswith("--output=") and not (i and given[i - 1] == "--output")]
    records = []
    for method in args.methods:
        result = subprocess.run(
            [sys.executable, "-m", "benchmarks.cost", *forwarded, "--worker", method],
            capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"),
        )
        if result.returncode != 0:
            raise SystemExit(f"{method} failed:\n{result.stderr[-3000:]}")
        records.append(json.loads(result.stdout.strip().splitlines()[-1]))
    reference = next(r for r in records if r["method"] == "PROMPT_TUNING") if "PROMPT_TUNING" in args.methods else records[0]
    from benchmarks.harness import versions

    package_versions = versions()
    for record in records:
        record["versions"] = package_versions
        record["step_ratio"] = record["step_seconds"] / reference["step_seconds"]
        record["memory_ratio"] = record["peak_training_mb"] / reference["peak_training_mb"] if reference["peak_training_mb"] > 0 else None
        record["inference_ratio"] = record["inference_seconds"] / reference["inference_seconds"]
        exported = record["exported_inference_seconds"]
        record["exported_inference_ratio"] = None if exported is None else exported / reference["inference_seconds"]

    print(f"\n{args.model}, batch {args.batch_size} x {args.seq_len} tokens, {args.num_virtual_tokens} virtual tokens, "
          f"{records[0]['device']}, ratios to {reference['method']} (median of {args.repeats})")
    header = f"{'method':<26}{'trainable':>11}{'step ms':>9}{'step':>7}{'peak MB':>9}{'memory':>8}{'infer':>7}{'exported':>10}"
    print(header)
    for r in records:
        exported = "-" if r["exported_inference_ratio"] is None else f"{r['exported_inference_ratio']:.2f}x"
        memory = "-" if r["memory_ratio"] is None else f"{r['memory_ratio']:.2f}x"
        print(f"{r['method']:<26}{r['trainable_params']:>11,}{1000 * r['step_seconds']:>9.1f}{r['step_ratio']:>6.2f}x"
              f"{r['peak_training_mb']:>9.1f}{memory:>8}{r['inference_ratio']:>6.2f}x{exported:>10}")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump({"command": "python -m benchmarks.cost " + " ".join(forwarded), "records": records}, f, indent=2)
    return records


if __name__ == "__main__":
    main()
