"""How the cost of a source-stage (SVGD) training step grows with the number of particles.

Times one training step (forward, backward, optimizer step with the SVGD gradient transform, zero_grad) of
BAYESIAN_PROMPT_TUNING with M = 1, 2, 4, 8, 16 particles, in sharded mode (each example goes to one particle, one
forward pass for all) and replicated mode (every particle sees every example: the batch is expanded M times),
next to plain peft PROMPT_TUNING on the same randomly initialised GPT-2 (hidden 256, 4 layers), batch and prompt
length. Each setting runs warm-up steps, then timed repeats; the table shows the median step time and its ratio
to PROMPT_TUNING.

    python -m benchmarks cost svgd-scaling --output svgd_scaling.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from typing import Optional

import torch
from peft import PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM, GPT2Config

import peft_prompt_transfer  # noqa: F401  (registers the methods)
from benchmarks.core.harness import time_repeats
from benchmarks.cost.tables import svgd_scaling_table
from peft_prompt_transfer.bayesian import (
    BAYESIAN_PROMPT_TUNING,
    BayesianPromptConfig,
    expand_for_particles,
)

PARTICLES = (1, 2, 4, 8, 16)


def build_model(args):
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=args.vocab_size,
        n_embd=args.hidden,
        n_layer=args.layers,
        n_head=args.heads,
        n_positions=args.seq_len + args.num_virtual_tokens,
        bos_token_id=1,
        eos_token_id=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return AutoModelForCausalLM.from_config(config)


def make_batch(args) -> dict:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def time_steps(model, batch: dict, args) -> list[float]:
    """Seconds per training step: `args.warmup` untimed steps, then `args.repeats` timed ones."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step():
        model(**batch).loss.backward()
        optimizer.step()  # the SVGD transform runs here, in the optimizer's step pre-hook
        optimizer.zero_grad()

    return time_repeats(step, args.warmup, args.repeats)


def run(args) -> dict:
    batch = make_batch(args)
    results = []

    def record(method: str, mode: Optional[str], particles: Optional[int], model, model_batch):
        times = time_steps(model, model_batch, args)
        results.append(
            {
                "method": method,
                "mode": mode,
                "num_particles": particles,
                "rows_per_step": model_batch["input_ids"].shape[0],
                "times_s": times,
                "median_s": statistics.median(times),
            }
        )
        print(
            f"  {method:<22} {mode or '':<10} M={particles or '-':<3} median {statistics.median(times) * 1e3:8.1f} ms",
            flush=True,
        )

    plain = get_peft_model(
        build_model(args), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.num_virtual_tokens)
    )
    record("PROMPT_TUNING", None, None, plain, batch)
    for mode in ("sharded", "replicated"):
        for particles in args.particles:
            config = BayesianPromptConfig(
                task_type="CAUSAL_LM",
                num_virtual_tokens=args.num_virtual_tokens,
                num_particles=particles,
                particle_assignment=mode,
                prompt_tuning_init="SAMPLE_VOCAB",
            )
            model = get_peft_model(build_model(args), config)
            model_batch = expand_for_particles(batch, particles) if mode == "replicated" else batch
            record(BAYESIAN_PROMPT_TUNING, mode, particles, model, model_batch)
    baseline = results[0]["median_s"]
    for result in results:
        result["ratio_to_prompt_tuning"] = result["median_s"] / baseline
    return {
        "settings": {key: value for key, value in vars(args).items() if key != "output"},
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "results": results,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="svgd_scaling.json", help="Where to write the JSON report.")
    parser.add_argument("--particles", type=int, nargs="+", default=list(PARTICLES))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--num-virtual-tokens", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 gives the steadiest timings on a shared machine)."
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"Timing {args.warmup} warm-up + {args.repeats} timed steps per setting on {args.threads} thread(s):")
    report = run(args)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    print()
    print(svgd_scaling_table(report))
    print(f"\nWrote {args.output}")
    return report


if __name__ == "__main__":
    main()
