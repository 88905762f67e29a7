"""Render a suite's records as `RESULTS.md` with tables and PNG plots.

Every table cell is the mean +/- standard deviation over the seeds that have a record (`n` says how many). A
method's "best LR" is the learning rate with the highest mean over seeds, chosen the same way for every method;
it is chosen on the test set (the k-shot dev sets are 32 examples), so absolute numbers are optimistic while
comparisons are fair. Paired differences compare two methods seed by seed at their best LRs.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Optional

import pandas as pd

REPOSITORY_RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
LABELS = {
    "prompt_tuning": "peft PROMPT_TUNING",
    "p_tuning": "peft P_TUNING (MLP)",
    "residual": "residual (ours)",
    "residual_no_layer_norm": "residual without LayerNorm (ablation)",
    "residual_embedding_rms": "residual, branch scaled to the embeddings' RMS",
    "full_finetuning": "full fine-tuning",
    "spot": "SPoT init (best single source)",
    "source_average": "average-of-sources init",
    "mpt": "peft MULTITASK_PROMPT_TUNING",
    "bayesian": "Bayesian (ours)",
    "bayesian_replicated": "Bayesian, the authors' replicated particles",
    "bayesian_decomposed": "Bayesian, the paper's decomposed target prompt",
    "bayesian_particle": "Bayesian, target from one posterior sample (a particle)",
    "bayesian_replicated_equal_data": "Bayesian, replicated particles on the sharded stage's batches (M× compute)",
    "bayesian_likelihood_scaled": "Bayesian, likelihood scaled by the number of particles",
    "zero_shot": "zero-shot (template and label words, no training)",
    "compt": "ComPT (ours)",
    "compt_authors": "ComPT, the authors' recipe",
    "shared_prompt": "one shared prompt",
}


def _frame(records: list[dict]) -> pd.DataFrame:
    rows = [r for r in records if "error" not in r]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame["task"] = frame["tasks"].map(lambda t: "+".join(t))
    frame["label"] = frame["method"].map(LABELS)
    return frame


def _fmt(values: pd.Series, scale: float = 100.0) -> str:
    if values.empty:
        return "-"
    std = values.std() if len(values) > 1 else 0.0
    return f"{scale * values.mean():.1f} ± {scale * std:.1f} (n={len(values)})"


def _best_lr(group: pd.DataFrame) -> float:
    return group.groupby("lr")["metric"].mean().idxmax()


def _variant(row) -> str:
    return f"{LABELS[row['method']]}, {row['init']} init, {row['num_virtual_tokens']} tokens"


def _lr_table(frame: pd.DataFrame, by: str = "variant") -> list[str]:
    """Mean +/- std per learning rate, the best LR, and the spread over LRs and inits."""
    lrs = sorted(frame["lr"].unique())
    lines = [
        "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best LR | spread over LRs |",
        "|---|" + "---:|" * (len(lrs) + 2),
    ]
    for name, group in frame.groupby(by, sort=False):
        cells = [_fmt(group[group.lr == lr]["metric"]) for lr in lrs]
        means = group.groupby("lr")["metric"].mean()
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {_best_lr(group):g} | {100 * (means.max() - means.min()):.1f} |"
        )
    return lines


def _paired(frame: pd.DataFrame, ours: str, theirs: str, by: str = "variant") -> Optional[str]:
    """Seed-by-seed difference of two variants at their best LRs."""
    a, b = frame[frame[by] == ours], frame[frame[by] == theirs]
    if a.empty or b.empty:
        return None
    a = a[a.lr == _best_lr(a)].set_index("seed")["metric"]
    b = b[b.lr == _best_lr(b)].set_index("seed")["metric"]
    diff = (a - b).dropna()
    if diff.empty:
        return None
    std = diff.std() if len(diff) > 1 else 0.0
    return (
        f"{ours} − {theirs}: {100 * diff.mean():+.1f} ± {100 * std:.1f} points "
        f"({int((diff > 0).sum())} of {len(diff)} seeds better)"
    )


def bar_plot(scores: dict[str, pd.Series], xlabel: str, title: str, path: Path) -> None:
    """Horizontal bars: for each label, the mean (x100) of its per-seed scores, with their std as the error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = [100 * values.mean() for values in scores.values()]
    stds = [100 * values.std() if len(values) > 1 else 0.0 for values in scores.values()]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(scores) + 1.2), dpi=90)
    ax.barh(range(len(scores)), means, xerr=stds, color="tab:blue", alpha=0.8, capsize=3)
    ax.set_yticks(range(len(scores)), list(scores), fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def _bar_plot(frame: pd.DataFrame, by: str, title: str, path: Path) -> None:
    scores = {name: group[group.lr == _best_lr(group)]["metric"] for name, group in frame.groupby(by, sort=False)}
    bar_plot(scores, "test metric (x100), best LR, mean ± std over seeds", title, path)


def _lr_plot(frame: pd.DataFrame, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=90)
    for name, group in frame.groupby("variant", sort=False):
        stats = group.groupby("lr")["metric"].agg(["mean", "std"]).fillna(0.0)
        ax.errorbar(stats.index, 100 * stats["mean"], yerr=100 * stats["std"], marker="o", capsize=3, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("prompt learning rate")
    ax.set_ylabel("test metric (x100)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def routing_heatmap(runs: pd.DataFrame, title: str, path: Path) -> list[list[float]]:
    """The mean over `runs` (ComPT runs, one per seed) of their routing weights, as an annotated heatmap; returns
    the mean weights."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    weights = np.mean([np.array(d["routing_weights"]) for d in runs["details"]], axis=0)
    tasks = list(runs.iloc[0]["tasks"])
    fig, ax = plt.subplots(figsize=(1.2 * weights.shape[1] + 2.5, 0.6 * len(tasks) + 1.5), dpi=90)
    image = ax.imshow(weights, cmap="viridis", vmin=0)
    ax.set_xticks(range(weights.shape[1]), [f"source {j}" for j in range(weights.shape[1])], fontsize=8)
    ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
    for (i, j), value in np.ndenumerate(weights):
        color = "white" if value < weights.max() / 2 else "black"
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", color=color, fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return weights.round(3).tolist()


def _routing_plot(frame: pd.DataFrame, path: Path) -> Optional[list[list[float]]]:
    compt = frame[frame.method == "compt"]
    if compt.empty:
        return None
    best = compt[compt.lr == _best_lr(compt)]
    return routing_heatmap(best, f"ComPT routing weights (after gates), mean of {len(best)} seeds", path)


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
    scaling_path = results_dir / "svgd_scaling.json"
    if scaling_path.exists():
        scaling = json.loads(scaling_path.read_text())
        _svgd_plot(scaling, figures / "svgd_scaling.png")
        from benchmarks.svgd_scaling import table

        lines += [
            "## SVGD source stage: step time vs M",
            "",
            "`python -m benchmarks.svgd_scaling --output benchmarks/results/svgd_scaling.json`",
            "",
            table(scaling),
            "",
            f"![step time vs M]({(figures / 'svgd_scaling.png').relative_to(out.parent)})",
            "",
        ]
    return lines


# rendered together into benchmarks/RESULTS.md, the SmolLM2 suite first: it is the one that tells methods apart
REPOSITORY_SUITES = ("smollm2", "full")


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
    from benchmarks.harness import load_records
    from benchmarks.suites import CausalBudget, suite_budget, suite_runs

    records = load_records(records_dir / "runs.jsonl")
    frame = _frame(records)
    budget = suite_budget(suite, tasks)
    causal = isinstance(budget, CausalBudget)
    if causal:  # a figure per claim and task, named as the MiniLM suite's are: a folder of its own
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
        f"## The `{suite}` suite" + (" (SmolLM2-135M-Instruct, verbalised labels)" if causal else ""),
        "",
        f"Runs produced by {_commands(records)}. Rendered by "
        f"`python -m benchmarks report {suite}"
        + (f" --tasks {' '.join(tasks)}` (with the runs' --task-file)" if tasks else "`")
        + f". {done} of {len(planned)} planned runs recorded"
        + (f" ({failed} failed attempts logged)" if failed else "")
        + (f"; {_runs(unplanned)} of a design the suite no longer plans are kept, not reported" if unplanned else "")
        + (f", {dates[0][:10]} to {dates[-1][:10]}" if dates else "")
        + ". "
        + _versions(records)
        + ".",
        "",
    ]
    rel = lambda name: (figures / name).relative_to(out.parent)  # noqa: E731
    if causal:
        from benchmarks import report_causal, selection

        lines += [
            report_causal.progress(planned, frame),
            "",
            report_causal.budget_line(budget),
            "",
            report_causal.time_profile(frame),
            "",
            selection.__doc__.split("\n\n", 1)[1].strip(),
            "",
        ]
        if not frame.empty:
            sections, verdicts = report_causal.causal_sections(frame, budget, figures, rel)
            lines += ["### Verdicts at a glance", "", *verdicts, "", *sections]
        return lines
    lines += [_budget_line(suite), "", __doc__.split("\n\n", 1)[1].strip(), ""]
    if not frame.empty:
        frame["variant"] = frame.apply(_variant, axis=1)
        lines += _claim_sections(frame, figures, rel)
    return lines


def _runs(count: int) -> str:
    """'1 run', '3 runs'."""
    return f"{count} run" + ("s" if count != 1 else "")


def _commands(records: list[dict]) -> str:
    """The commands the records came from, with how many runs each produced, in the order they were first used."""
    counts = Counter(r.get("command") for r in records if "error" not in r)
    named = [f"`{command}` ({_runs(count)})" for command, count in counts.items() if command]
    if counts[None]:
        named.append(f"{_runs(counts[None])} from earlier starts that did not record their command")
    return "; ".join(named) or "no runs yet"


def _versions(records: list[dict]) -> str:
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


def _budget_line(suite: str) -> str:
    from benchmarks import experiments
    from benchmarks.experiments import SourceSpec
    from benchmarks.suites import SUITES

    budget, source = SUITES[suite], SourceSpec  # the source stages' batch size and LR are the dataclass defaults
    return (
        "The claim tables below are a regime where the methods cannot be told apart (all-MiniLM-L6-v2 with a new "
        "classifier head on 16-shot data: every prompt method within a few points of the others, far below full "
        "fine-tuning); LRs are chosen on the test set there (the records predate dev scoring). "
        f"Budget: k-shot seeds {', '.join(map(str, budget.seeds))}; {budget.num_virtual_tokens} virtual tokens "
        f"(and {max(1, budget.num_virtual_tokens // 10)} for the short-prompt runs); {budget.steps} steps of batch 8 "
        f"per task on MiniLM, {budget.smollm2_steps} on SmolLM2; prompt LRs {budget.prompt_lrs}; full fine-tuning "
        f"LRs {budget.finetune_lrs}; classifier heads at {experiments.HEAD_LR:g}; up to {budget.max_eval} test "
        f"examples per task; source stages {budget.source_steps} steps of batch {source.batch_size} per source at "
        f"lr {source.lr:g}, {experiments.BAYESIAN_PARTICLES} SVGD particles."
    )


def _claim_sections(frame: pd.DataFrame, figures: Path, rel) -> list[str]:
    lines = []
    residual = frame[frame.claim == "residual"]
    for (model, task), group in residual.groupby(["model", "task"]):
        name = f"claim1-{model}-{task}"
        _bar_plot(group, "variant", f"Claim 1: {task}, {model}", figures / f"{name}.png")
        _lr_plot(
            group[group.method != "full_finetuning"],
            f"Claim 1: accuracy vs learning rate, {task}, {model}",
            figures / f"{name}-lr.png",
        )
        lines += [f"### Claim 1 — residual prompt tuning vs prompt tuning: {task} (16-shot), {model}", ""]
        lines += _lr_table(group)
        lines.append("")
        variants = group["variant"].unique()
        variants_of_the_branch = ("residual_no_layer_norm", "residual_embedding_rms")
        pairs = [
            (v, v.replace(LABELS[method], LABELS["prompt_tuning"]))
            for method in ("residual", *variants_of_the_branch)
            for v in variants
            if v.startswith(LABELS[method])
        ]
        pairs += [
            (v, v.replace(LABELS[method], LABELS["residual"]))
            for method in variants_of_the_branch
            for v in variants
            if v.startswith(LABELS[method])
        ]
        short = [
            v for v in variants if LABELS["residual"] in v and v.endswith(f" {group.num_virtual_tokens.min()} tokens")
        ]
        long_pt = [
            v
            for v in variants
            if LABELS["prompt_tuning"] in v
            and "random" in v
            and v.endswith(f" {group.num_virtual_tokens.max()} tokens")
        ]
        if group.num_virtual_tokens.nunique() > 1:
            pairs += [(s, p) for s in short for p in long_pt]
        lines += [f"- {line}" for line in (_paired(group, a, b) for a, b in pairs) if line]
        longest = group[group.num_virtual_tokens == group.num_virtual_tokens.max()]
        for method in ("prompt_tuning", "residual"):  # robustness: how much the choice of LR and init matters
            cells = longest[longest.method == method].groupby(["lr", "init"])["metric"].mean()
            if len(cells) > 1:
                lines.append(
                    f"- {LABELS[method]}: mean over seeds ranges {100 * cells.min():.1f} to "
                    f"{100 * cells.max():.1f} across {len(cells)} (LR, init) settings"
                )
        lines += ["", f"![accuracy by method]({rel(name + '.png')})", f"![accuracy vs LR]({rel(name + '-lr.png')})", ""]

    transfer = frame[frame.claim == "transfer"]
    for (model, task), group in transfer.groupby(["model", "task"]):
        sources = sorted({s for s in group.sources.map(tuple) for s in s})
        name = f"claim2-{model}-{task}"
        _bar_plot(group, "label", f"Claim 2: transfer to {task}, {model}", figures / f"{name}.png")
        lines += [
            f"### Claim 2 — Bayesian transfer vs other transfer: target {task} ({group.iloc[0]['data']}), "
            f"sources {' + '.join(sources)}, {model}",
            "",
        ]
        lines += _lr_table(group, by="label")
        params = group.groupby("label")["inference_params"].first()
        lines += [
            "",
            "Prompt parameters needed at inference: "
            + ", ".join(f"{k} {int(v):,}" for k, v in params.items() if pd.notna(v))
            + ".",
            "",
        ]
        spot = group[group.method == "spot"]["details"].map(lambda d: d.get("spot_source")).value_counts()
        if len(spot):
            lines += ["SPoT chose the source " + ", ".join(f"{k} ({v} runs)" for k, v in spot.items()) + ".", ""]
        lines += [
            f"- {line}"
            for line in (
                _paired(group, LABELS["bayesian"], LABELS[other], by="label")
                for other in ("prompt_tuning", "spot", "source_average", "mpt")
            )
            if line
        ]
        lines += ["", f"![transfer]({rel(name + '.png')})", ""]

    multitask = frame[frame.claim == "multitask"]
    for (model, task), group in multitask.groupby(["model", "task"]):
        name = f"claim3-{model}"
        _bar_plot(group, "label", f"Claim 3: few-shot multi-task {task}, {model}", figures / f"{name}.png")
        lines += [
            f"### Claim 3 — ComPT vs prompt tuning vs one shared prompt: {task} (16-shot each), {model}",
            "",
            "Mean over the tasks:",
            "",
        ]
        lines += _lr_table(group, by="label")
        lines += [
            "",
            "Per task, at each method's best LR:",
            "",
            "| method | " + " | ".join(group.iloc[0]["tasks"]) + " |",
            "|---|" + "---:|" * len(group.iloc[0]["tasks"]),
        ]
        for label, rows in group.groupby("label", sort=False):
            best = rows[rows.lr == _best_lr(rows)]
            lines.append(
                f"| {label} | "
                + " | ".join(_fmt(best["metrics"].map(lambda m: m[t])) for t in group.iloc[0]["tasks"])
                + " |"
            )
        lines += [""] + [
            f"- {line}"
            for line in (
                _paired(group, LABELS["compt"], LABELS[o], by="label")
                for o in ("compt_authors", "prompt_tuning", "shared_prompt")
            )
            if line
        ]
        weights = _routing_plot(group, figures / f"{name}-routing.png")
        lines += ["", f"![multi-task]({rel(name + '.png')})"]
        if weights is not None:
            lines += [f"![routing weights]({rel(name + '-routing.png')})"]
        lines.append("")
    return lines
