"""The cost of `PromptLibrary.rank` on SmolLM2-135M, against what a user would write with peft alone: each entry
copied into a peft PROMPT_TUNING model and its loss computed batch by batch with labels (the prompt concatenated in
front of every row, logits at every position).

Each cell `P,L,B` ranks `--entries` prompts of P tokens (sampled vocabulary embeddings) on `--examples` examples of
L tokens whose last token is the one label token scored, as a verbalised classification task is, in batches of B.
Both ways run once each in each of `--rounds` interleaved rounds (`ratios.interleaved_seconds`); the ratio is the
median over rounds of the paired per-round ratio with a 95% bootstrap interval (`ratios.ratio_with_interval`). The
record keeps the largest relative difference between the two ways' scores, and `(P + K·L) / (K·(P+L))`: the positions `rank` runs
(each prompt once, then the rows after its keys and values) over the concatenated loop's, for K examples. `rank`
can take less time than that, since it also skips the logits of positions that predict no label.

Cells already in `--output` are kept and skipped, so an interrupted grid resumes where it stopped; each record names
the command that measured it.

    python -m benchmarks cost rank [--cells 20,64,8 100,64,8] [--entries 4] [--examples 32] [--rounds 5]
                                   [--threads 2] [--output benchmarks/results/rank.json]
"""

from __future__ import annotations

import json
import os
import statistics

DEFAULT_CELLS = ("20,64,8", "100,64,8")


def _examples(num_examples: int, length: int, vocab_size: int) -> list[dict]:
    """Tokenized examples whose last token is the one label token scored (ids from the top three quarters of the
    vocabulary, away from special tokens)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(num_examples):
        ids = torch.randint(vocab_size // 4, vocab_size, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": [-100] * (length - 1) + ids[-1:]})
    return rows


def measure_cell(args, num_virtual_tokens: int, length: int, batch_size: int) -> dict:
    """One cell's record: `rank`'s time over the peft PROMPT_TUNING loop's, and how far their scores differ."""
    import torch
    from peft import PromptTuningConfig, get_peft_model

    import peft_prompt_transfer as ppt
    from benchmarks.cost.ratios import _load_base, interleaved_seconds, ratio_with_interval

    base = _load_base(args).eval()
    model = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens))
    model.eval()
    embeddings = base.get_input_embeddings().weight.detach()
    generator = torch.Generator().manual_seed(1)
    library = ppt.PromptLibrary(base)
    for index in range(args.entries):
        rows = torch.randint(embeddings.shape[0] // 4, embeddings.shape[0], (num_virtual_tokens,), generator=generator)
        library.add(f"entry-{index}", embeddings[rows].clone())
    examples = _examples(args.examples, length, embeddings.shape[0])
    batches = [
        {key: torch.tensor([row[key] for row in examples[start : start + batch_size]]) for key in examples[0]}
        for start in range(0, len(examples), batch_size)
    ]
    scores = {}

    def rank():
        scores["rank"] = dict(
            library.rank(model, examples, include_current=False, batch_size=batch_size, progress=False)
        )

    @torch.no_grad()
    def prompt_tuning_loop():
        weight = model.prompt_encoder["default"].embedding.weight
        scores["PROMPT_TUNING"] = {}
        for name in library.names:
            weight.data.copy_(library[name].prompt)
            losses = [model(**batch).loss.item() * batch["input_ids"].shape[0] for batch in batches]
            scores["PROMPT_TUNING"][name] = sum(losses) / len(examples)  # one label token per example

    seconds = interleaved_seconds({"rank": rank, "PROMPT_TUNING": prompt_tuning_loop}, args.rounds, args.warmup)
    difference = max(
        abs(scores["rank"][name] - reference) / abs(reference) for name, reference in scores["PROMPT_TUNING"].items()
    )
    num_examples = len(examples)
    return {
        "num_virtual_tokens": num_virtual_tokens,
        "seq_len": length,
        "batch_size": batch_size,
        "entries": args.entries,
        "examples": num_examples,
        "positions": (num_virtual_tokens + num_examples * length) / (num_examples * (num_virtual_tokens + length)),
        "rank_seconds": statistics.median(seconds["rank"]),
        "prompt_tuning_seconds": statistics.median(seconds["PROMPT_TUNING"]),
        "rank_over_prompt_tuning": ratio_with_interval(seconds["rank"], seconds["PROMPT_TUNING"]),
        "max_relative_score_difference": difference,
        "rounds": args.rounds,
        "threads": args.threads,
    }


def main(argv=None) -> list[dict]:
    import torch

    from benchmarks.core.harness import measurement_parser, versions
    from benchmarks.cost.shared_prefix import parse_cell

    parser = measurement_parser("cost rank", __doc__, output="benchmarks/results/rank.json")
    parser.add_argument("--model", default="smollm2", choices=("smollm2",))
    parser.add_argument("--cells", nargs="+", type=parse_cell, default=[parse_cell(c) for c in DEFAULT_CELLS])
    parser.add_argument("--entries", type=int, default=4)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    report = {"records": []}
    if os.path.exists(args.output):
        with open(args.output) as f:
            report = json.load(f)
    done = {(r["num_virtual_tokens"], r["seq_len"], r["batch_size"]) for r in report["records"]}
    command = "python -m benchmarks cost rank " + " ".join(argv if argv is not None else [])
    for cell in args.cells:
        if tuple(cell) in done:
            continue
        record = {**measure_cell(args, *cell), "command": command.strip()}
        ratio = record["rank_over_prompt_tuning"]
        print(
            f"P={cell[0]} L={cell[1]} B={cell[2]}: rank / PROMPT_TUNING loop {ratio['median']:.2f}x "
            f"[{ratio['low']:.2f}, {ratio['high']:.2f}] (positions {record['positions']:.2f}), scores differ by at "
            f"most {record['max_relative_score_difference']:.1e} (relative)",
            flush=True,
        )
        report = {**report, "versions": versions(), "records": [*report["records"], record]}
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:  # after every cell: a killed grid keeps what it measured
            json.dump(report, f, indent=2)
    return report["records"]


if __name__ == "__main__":
    main()
