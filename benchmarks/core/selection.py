"""Honest selection and paired comparisons for the benchmark reports.

A method's learning rate is chosen on dev splits (the k-shot dev sets, or examples held out of the training set),
never on the test set: the LR with the best dev metric averaged over the seeds that ran every LR, ties broken by the
lower mean dev loss (a 16-shot dev set has 16 examples per class, so accuracies tie often). Every seed reports its test metric
at that LR; a suite's later seeds run only that LR (`CausalBudget.sweep_seeds`). Two methods are compared seed by
seed at their chosen LRs; the mean difference gets a 95% Student-t interval over seeds, and a difference counts as
shown only when its interval excludes 0.
"""

from __future__ import annotations

from typing import Optional

import pandas as pd


def choose_lr(runs: pd.DataFrame) -> float:
    """The learning rate with the best mean dev metric over `runs` (one method's runs at every LR of some seeds),
    ties broken by the lower mean dev loss, then by the lower LR."""
    means = runs.groupby("lr")[["dev_metric", "dev_loss"]].mean().reset_index()
    return float(means.sort_values(["dev_metric", "dev_loss", "lr"], ascending=[False, True, True]).lr.iloc[0])


def _sweeping(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs of the seeds that ran more than one LR, or all runs if every seed ran one (a one-value sweep)."""
    swept = runs[runs.groupby("seed").lr.transform("nunique") > 1]
    return swept if not swept.empty else runs


def chosen_on_dev(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per seed, at the LR `choose_lr` picks from the seeds that ran more than one LR (the sweeping seeds;
    seeds that ran one LR, the suite's later seeds, ran the one chosen).

    `runs` holds one method's runs, with only complete sweeps (see `report_causal.complete_sweeps`). A method that
    trains nothing (zero-shot, recorded for the first seed only: the test sets are the same for every seed) has one
    run, which stands for every seed."""
    lr = choose_lr(_sweeping(runs))
    return runs[runs.lr == lr].drop_duplicates("seed").set_index("seed", drop=False)


def best_on_test(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per seed at the LR with the best mean test metric over the seeds that ran every LR: the optimistic
    choice of the earlier tables, kept only as a labelled secondary column."""
    best = _sweeping(runs).groupby("lr")["metric"].mean().idxmax()
    return runs[runs.lr == best].drop_duplicates("seed").set_index("seed", drop=False)


def paired(a: pd.Series, b: pd.Series) -> Optional[dict]:
    """Seed-by-seed difference a - b of two per-seed metrics, over the seeds both have.

    Nothing is broadcast: a method with one seed recorded so far, set against one with five, is one paired seed, not
    five (a score that stands for every seed, zero-shot's, is broadcast by the caller with `for_every_seed`).

    Returns the mean, its 95% Student-t interval over seeds (None with one seed), the number of seeds and how many
    of them favour a; None when the two share no seed."""
    from scipy import stats

    diff = (a - b).dropna()
    if diff.empty:
        return None
    mean, n = float(diff.mean()), len(diff)
    low = high = None
    if n > 1:
        sem = float(diff.std(ddof=1)) / n**0.5
        low, high = (mean, mean) if sem == 0 else stats.t.interval(0.95, n - 1, loc=mean, scale=sem)
    return {"mean": mean, "low": low, "high": high, "n": n, "wins": int((diff > 0).sum())}


def for_every_seed(score: pd.Series, seeds: pd.Index) -> pd.Series:
    """The one score of a method that trains nothing (zero-shot, recorded once: the test sets are the same for every
    seed), repeated for each of `seeds` so that `paired` can set a trained method's seeds against it."""
    if len(score) != 1:
        raise ValueError(f"for_every_seed takes the one score of a method that trains nothing, got {len(score)}")
    return pd.Series(score.iloc[0], index=seeds)


def verdict(difference: Optional[dict]) -> str:
    """'better', 'worse' or 'no difference shown' (the interval holds 0, or one seed has no interval)."""
    if difference is None or difference["low"] is None:
        return "no difference shown"
    if difference["low"] > 0:
        return "better"
    if difference["high"] < 0:
        return "worse"
    return "no difference shown"


def describe(difference: Optional[dict], scale: float = 100.0) -> str:
    """'+2.1 [−0.4, +4.6] points, 4 of 5 seeds' for a table cell or a sentence."""
    if difference is None:
        return "-"
    interval = (
        f" [{scale * difference['low']:+.1f}, {scale * difference['high']:+.1f}]"
        if difference["low"] is not None
        else ""
    )
    return f"{scale * difference['mean']:+.1f}{interval} ({difference['wins']} of {difference['n']} seeds)"
