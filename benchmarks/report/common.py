"""Plotting and table helpers the MiniLM and the causal-LM reports share."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from benchmarks.core.methods import LABELS


def records_frame(records: list[dict]) -> pd.DataFrame:
    """The records without errors as a frame, with a `task` column (tasks joined by "+") and the method's `label`.

    A run recorded twice (two invocations of a suite that ran it at once, or a rerun by hand) counts once, by its
    last record, as the suite's planner reads it."""
    rows = list({r.get("key", index): r for index, r in enumerate(records) if "error" not in r}.values())
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame["task"] = frame["tasks"].map(lambda t: "+".join(t))
    frame["label"] = frame["method"].map(LABELS)
    return frame


def mean_std(values: pd.Series, scale: float = 100.0) -> str:
    """'mean ± std (n=count)' of `values` times `scale`; '-' for none."""
    if values.empty:
        return "-"
    std = values.std() if len(values) > 1 else 0.0
    return f"{scale * values.mean():.1f} ± {scale * std:.1f} (n={len(values)})"


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
