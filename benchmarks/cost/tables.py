"""The cost measurements' results as Markdown: printed by the measurements, quoted by the report."""

from __future__ import annotations


def svgd_scaling_table(report: dict) -> str:
    """The SVGD scaling measurement (`svgd_scaling.json`): step times and ratios to PROMPT_TUNING per M and mode."""
    results = report["results"]
    baseline = results[0]
    lines = [
        f"PROMPT_TUNING: {baseline['median_s'] * 1e3:.1f} ms per step (median), "
        f"batch {report['settings']['batch_size']} x {report['settings']['seq_len']} tokens",
        "",
        "| M | sharded: ms | sharded / PT | replicated: ms | replicated / PT |",
        "|---:|---:|---:|---:|---:|",
    ]
    by_key = {(r["mode"], r["num_particles"]): r for r in results[1:]}
    for particles in report["settings"]["particles"]:
        sharded, replicated = by_key[("sharded", particles)], by_key[("replicated", particles)]
        lines.append(
            f"| {particles} | {sharded['median_s'] * 1e3:.1f} | {sharded['ratio_to_prompt_tuning']:.2f} | "
            f"{replicated['median_s'] * 1e3:.1f} | {replicated['ratio_to_prompt_tuning']:.2f} |"
        )
    return "\n".join(lines)


def _interval(ratio: dict) -> str:
    return f"{ratio['median']:.2f} [{ratio['low']:.2f}, {ratio['high']:.2f}]"


def _by_cell(records: list) -> list:
    """Records in grid order: P, then L, then B, then the method as measured."""
    return sorted(records, key=lambda r: (r["num_virtual_tokens"], r["seq_len"], r["batch_size"]))


def shared_prefix_tables(report: dict) -> list[str]:
    """The shared-prefix grid (`shared_prefix.json`) as Markdown sections: training step, peak memory, scoring and
    `generate`, each measure that has records, with the commands that measured them."""
    sections = {
        "records": (
            "Training step (forward, backward, AdamW step) of each method with its prompt shared and concatenated, "
            "next to peft PROMPT_TUNING with the same prompt length: the median over interleaved rounds of the paired "
            'ratio, with its 95% bootstrap interval; "positions" is the token bound (U·P + B·L) / (B·(P+L)).',
            "| P | L | B | method | positions | shared / concatenated | shared / PROMPT_TUNING | concatenated / PROMPT_TUNING |",
            lambda r: [
                f"{r['token_bound']:.2f}",
                _interval(r["shared_over_concatenated"]),
                _interval(r["shared_over_prompt_tuning"]),
                _interval(r["concatenated_over_prompt_tuning"]),
            ],
        ),
        "memory": (
            "Peak training memory (each model in a fresh process: the growth of the peak resident set over the size "
            "after loading and reading the weights, on CPU), and the logits' share of it: the forward returns B·(P+L) rows of the vocabulary "
            "in float32 on either path.",
            "| P | L | B | method | positions | shared MB | concatenated MB | PROMPT_TUNING MB | shared / concatenated | shared / PROMPT_TUNING | logits MB (share of shared, concatenated) |",
            lambda r: [
                f"{r['token_bound']:.2f}",
                f"{r['shared_mb']:.0f}",
                f"{r['concatenated_mb']:.0f}",
                f"{r['prompt_tuning_mb']:.0f}",
                f"{r['shared_over_concatenated']:.2f}",
                f"{r['shared_over_prompt_tuning']:.2f}",
                f"{r['logits_mb']:.0f} ({r['logits_mb'] / r['shared_mb']:.2f}, {r['logits_mb'] / r['concatenated_mb']:.2f})",
            ],
        ),
        "saved": (
            "What a training step's forward keeps for its backward pass (`--measure saved`: the tensors "
            "`torch.autograd.graph.saved_tensors_hooks` sees, each storage once, the weights left out), MB shared / "
            "concatenated: the rows of vocabulary size the loss reads, the attention's keys and values, and the rest. "
            "Counted in bytes, so independent of the machine's load.",
            "| P | L | B | method | positions | shared / concatenated | vocabulary rows | attention keys and values | other |",
            lambda r: [
                f"{r['token_bound']:.2f}",
                f"{r['shared_over_concatenated']:.2f}",
                *(f"{mb:.0f} / {r['concatenated_mb'][kind]:.0f}" for kind, mb in r["shared_mb"].items()),
            ],
        ),
        "scoring": (
            "Scoring: an evaluation forward with labels and without gradients, shared and concatenated, and the "
            "`export_kv_prefix` adapter loaded in stock peft (PREFIX_TUNING: only the input's positions run; its bound "
            "is L / (P+L)), against peft PROMPT_TUNING; medians of paired ratios over interleaved rounds [95% interval].",
            "| P | L | B | method | positions | shared / concatenated | shared / PROMPT_TUNING | export bound | export / PROMPT_TUNING |",
            lambda r: [
                f"{r['token_bound']:.2f}",
                _interval(r["shared_over_concatenated"]),
                _interval(r["shared_over_prompt_tuning"]),
                f"{r['exported_token_bound']:.2f}",
                _interval(r["exported_over_prompt_tuning"]),
            ],
        ),
        "generate": (
            "`generate`: greedy, the prefill and 16 new tokens, shared and concatenated, against peft PROMPT_TUNING's "
            "`generate`; the export where stock peft's prefix `generate` gives the shared path's tokens on these "
            'versions ("wrong tokens" where it does not). On transformers 5.24 and later peft 0.21.2 prepends its own '
            "PROMPT_TUNING prompt again at every cached decoding step (docs/supported-versions.md), so that reference "
            "is wrong and slow there: the concatenated path is the one to compare with.",
            "| P | L | B | method | prefill positions | shared / concatenated | shared / PROMPT_TUNING | export / PROMPT_TUNING |",
            lambda r: [
                f"{r['prefill_token_bound']:.2f}",
                _interval(r["shared_over_concatenated"]),
                _interval(r["shared_over_prompt_tuning"]),
                _interval(r["exported_over_prompt_tuning"]) if r["exported_over_prompt_tuning"] else "wrong tokens",
            ],
        ),
    }
    lines = []
    for key, (text, header, cells) in sections.items():
        records = report.get(key)
        if not records:
            continue
        lines += [text, "", *sorted({f"- `{r['command']}`" for r in records}), "", header]
        lines.append("|" + "---:|" * 3 + "---|" + "---:|" * (header.count("|") - 5))
        for r in _by_cell(records):
            row = [str(r["num_virtual_tokens"]), str(r["seq_len"]), str(r["batch_size"]), r["method"], *cells(r)]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return lines


def rank_table(report: dict) -> list[str]:
    """`PromptLibrary.rank` against a peft PROMPT_TUNING scoring loop (`rank.json`) as Markdown lines."""
    records = _by_cell(report["records"])
    lines = [
        "N entries of P tokens ranked on K examples of L tokens (one label token each), in batches of B, on the given "
        "CPU threads: `PromptLibrary.rank` (each prompt run once, every batch after its keys and values, logits only "
        "where a label is predicted) against each entry copied into a peft PROMPT_TUNING model and scored batch by "
        'batch with labels; the median over interleaved rounds of the paired ratio [95% interval]. "positions" is '
        '(P + K·L) / (K·(P+L)), the positions rank runs over those the loop runs; "scores differ" is the largest '
        "relative difference between the two ways' scores.",
        "",
        *sorted({f"- `{r['command']}`" for r in records}),
        "",
        "| P | L | B | N | K | threads | positions | rank s | PROMPT_TUNING loop s | rank / PROMPT_TUNING loop "
        "| scores differ |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        lines.append(
            f"| {r['num_virtual_tokens']} | {r['seq_len']} | {r['batch_size']} | {r['entries']} | {r['examples']} | "
            f"{r['threads']} | {r['positions']:.2f} | {r['rank_seconds']:.1f} | {r['prompt_tuning_seconds']:.1f} | "
            f"{_interval(r['rank_over_prompt_tuning'])} | {r['max_relative_score_difference']:.0e} |"
        )
    return [*lines, ""]
