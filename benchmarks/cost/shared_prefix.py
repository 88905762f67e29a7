"""Training-step time of the shared-prefix path, against concatenation and against peft PROMPT_TUNING, on a grid of
prompt lengths P, input lengths L and batch sizes B (SmolLM2-135M, language-modelling loss over the whole sequence).

In every cell, each method trains on its own copy of the base model twice, with `shared_prefix="on"` and `"off"`, next
to peft's PROMPT_TUNING with the same prompt length; one training step (forward, backward, AdamW step) of each runs in
turn in each of `--rounds` interleaved rounds (`ratios.interleaved_seconds`), and every ratio is the median over
rounds of the paired per-round ratio with a 95% bootstrap interval (`ratios.ratio_with_interval`). Beside them stands
the token bound `(U·P + B·L) / (B·(P+L))`, the fraction of the concatenated path's positions that the shared path
runs for U distinct prompts (1 for residual, the tasks present for ComPT, the particles for a Bayesian source).

Cells already in `--output` are kept and skipped, so an interrupted grid resumes where it stopped; each record names
the command that measured it.

    python -m benchmarks cost shared-prefix [--cells 100,64,8 20,64,8 ...] [--methods RESIDUAL_PROMPT_TUNING ...]
                                            [--rounds 10] [--threads 2] [--output benchmarks/results/shared_prefix.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from benchmarks.cost.ratios import NUM_TASKS, OURS, interleaved_seconds, peft_config, ratio_with_interval, training

# the grid: P in {10, 20, 100}, L in {32, 64, 128}, B in {8, 32}
DEFAULT_CELLS = tuple(f"{p},{length},{b}" for p in (10, 20, 100) for length in (32, 64, 128) for b in (8, 32))
NUM_PARTICLES = 4  # ratios.peft_config's Bayesian source stage


def distinct_prompts(method: str, batch_size: int) -> int:
    """U: how many distinct prompts a batch of the cost benchmark holds for `method`."""
    if method == "COMPT":
        return min(NUM_TASKS, batch_size)
    if method == "BAYESIAN_PROMPT_TUNING":
        return min(NUM_PARTICLES, batch_size)
    return 1


def token_bound(num_distinct: int, num_virtual_tokens: int, length: int, batch_size: int) -> float:
    """The shared path's positions over the concatenated path's: `(U·P + B·L) / (B·(P+L))`."""
    return (num_distinct * num_virtual_tokens + batch_size * length) / (batch_size * (num_virtual_tokens + length))


def parse_cell(cell: str) -> tuple[int, int, int]:
    """`"P,L,B"` as three positive integers."""
    try:
        values = tuple(int(value) for value in cell.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"a cell is P,L,B (three positive integers), got {cell!r}")
    return values


def measure_cell(args, num_virtual_tokens: int, length: int, batch_size: int) -> list[dict]:
    """The records of one cell: every method's shared and concatenated step against each other and PROMPT_TUNING."""
    import gc

    cell_args = argparse.Namespace(
        **{**vars(args), "num_virtual_tokens": num_virtual_tokens, "seq_len": length, "batch_size": batch_size}
    )
    steps = {"PROMPT_TUNING": training("PROMPT_TUNING", cell_args)[1]}
    for method in args.methods:
        for mode in ("on", "off"):
            config = peft_config(method, cell_args)
            config.shared_prefix = mode
            steps[f"{method}/{mode}"] = training(method, cell_args, config)[1]
    seconds = interleaved_seconds(steps, args.rounds, args.warmup)
    del steps
    gc.collect()
    reference = seconds["PROMPT_TUNING"]
    records = []
    for method in args.methods:
        shared, concatenated = seconds[f"{method}/on"], seconds[f"{method}/off"]
        records.append(
            {
                "method": method,
                "num_virtual_tokens": num_virtual_tokens,
                "seq_len": length,
                "batch_size": batch_size,
                "token_bound": token_bound(
                    distinct_prompts(method, batch_size), num_virtual_tokens, length, batch_size
                ),
                "shared_seconds": statistics.median(shared),
                "concatenated_seconds": statistics.median(concatenated),
                "prompt_tuning_seconds": statistics.median(reference),
                "shared_over_concatenated": ratio_with_interval(shared, concatenated),
                "shared_over_prompt_tuning": ratio_with_interval(shared, reference),
                "concatenated_over_prompt_tuning": ratio_with_interval(concatenated, reference),
            }
        )
    return records


def main(argv=None) -> list[dict]:
    import torch

    from benchmarks.core.harness import versions

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=("smollm2",))
    parser.add_argument("--cells", nargs="+", type=parse_cell, default=[parse_cell(c) for c in DEFAULT_CELLS])
    parser.add_argument("--methods", nargs="+", default=list(OURS), choices=OURS)
    parser.add_argument("--bottleneck-size", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even if CUDA is available")
    parser.add_argument("--output", default=None, help="write the records as JSON here (and resume from it)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    records = []
    if args.output and os.path.exists(args.output):
        with open(args.output) as f:
            records = json.load(f)["records"]
    done = {(r["method"], r["num_virtual_tokens"], r["seq_len"], r["batch_size"]) for r in records}
    command = "python -m benchmarks cost shared-prefix " + " ".join(argv if argv is not None else [])
    for num_virtual_tokens, length, batch_size in args.cells:
        if all((method, num_virtual_tokens, length, batch_size) in done for method in args.methods):
            continue
        cell = [{**r, "command": command.strip()} for r in measure_cell(args, num_virtual_tokens, length, batch_size)]
        records += [r for r in cell if (r["method"], num_virtual_tokens, length, batch_size) not in done]
        for r in cell:
            ratio = r["shared_over_concatenated"]
            print(
                f"P={num_virtual_tokens} L={length} B={batch_size} {r['method']:<24} shared/concatenated "
                f"{ratio['median']:.2f}x [{ratio['low']:.2f}, {ratio['high']:.2f}] (bound {r['token_bound']:.2f}), "
                f"shared/PROMPT_TUNING {r['shared_over_prompt_tuning']['median']:.2f}x",
                flush=True,
            )
        if args.output:  # after every cell: a killed grid keeps what it measured
            os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
            with open(args.output, "w") as f:
                json.dump({"versions": versions(), "records": records}, f, indent=2)
    return records


if __name__ == "__main__":
    main()
