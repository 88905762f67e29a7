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
