"""The report of a causal-LM suite (`smollm2`): each claim's tables at learning rates chosen on dev data, a
zero-shot row in every table, paired differences with 95% intervals over seeds, and a verdict per claim.

See `benchmarks.core.selection` for the selection rule and the intervals; `benchmarks.suites.plans.causal_runs` for
the runs. A claim's table holds the methods of that claim in the method registry, and each method's verdicts are
against the methods its entry is `compared_with`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Optional

import pandas as pd

from benchmarks.core.methods import LABELS, METHODS, claim_methods
from benchmarks.core.selection import best_on_test, chosen_on_dev, describe, for_every_seed, paired, verdict
from benchmarks.core.specs import BAYESIAN_PARTICLES, FULL_DATA_DEV_EXAMPLES, ORACLE_LR, SOURCE_LR, SourceSpec
from benchmarks.report.common import bar_plot, mean_std, routing_heatmap
from benchmarks.suites.plans import WAITING_LR

SHORT_LABEL = "{label}, {tokens} tokens"
PER_TASK = "one prompt per task (peft PROMPT_TUNING)"


def _lrs(chosen: pd.DataFrame) -> str:
    if chosen.lr.eq(0).all():
        return "-"
    counts = chosen.lr.value_counts().sort_index()
    return ", ".join(f"{lr:g} ×{n}" for lr, n in counts.items())


def _loss_ends(losses) -> Optional[tuple[float, float]]:
    """A run's first and last logged training loss; a run that trains one prompt per task logs one list per task,
    and gets their means."""
    if not isinstance(losses, list) or not losses:
        return None
    logs = [log for log in (losses if isinstance(losses[0], list) else [losses]) if log]
    if not logs:
        return None
    return sum(log[0] for log in logs) / len(logs), sum(log[-1] for log in logs) / len(logs)


def _training_loss(chosen: pd.DataFrame) -> str:
    ends = [found for found in map(_loss_ends, chosen.get("losses", [])) if found]
    if not ends:
        return "-"
    first, last = zip(*ends)
    return f"{sum(first) / len(first):.2f} → {sum(last) / len(last):.2f}"


def method_table(methods: dict[str, pd.DataFrame], zero_shot: Optional[str] = None) -> list[str]:
    """One row per method: test metric at the dev-chosen LRs, which LRs dev chose, the difference to the zero-shot
    row with its interval, the training loss at the start and the end of those runs (whether a method that does not
    help failed to fit its training set or fitted it and did not generalise), and (labelled optimistic) the test
    metric at the test-chosen LR."""
    lines = [
        "| method | test, LR chosen on dev | LRs chosen | vs zero-shot (points, 95% CI) | training loss, first → "
        "last logged | test at the best test LR (optimistic) |",
        "|---|---:|---|---:|---:|---:|",
    ]
    base = chosen_on_dev(methods[zero_shot])["metric"] if zero_shot in methods else None
    for label, runs in methods.items():
        chosen = chosen_on_dev(runs)
        versus = (
            ""
            if label == zero_shot or base is None
            else describe(paired(chosen["metric"], for_every_seed(base, chosen.index)))
        )
        optimistic = "-" if chosen.lr.eq(0).all() else mean_std(best_on_test(runs)["metric"])
        lines.append(
            f"| {label} | {mean_std(chosen['metric'])} | {_lrs(chosen)} | {versus} | {_training_loss(chosen)} "
            f"| {optimistic} |"
        )
    return lines


def comparison(methods: dict[str, pd.DataFrame], a: str, b: str) -> Optional[tuple[str, str]]:
    """('a − b: +x [lo, hi] points (k of n seeds): better', verdict) at dev-chosen LRs, or None if one is missing."""
    if a not in methods or b not in methods:
        return None
    difference = paired(chosen_on_dev(methods[a])["metric"], chosen_on_dev(methods[b])["metric"])
    if difference is None:
        return None
    result = verdict(difference)
    return f"{a} − {b}: {describe(difference)} points: **{result}**", result


def _bars(methods: dict[str, pd.DataFrame], title: str, path: Path) -> None:
    scores = {label: chosen_on_dev(runs)["metric"] for label, runs in methods.items()}
    bar_plot(scores, "test metric (x100) at the LR chosen on dev, mean ± std over seeds", title, path)


def _single(frame: pd.DataFrame, task: str, data: str = "kshot", tokens: Optional[int] = None) -> pd.DataFrame:
    rows = frame[(frame.task == task) & (frame.data == data)]
    return rows if tokens is None else rows[(rows.num_virtual_tokens == tokens) | (rows.method == "zero_shot")]


def complete_sweeps(runs: pd.DataFrame, budget) -> pd.DataFrame:
    """The runs of the sweeping seeds whose learning-rate sweep is complete, and the later seeds' runs (at the LR the
    sweeping seeds chose): a choice among some of the LRs is no choice (the suite records a seed's runs one after
    another, so a report rendered mid-suite sees partial sweeps)."""
    if runs.empty or runs.lr.eq(0).all():  # zero-shot: nothing to sweep
        return runs
    complete = runs.groupby("seed").lr.transform("nunique") == len(budget.prompt_lrs)
    return runs[complete | ~runs.seed.isin(budget.sweeping_seeds)]


def _by_method(rows: pd.DataFrame, methods: tuple[str, ...], budget) -> dict[str, pd.DataFrame]:
    found = {LABELS[m]: complete_sweeps(rows[rows.method == m], budget) for m in methods}
    return {label: runs for label, runs in found.items() if not runs.empty}


def _section(
    heading: str,
    methods: dict[str, pd.DataFrame],
    pairs: list[tuple[str, str]],
    figure: Path,
    rel: Callable[[str], Path],
    verdicts: dict,
) -> list[str]:
    if set(methods) <= {LABELS["zero_shot"]}:  # nothing trained yet
        return []
    _bars(methods, heading.split(": ", 1)[-1], figure)
    lines = [f"### {heading}", ""] + method_table(methods, LABELS["zero_shot"]) + [""]
    for a, b in pairs:
        found = comparison(methods, a, b)
        if found:
            lines.append(f"- {found[0]}")
            verdicts[(heading, a, b)] = found
    return lines + ["", f"![{heading}]({rel(figure.name)})", ""]


def _pairs(methods: tuple[str, ...]) -> list[tuple[str, str]]:
    """The (method, other) label pairs a claim's verdicts compare: each method against its entry's `compared_with`."""
    return [(LABELS[m], LABELS[other]) for m in methods for other in METHODS[m].compared_with]


def causal_sections(frame: pd.DataFrame, budget, figures: Path, rel) -> tuple[list[str], list[str]]:
    """The claim sections of a causal-LM suite and the verdict lines that summarise them."""
    model, lines, verdicts = budget.model, [], {}
    frame = frame[frame.model == model]
    claim1 = ("zero_shot", "prompt_tuning", *claim_methods("residual"))
    claim1_pairs = _pairs(claim1)
    for task in budget.residual_tasks:
        rows = _single(frame, task, tokens=budget.num_virtual_tokens)
        heading = f"Claim 1 — residual vs prompt tuning: {task} (16-shot), {model}"
        lines += _section(
            heading,
            _by_method(rows, claim1, budget),
            claim1_pairs,
            figures / f"claim1-{model}-{task}.png",
            rel,
            verdicts,
        )
    if budget.full_data:
        task, examples, _ = budget.full_data
        lines += _section(
            f"Claim 1 — residual vs prompt tuning: {task} ({examples} examples of the full training set), {model}",
            _by_method(_single(frame, task, data="full"), claim1, budget),
            claim1_pairs,
            figures / f"claim1-{model}-{task}-full.png",
            rel,
            verdicts,
        )
    # the short-prompt claim: residual with a few tokens against prompt tuning with few and with many
    rows = _single(frame, budget.residual_tasks[0]) if budget.residual_tasks else frame.iloc[:0]
    short = {}
    for tokens in (budget.short_virtual_tokens, budget.num_virtual_tokens):
        for method in ("prompt_tuning", "residual"):
            runs = rows[(rows.method == method) & (rows.num_virtual_tokens == tokens)]
            runs = complete_sweeps(runs, budget)
            if not runs.empty:
                short[SHORT_LABEL.format(label=LABELS[method], tokens=tokens)] = runs
    zero = rows[rows.method == "zero_shot"]
    if short and not zero.empty:
        task = budget.residual_tasks[0]
        short = {LABELS["zero_shot"]: zero, **short}
        name = lambda m, t: SHORT_LABEL.format(label=LABELS[m], tokens=t)  # noqa: E731
        s, n = budget.short_virtual_tokens, budget.num_virtual_tokens
        lines += _section(
            f"Claim 1 — short prompts: {task} (16-shot), {s} vs {n} tokens, {model}",
            short,
            [
                (name("residual", s), name("prompt_tuning", s)),
                (name("residual", s), name("prompt_tuning", n)),
                (name("prompt_tuning", s), name("prompt_tuning", n)),
            ],
            figures / f"claim1-{model}-{task}-short.png",
            rel,
            verdicts,
        )

    transfer = ("zero_shot", "prompt_tuning", *claim_methods("transfer"))
    # whether any transfer helps on the target at all, then the Bayesian methods against each other and the rest
    transfer_pairs = _pairs(transfer)
    for task in budget.transfer_targets:
        rows = _single(frame, task, tokens=budget.num_virtual_tokens)
        rows = rows[rows.sources.map(lambda sources: tuple(sources) in ((), tuple(budget.sources))).astype(bool)]
        lines += _section(
            f"Claim 2 — Bayesian transfer from {' + '.join(budget.sources)}: target {task} (16-shot), {model}",
            _by_method(rows, transfer, budget),
            transfer_pairs,
            figures / f"claim2-{model}-{task}.png",
            rel,
            verdicts,
        )

    lines += _multitask_section(frame, budget, figures, rel, verdicts)
    lines += library_sections(frame, budget, figures, rel, verdicts)
    return lines, _verdict_lines(verdicts)


def per_task_prompts(frame: pd.DataFrame, budget) -> pd.DataFrame:
    """ "One prompt per task" from the single-task prompt tuning runs: per seed, each task's LR chosen on its own dev
    split, the test metrics averaged over the tasks (seeds missing a task are left out). One row per seed, shaped
    like a run (a constant LR of 0 says that each task chose its own)."""
    per_seed, tasks = {}, budget.multitask
    for task in tasks:
        runs = frame[
            (frame.method == "prompt_tuning")
            & (frame.task == task)
            & (frame.data == "kshot")
            & (frame.num_virtual_tokens == budget.num_virtual_tokens)
            & (frame.steps == budget.steps)
        ]
        runs = complete_sweeps(runs, budget)
        if runs.empty:
            return pd.DataFrame()
        for seed, row in chosen_on_dev(runs).iterrows():
            per_seed.setdefault(seed, {})[task] = row
    rows = []
    for seed, chosen in per_seed.items():
        if len(chosen) == len(tasks):
            rows.append(
                {
                    "seed": seed,
                    "lr": 0.0,
                    "metric": sum(r["metric"] for r in chosen.values()) / len(tasks),
                    "metrics": {t: r["metric"] for t, r in chosen.items()},
                    "dev_metric": 0.0,
                    "dev_loss": 0.0,
                }
            )
    return pd.DataFrame(rows)


def _multitask_section(frame: pd.DataFrame, budget, figures: Path, rel, verdicts: dict) -> list[str]:
    tasks, model = budget.multitask, budget.model
    if not tasks:
        return []
    joint = frame[(frame.task == "+".join(tasks)) & (frame.num_virtual_tokens == budget.num_virtual_tokens)]
    zero = frame[(frame.method == "zero_shot") & frame.task.isin(tasks) & (frame.data == "kshot")]
    methods = {}
    if set(zero.task) == set(tasks):
        methods[LABELS["zero_shot"]] = pd.DataFrame(
            [
                {
                    "seed": zero.seed.iloc[0],
                    "lr": 0.0,
                    "metric": zero.metric.mean(),
                    "metrics": dict(zip(zero.task, zero.metric)),
                    "dev_metric": 0.0,
                    "dev_loss": 0.0,
                }
            ]
        )
    separate = per_task_prompts(frame, budget)
    if not separate.empty:
        methods[PER_TASK] = separate
    methods.update(_by_method(joint, claim_methods("multitask"), budget))
    if set(methods) <= {LABELS["zero_shot"]}:  # nothing trained yet
        return []
    compt, authors = LABELS["compt"], LABELS["compt_authors"]
    heading = (
        f"Claim 3 — ComPT vs one prompt per task vs one shared prompt: {' + '.join(tasks)} (16-shot each), {model}"
    )
    lines = _section(
        heading,
        methods,
        [(compt, PER_TASK), (compt, LABELS["shared_prompt"]), (authors, PER_TASK), (compt, authors)],
        figures / f"claim3-{model}.png",
        rel,
        verdicts,
    )
    lines += ["Per task, at the LRs chosen on dev:", "", "| method | " + " | ".join(tasks) + " |"]
    lines.append("|---|" + "---:|" * len(tasks))
    for label, runs in methods.items():
        chosen = chosen_on_dev(runs)
        lines.append(
            f"| {label} | " + " | ".join(mean_std(chosen["metrics"].map(lambda m: m[t])) for t in tasks) + " |"
        )
    lines.append("")
    for method in ("compt", "compt_authors"):
        runs = joint[joint.method == method]
        if not runs.empty:
            path = figures / f"claim3-{model}-{method}-routing.png"
            chosen = chosen_on_dev(runs)
            routing_heatmap(
                chosen, f"{LABELS[method]}: routing weights, {len(chosen)} seeds at the dev-chosen LR", path
            )
            lines.append(f"![{LABELS[method]} routing]({rel(path.name)})")
    return lines + [""]


# ----------------------------------------------------------------------------------------- the library claim ---

ORACLE = f"oracle: every source fine-tuned at lr {ORACLE_LR:g}, the best on dev"
LIBRARY_METHODS = ("zero_shot", "prompt_tuning", *claim_methods("library"))


def _column(rows: pd.DataFrame, name: str, default) -> pd.Series:
    """A column that records made before its field existed lack (their key left it out at its default)."""
    if name not in rows:
        return pd.Series([default] * len(rows), index=rows.index, dtype=object)
    return rows[name].map(lambda value: default if not isinstance(value, (list, tuple, str)) else value)


def oracle_runs(rows: pd.DataFrame, sources: tuple[str, ...]) -> pd.DataFrame:
    """The oracle's runs of one target: every source fine-tuned on it, one row per (seed, source), for the seeds
    whose runs cover all `sources` (a seed still running would pick the best of a part of the library)."""
    oracle = rows[rows.method == "oracle_source"].copy()
    oracle["source"] = _column(oracle, "init_source", "")
    complete = oracle.groupby("seed")["source"].transform(lambda done: set(done) == set(sources))
    return oracle[complete.astype(bool)] if not oracle.empty else oracle


def oracle_scores(oracle: pd.DataFrame) -> pd.DataFrame:
    """Per seed, the oracle's pick: the source with the best dev metric (ties: lower dev loss), shaped like a run."""
    picks = []
    for seed, runs in oracle.groupby("seed"):
        best = runs.sort_values(["dev_metric", "dev_loss", "source"], ascending=[False, True, True]).iloc[0]
        picks.append(best)
    return pd.DataFrame(picks).reset_index(drop=True) if picks else pd.DataFrame()


def ranking_agreement(rows: pd.DataFrame, oracle: pd.DataFrame) -> list[str]:
    """Per seed the oracle ran, how `rank`'s order of the sources (the library_best runs' recorded ranking, made
    before training) agrees with the oracle's order by dev metric: top-1 agreement and Spearman's rho."""
    from scipy import stats

    lines, agreed, rhos = [], [], []
    ranked = rows[rows.method == "library_best"].drop_duplicates("seed").set_index("seed")
    for seed, runs in oracle.groupby("seed"):
        if seed not in ranked.index:
            continue
        scores = {name: score for name, score in ranked.loc[seed, "details"]["ranking"] if name in set(runs.source)}
        if len(scores) < 2 or set(scores) != set(runs.source):
            continue
        dev = runs.set_index("source")["dev_metric"]
        names = sorted(scores)
        same = len(set(dev[names])) == 1  # every source scored alike on dev: no order to agree with
        rho = float("nan") if same else stats.spearmanr([-scores[n] for n in names], [dev[n] for n in names]).statistic
        rank_top = min(scores, key=scores.get)
        oracle_top = oracle_scores(runs).iloc[0]["source"]
        current = dict(ranked.loc[seed, "details"]["ranking"]).get("<current prompt>")
        beaten = (
            ""
            if current is None or current > scores[rank_top]
            else "; the model's own prompt ranked above every source"
        )
        lines.append(
            f"| {seed} | {rank_top} | {oracle_top} | {'yes' if rank_top == oracle_top else 'no'} | "
            f"{'-' if rho != rho else f'{rho:+.2f}'}{beaten} |"
        )
        agreed.append(rank_top == oracle_top)
        rhos += [] if rho != rho else [rho]
    if not lines:
        return []
    mean_rho = f"mean ρ {sum(rhos) / len(rhos):+.2f} over {len(rhos)} seeds" if rhos else "no ρ (dev scores all tied)"
    return [
        "How `rank` (the frozen model's loss with each source, before training) agrees with the oracle (each source "
        f"fine-tuned, ordered by dev metric): the same first source on {sum(agreed)} of {len(agreed)} seeds, "
        f"{mean_rho}.",
        "",
        "| seed | rank's first | oracle's first | top-1 agrees | Spearman ρ (sources) |",
        "|---:|---|---|---|---:|",
        *lines,
        "",
    ]


def deduplication_table(budget) -> list[str]:
    """How many source examples the library's sources lost to the targets' held-out text (computed from the data)."""
    from benchmarks.core.library_data import SOURCE_DATA_VERSION, dedup_report

    report = dedup_report(budget.library_sources, budget.library_targets)
    targets = budget.library_targets
    steps, batch = budget.source_steps, SourceSpec.batch_size
    lines = [
        f"Source training sets, without the test and dev texts of {', '.join(targets)} "
        "(`benchmarks.core.library_data`, rows of data version "
        f"{SOURCE_DATA_VERSION}: texts compared by their letters and digits; a source text of 20 or more letters and "
        "digits found inside a held-out text is removed as a piece of it). Each source prompt trains on "
        f"{steps} × {batch} = {steps * batch:,} of its kept rows. An overlap is a source example whose whole text is "
        "one of the target's held-out texts:",
        "",
        "| source | data | examples | duplicates across seeds | held-out texts removed | pieces removed | kept | kept "
        "rows' digest | " + " | ".join(f"overlaps {t}" for t in targets) + " |",
        "|---|---|---:|---:|---:|---:|---:|---|" + "---:|" * len(targets),
    ]
    for source, row in report.items():
        lines.append(
            f"| {source} | {row['data']} | {row['before']:,} | {row['duplicates']:,} | {row['held_out']:,} | "
            f"{row['fragments']:,} | {row['after']:,} | `{row['digest']}` | "
            + " | ".join(f"{row[f'overlap_{t}']:,}" for t in targets)
            + " |"
        )
    return lines + [""]


def library_sections(frame: pd.DataFrame, budget, figures: Path, rel, verdicts: dict) -> list[str]:
    """The library claim: per target, no transfer, the library methods and the oracle at dev-chosen LRs, paired
    differences, and how `rank` agrees with the oracle; the deduplication counts first."""
    if not budget.library_targets:
        return []
    model, sources = budget.model, tuple(budget.library_sources)
    lines, pairs = [], _pairs(LIBRARY_METHODS)
    for task in budget.library_targets:
        rows = _single(frame, task, tokens=budget.num_virtual_tokens)
        if rows.empty:
            continue
        rows = rows[_column(rows, "sources", ()).map(lambda s: tuple(s) in ((), sources)).astype(bool)]
        oracle = oracle_runs(rows, sources)
        methods = _by_method(rows[rows.method != "oracle_source"], LIBRARY_METHODS, budget)
        picks = oracle_scores(oracle)
        if not picks.empty:
            methods[ORACLE] = picks
        section = _section(
            f"Library — transfer from {len(sources)} sources: target {task} (16-shot), {model}",
            methods,
            pairs,
            figures / f"library-{model}-{task}.png",
            rel,
            verdicts,
        )
        if not section:
            continue
        # against the oracle (its seeds only), in the section but not among the verdicts at a glance
        against_oracle = [comparison(methods, LABELS[m], ORACLE) for m in ("prompt_tuning", *claim_methods("library"))]
        lines += section + [f"- {found[0]}" for found in against_oracle if found]
        if any(against_oracle):
            lines += [
                "",
                f"The oracle ran on {budget.oracle_seeds} seeds, so an interval against it has "
                f"{budget.oracle_seeds - 1} degree(s) of freedom and rarely excludes 0; it fine-tunes every source at "
                f"one LR ({ORACLE_LR:g}) while the methods choose theirs on dev, so it is a strong reference, not an "
                "upper bound.",
            ]
        lines += [""] + ranking_agreement(rows, oracle)
    if lines:
        lines = deduplication_table(budget) + lines
    return lines


def _verdict_lines(verdicts: dict) -> list[str]:
    if not verdicts:
        return [
            "None yet: a comparison needs both methods' complete LR sweeps for at least one seed (and two seeds for an interval)."
        ]
    lines = []
    for (heading, _a, _b), (sentence, _) in verdicts.items():
        lines.append(f"- {heading.split(' — ', 1)[0]}, {heading.split(': ', 1)[-1]}: {sentence}")
    return lines


def progress(planned: list, frame: pd.DataFrame) -> str:
    """How much of the suite is done, seed by seed (the suite runs seed after seed, every claim within a seed)."""
    done = set(frame["key"]) if not frame.empty else set()
    per_seed: dict[int, list[int]] = {}
    for _, spec in planned:
        counts = per_seed.setdefault(spec.seed, [0, 0])
        counts[0] += spec.key() in done
        counts[1] += 1
    waiting = sum(spec.lr is WAITING_LR for _, spec in planned)
    line = "Done so far: " + "; ".join(f"seed {seed}: {d} of {n} runs" for seed, (d, n) in per_seed.items()) + "."
    if waiting:
        line += f" {waiting} runs of the later seeds wait for the sweeping seeds to choose their learning rates."
    return line


def budget_line(budget) -> str:
    if budget.library_targets and not (budget.residual_tasks or budget.transfer_targets or budget.multitask):
        return (
            f"Budget: k-shot seeds {', '.join(map(str, budget.seeds))} ({_sweeping(budget)}); "
            f"{budget.num_virtual_tokens} virtual tokens, vocabulary init; {budget.steps} steps of batch 8 per target "
            f"(16-shot); prompt LRs {budget.prompt_lrs}; up to {budget.max_eval} test examples per target (the same "
            f"subset for every method and seed); a library of {len(budget.library_sources)} source prompts "
            f"({', '.join(budget.library_sources)}), each trained {budget.source_steps} steps of batch 16 at lr "
            f"{SOURCE_LR[budget.model]:g}, and a posterior of {BAYESIAN_PARTICLES} SVGD particles (sharded) over the "
            f"same sources, {budget.source_steps} steps per source; the oracle fine-tunes every source on each target "
            f"at lr {ORACLE_LR:g} with seeds {', '.join(map(str, budget.seeds[: budget.oracle_seeds]))}. The training "
            "loss is logged over each tenth of a run's steps; the tables give the first and the last of those means, "
            "averaged over the seeds at the chosen LR."
        )
    full = ""
    if budget.full_data:
        task, examples, steps = budget.full_data
        full = (
            f"{task} from {examples} examples of its training set in {steps} steps, "
            f"{FULL_DATA_DEV_EXAMPLES} more held out as its dev set; "
        )
    return (
        f"Budget: k-shot seeds {', '.join(map(str, budget.seeds))} ({_sweeping(budget)}); "
        f"{budget.num_virtual_tokens} virtual tokens "
        f"({budget.short_virtual_tokens} in the short-prompt runs), vocabulary init; {budget.steps} steps of batch 8 "
        f"per task (16-shot: 32 examples for two classes, so 10 epochs); {full}prompt "
        f"LRs {budget.prompt_lrs}, MLP-made prompts {budget.mlp_prompt_lrs}; up to {budget.max_eval} test examples "
        f"per task (the same subset for every method and seed); source stages {budget.source_steps} steps per source "
        f"of batch 16 at lr {SOURCE_LR[budget.model]:g} ({BAYESIAN_PARTICLES} SVGD "
        f"particles; the replicated stage takes 4 examples per step, each seen by every particle: the sharded "
        f"stage's compute per step; the replicated stage at equal data takes the sharded stage's 16, M times its "
        f"compute). The training loss is logged over each tenth of a run's steps; the tables "
        f"give the first and the last of those means, averaged over the seeds at the chosen LR."
    )


def _sweeping(budget) -> str:
    sweeping, later = budget.sweeping_seeds, budget.seeds[len(budget.sweeping_seeds) :]
    if not later:
        return "each runs every learning rate"
    return (
        f"{', '.join(map(str, sweeping))} run every learning rate; {', '.join(map(str, later))} run only the one "
        "chosen on the dev splits of those"
    )


def time_profile(frame: pd.DataFrame) -> str:
    """Where a run's time goes: training and scoring (test and dev sets), by kind of run, from the records.

    Loading the model is not recorded: it takes under a second (a converted float32 folder), once per run."""
    if frame.empty:
        return ""
    kind = frame.apply(
        lambda r: (
            "zero-shot"
            if r["method"] == "zero_shot"
            else "multi-task"
            if len(r["tasks"]) > 1
            else f"{r['data']}, {r['steps']} steps"
        ),
        axis=1,
    )
    stats = frame.assign(kind=kind).groupby("kind")[["train_seconds", "eval_seconds"]].mean()
    cells = [
        f"{name}: {row.train_seconds:.0f} s training + {row.eval_seconds:.0f} s scoring"
        for name, row in stats.iterrows()
    ]
    line = (
        "Where a run's time goes (mean per run, one worker of two on 2 CPU cores; loading the model takes under a "
        "second): " + "; ".join(cells) + "."
    )
    ranked = frame["details"].map(lambda d: isinstance(d, dict) and "ranking" in d) if "details" in frame else None
    if ranked is not None and ranked.any():
        timed = frame.loc[ranked, "details"].map(lambda d: d.get("rank_seconds")).dropna()
        line += (
            f" A library run also ranks the library before training, outside both times: {timed.mean():.0f} s on "
            f"average ({len(timed)} of {int(ranked.sum())} such runs timed)."
            if len(timed)
            else " A library run also ranks the library before training, outside both times (not timed in these runs)."
        )
    return line
