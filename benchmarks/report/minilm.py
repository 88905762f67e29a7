"""The report of a MiniLM suite (`quick`, `full`): per claim, tables over learning rates, bar and LR plots, and paired
differences at each method's best LR.

Every table cell is the mean +/- standard deviation over the seeds that have a record (`n` says how many). A
method's "best LR" is the learning rate with the highest mean over seeds, chosen the same way for every method;
it is chosen on the test set (the k-shot dev sets are 32 examples), so absolute numbers are optimistic while
comparisons are fair. Paired differences compare two methods seed by seed at their best LRs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import pandas as pd

from benchmarks.core.methods import LABELS
from benchmarks.core.specs import BAYESIAN_PARTICLES, HEAD_LR, SourceSpec
from benchmarks.report.common import bar_plot, mean_std, routing_heatmap
from benchmarks.suites.budgets import SUITES

# the paragraph the report quotes above a MiniLM suite's tables
SELECTION_RULE = __doc__.split("\n\n", 1)[1].strip()


def _best_lr(group: pd.DataFrame) -> float:
    return group.groupby("lr")["metric"].mean().idxmax()


def variant(row) -> str:
    """A MiniLM claim-1 row's name: method, initialisation and prompt length."""
    return f"{LABELS[row['method']]}, {row['init']} init, {row['num_virtual_tokens']} tokens"


def _lr_table(frame: pd.DataFrame, by: str = "variant") -> list[str]:
    """Mean +/- std per learning rate, the best LR, and the spread over LRs and inits."""
    lrs = sorted(frame["lr"].unique())
    lines = [
        "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best LR | spread over LRs |",
        "|---|" + "---:|" * (len(lrs) + 2),
    ]
    for name, group in frame.groupby(by, sort=False):
        cells = [mean_std(group[group.lr == lr]["metric"]) for lr in lrs]
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


def _routing_plot(frame: pd.DataFrame, path: Path) -> Optional[list[list[float]]]:
    compt = frame[frame.method == "compt"]
    if compt.empty:
        return None
    best = compt[compt.lr == _best_lr(compt)]
    return routing_heatmap(best, f"ComPT routing weights (after gates), mean of {len(best)} seeds", path)


def budget_line(suite: str) -> str:
    """The suite's budget, in a sentence."""
    budget, source = SUITES[suite], SourceSpec  # the source stages' batch size and LR are the dataclass defaults
    return (
        "The claim tables below are a regime where the methods cannot be told apart (all-MiniLM-L6-v2 with a new "
        "classifier head on 16-shot data: every prompt method within a few points of the others, far below full "
        "fine-tuning); LRs are chosen on the test set there (the records predate dev scoring). "
        f"Budget: k-shot seeds {', '.join(map(str, budget.seeds))}; {budget.num_virtual_tokens} virtual tokens "
        f"(and {max(1, budget.num_virtual_tokens // 10)} for the short-prompt runs); {budget.steps} steps of batch 8 "
        f"per task on MiniLM, {budget.smollm2_steps} on SmolLM2; prompt LRs {budget.prompt_lrs}; full fine-tuning "
        f"LRs {budget.finetune_lrs}; classifier heads at {HEAD_LR:g}; up to {budget.max_eval} test "
        f"examples per task; source stages {budget.source_steps} steps of batch {source.batch_size} per source at "
        f"lr {source.lr:g}, {BAYESIAN_PARTICLES} SVGD particles."
    )


def claim_sections(frame: pd.DataFrame, figures: Path, rel) -> list[str]:
    """The claim sections of a MiniLM suite's records, their figures written to `figures`."""
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
                + " | ".join(mean_std(best["metrics"].map(lambda m: m[t])) for t in group.iloc[0]["tasks"])
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
