"""Render a suite's records as a Markdown page (`RESULTS.md`) with PNG plots: the suite's header (commands, versions,
progress), its claim sections (`benchmarks.report.minilm` or `benchmarks.report.causal`), and the cost results.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Optional

from benchmarks.core import selection
from benchmarks.core.harness import load_records
from benchmarks.cost.tables import rank_table, shared_prefix_tables, svgd_scaling_table
from benchmarks.report import causal, minilm
from benchmarks.report.common import records_frame
from benchmarks.suites.budgets import CausalBudget, suite_budget
from benchmarks.suites.plans import suite_runs

REPOSITORY_RESULTS = Path(__file__).resolve().parents[1] / "RESULTS.md"


def _svgd_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=90)
    for mode in ("sharded", "replicated"):
        rows = [r for r in report["results"] if r["mode"] == mode]
        ax.plot([r["num_particles"] for r in rows], [r["ratio_to_prompt_tuning"] for r in rows], marker="o", label=mode)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="PROMPT_TUNING")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("particles M")
    ax.set_ylabel("step time / PROMPT_TUNING")
    ax.legend(fontsize=8)
    ax.set_title("SVGD source-stage step time vs M", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def _ratio(ratio: Optional[dict]) -> str:
    return "-" if ratio is None else f"{ratio['median']:.2f}x [{ratio['low']:.2f}, {ratio['high']:.2f}]"


def _cost_section(results_dir: Path, figures: Path, out: Path) -> list[str]:
    lines = []
    for cost_path in sorted(results_dir.glob("cost-*.json")):  # one file per model
        cost = json.loads(cost_path.read_text())
        first = cost["records"][0]
        lines += [
            f"## Cost next to peft PROMPT_TUNING: {first['model']}",
            "",
            f"`{cost['command']}` — batch {first['batch_size']} x {first['seq_len']} tokens, "
            f"{first['num_virtual_tokens']} virtual tokens, {first['device']}; ratios to PROMPT_TUNING, the median "
            f"over {first['rounds']} interleaved rounds with its 95% bootstrap interval.",
            "",
            "| method | trainable | step time | peak memory | inference (reloaded) | inference (exported) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in cost["records"]:
            memory = "-" if r["memory_ratio"] is None else f"{r['memory_ratio']:.2f}x"
            lines.append(
                f"| {r['method']} | {r['trainable_params']:,} | {_ratio(r['step_ratio'])} | {memory} | "
                f"{_ratio(r['inference_ratio'])} | {_ratio(r['exported_inference_ratio'])} |"
            )
        lines.append("")
    shared_path = results_dir / "shared_prefix.json"
    if shared_path.exists():
        lines += [
            "## The shared prefix: cost against concatenation and peft PROMPT_TUNING",
            "",
            "SmolLM2-135M, 2 CPU threads (`benchmarks/results/shared_prefix.json`).",
            "",
            *shared_prefix_tables(json.loads(shared_path.read_text())),
        ]
    rank_path = results_dir / "rank.json"
    if rank_path.exists():
        lines += [
            "## `PromptLibrary.rank`: cost next to a peft PROMPT_TUNING scoring loop",
            "",
            "SmolLM2-135M (`benchmarks/results/rank.json`).",
            "",
            *rank_table(json.loads(rank_path.read_text())),
        ]
    scaling_path = results_dir / "svgd_scaling.json"
    if scaling_path.exists():
        scaling = json.loads(scaling_path.read_text())
        _svgd_plot(scaling, figures / "svgd_scaling.png")
        lines += [
            "## SVGD source stage: step time vs M",
            "",
            "`python -m benchmarks cost svgd-scaling --output benchmarks/results/svgd_scaling.json`",
            "",
            svgd_scaling_table(scaling),
            "",
            f"![step time vs M]({(figures / 'svgd_scaling.png').relative_to(out.parent)})",
            "",
        ]
    return lines


# rendered together into benchmarks/RESULTS.md, the SmolLM2 suite first: it is the one that tells methods apart;
# the library suite last
REPOSITORY_SUITES = ("smollm2", "full", "smollm2-library")


def render(suite: str, records_dir: Path, out: Optional[Path] = None, tasks: Optional[tuple] = None) -> Path:
    """Write the report for the records in `records_dir/runs.jsonl`; returns its path.

    The repository's suites (`REPOSITORY_SUITES`) on their own tasks are rendered together into
    `benchmarks/RESULTS.md` unless `out` is given; anything else (another suite, or `tasks` replacing a suite's
    targets) gets `records_dir/RESULTS.md` by default, its figures in a `figures` folder beside it. The cost results
    in `records_dir`'s parent (`cost-*.json`, `svgd_scaling.json`) close the report."""
    if out is None and suite in REPOSITORY_SUITES and not tasks:
        out, figures = REPOSITORY_RESULTS, REPOSITORY_RESULTS.parent / "figures"
        lines = ["# Benchmark results", ""]
        for name in REPOSITORY_SUITES:
            lines += _suite_lines(name, records_dir.parent / name, figures, out)
    else:
        out = out or records_dir / "RESULTS.md"
        figures = out.parent / "figures"  # beside the report, which links to them by relative paths
        lines = [f"# Benchmark results: `{suite}` suite", "", *_suite_lines(suite, records_dir, figures, out, tasks)]
    figures.mkdir(parents=True, exist_ok=True)
    lines += _cost_section(records_dir.parent, figures, out)
    out.write_text("\n".join(lines) + "\n")
    return out


def _suite_lines(suite: str, records_dir: Path, figures: Path, out: Path, tasks: Optional[tuple] = None) -> list[str]:
    records = load_records(records_dir / "runs.jsonl")
    frame = records_frame(records)
    budget = suite_budget(suite, tasks)
    is_causal = isinstance(budget, CausalBudget)
    if is_causal:  # a figure per claim and task, named as the MiniLM suite's are: a folder of its own
        figures = figures / suite
    figures.mkdir(parents=True, exist_ok=True)
    planned = suite_runs(suite, tasks=tasks, records=records)
    failed = sum("error" in r for r in records)
    recorded = set(frame["key"]) if not frame.empty else set()
    planned_keys = {spec.key() for _, spec in planned}
    done = len(recorded & planned_keys)
    # records of runs the suite no longer plans (a design since changed) stay in the file, out of the tables
    unplanned = len(recorded - planned_keys)
    if unplanned:
        frame = frame[frame["key"].isin(planned_keys)].copy()
    dates = sorted(r["date"] for r in records)
    lines = [
        f"## The `{suite}` suite" + (" (SmolLM2-135M-Instruct, verbalised labels)" if is_causal else ""),
        "",
        f"Runs produced by {commands_used(records)}. Rendered by "
        f"`python -m benchmarks report {suite}"
        + (f" --tasks {' '.join(tasks)}` (with the runs' --task-file)" if tasks else "`")
        + f". {done} of {len(planned)} planned runs recorded"
        + (f" ({failed} failed attempts logged)" if failed else "")
        + (f"; {_runs(unplanned)} of a design the suite no longer plans are kept, not reported" if unplanned else "")
        + (f", {dates[0][:10]} to {dates[-1][:10]}" if dates else "")
        + ". "
        + versions_used(records)
        + ".",
        "",
    ]
    rel = lambda name: (figures / name).relative_to(out.parent)  # noqa: E731
    if is_causal:
        lines += [
            causal.progress(planned, frame),
            "",
            causal.budget_line(budget),
            "",
            causal.time_profile(frame),
            "",
            selection.__doc__.split("\n\n", 1)[1].strip(),
            "",
        ]
        if not frame.empty:
            sections, verdicts = causal.causal_sections(frame, budget, figures, rel)
            lines += ["### Verdicts at a glance", "", *verdicts, "", *sections]
        return lines
    lines += [minilm.budget_line(suite), "", minilm.SELECTION_RULE, ""]
    if not frame.empty:
        frame["variant"] = frame.apply(minilm.variant, axis=1)
        lines += minilm.claim_sections(frame, figures, rel)
    return lines


def _runs(count: int) -> str:
    """'1 run', '3 runs'."""
    return f"{count} run" + ("s" if count != 1 else "")


def commands_used(records: list[dict]) -> str:
    """The commands the records came from, with how many runs each produced, in the order they were first used."""
    counts = Counter(r.get("command") for r in records if "error" not in r)
    named = [f"`{command}` ({_runs(count)})" for command, count in counts.items() if command]
    if counts[None]:
        named.append(f"{_runs(counts[None])} from earlier starts that did not record their command")
    return "; ".join(named) or "no runs yet"


def versions_used(records: list[dict]) -> str:
    """The package versions the runs used: 'peft 0.21.2, transformers 5.24.0 (241 runs), 5.25.0 (70 runs)'. A suite
    that spans sessions can span upstream releases too; every version a run used is named, with its count."""
    used: dict[str, Counter] = {}
    for record in records:
        if "error" not in record:
            for package, version in record.get("versions", {}).items():
                used.setdefault(package, Counter())[version] += 1
    return ", ".join(
        f"{package} {next(iter(counts))}"
        if len(counts) == 1
        else f"{package} " + ", ".join(f"{version} ({_runs(count)})" for version, count in counts.items())
        for package, counts in used.items()
    )
