"""The evidence machinery of the SmolLM2 suite: learning rates chosen on dev data, paired differences with 95%
intervals and their verdicts, the causal-LM report, and tasks from a task file run through the same suites."""

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model
from scipy import stats
from transformers import TrainingArguments

import peft_prompt_transfer as ppt
from benchmarks.core.harness import append_record, load_records
from benchmarks.core.methods import (
    BAYESIAN_METHODS,
    LABELS,
    METHODS,
    MLP_PROMPT_METHODS,
    bayesian_target_options,
    claim_methods,
    source_stage,
)
from benchmarks.core.selection import best_on_test, choose_lr, chosen_on_dev, for_every_seed, paired, verdict
from benchmarks.core.specs import POSTERIOR_KINDS, SourceSpec
from benchmarks.core.tasks import KSHOT_SEEDS, TASKS, load_split, register_tasks
from benchmarks.core.training import LabelWordTrainer
from benchmarks.report.causal import causal_sections, method_table, time_profile
from benchmarks.report.common import records_frame
from benchmarks.report.page import render
from benchmarks.suites.budgets import CLAIMS, SUITES, with_tasks
from benchmarks.suites.plans import WAITING_LR, causal_runs, lr_chooser, suite_runs
from benchmarks.suites.scheduler import runs_to_do
from tests.conftest import TINY_MODELS

ROOT = Path(__file__).resolve().parents[1]


def test_the_lr_is_chosen_on_the_sweeping_seeds_dev_splits_with_ties_broken_by_dev_loss():
    runs = pd.DataFrame(
        [  # dev prefers 0.01 over both sweeping seeds (mean 0.85 vs 0.8), though 0.03 is better on test
            {"seed": 13, "lr": 0.01, "dev_metric": 0.9, "dev_loss": 0.5, "metric": 0.70},
            {"seed": 13, "lr": 0.03, "dev_metric": 0.8, "dev_loss": 0.2, "metric": 0.90},
            {"seed": 21, "lr": 0.01, "dev_metric": 0.8, "dev_loss": 0.4, "metric": 0.60},
            {"seed": 21, "lr": 0.03, "dev_metric": 0.8, "dev_loss": 0.3, "metric": 0.65},
            # a later seed ran only the LR the sweeping seeds chose
            {"seed": 42, "lr": 0.01, "dev_metric": 0.5, "dev_loss": 0.9, "metric": 0.75},
        ]
    )
    chosen = chosen_on_dev(runs)
    assert chosen.lr.tolist() == [0.01] * 3 and chosen.metric.tolist() == [0.70, 0.60, 0.75]
    assert best_on_test(runs).lr.tolist() == [0.03, 0.03]  # the optimistic column: the sweeping seeds only
    # a dev tie (mean 0.8 at both LRs) goes to the lower mean dev loss, then to the lower LR
    tie = runs[runs.seed == 21]
    assert choose_lr(tie) == 0.03
    assert choose_lr(tie.assign(dev_loss=0.3)) == 0.01


def test_paired_differences_get_a_student_t_interval_over_seeds():
    a = pd.Series({13: 0.82, 21: 0.84, 42: 0.86})
    b = pd.Series({13: 0.80, 21: 0.80, 42: 0.80})
    difference = paired(a, b)
    # by hand: differences 0.02, 0.04, 0.06; mean 0.04, sd 0.02, t(0.975, 2) = 4.303
    half = stats.t.ppf(0.975, 2) * 0.02 / 3**0.5
    assert difference["mean"] == pytest.approx(0.04)
    assert (difference["low"], difference["high"]) == pytest.approx((0.04 - half, 0.04 + half))
    assert difference["n"] == 3 and difference["wins"] == 3
    assert verdict(difference) == "no difference shown"  # 0.04 - 0.0497 < 0
    assert verdict(paired(a + 0.1, a)) == "better" and verdict(paired(a, a + 0.1)) == "worse"
    assert verdict(paired(a.iloc[:1], b.iloc[:1])) == "no difference shown"  # one seed has no interval
    # mid-suite, a method with one seed recorded pairs with one seed of a method that has three: no interval, and
    # not a three-seed interval made by repeating the one seed
    one_seed = paired(pd.Series({21: 0.95}), b)
    assert (one_seed["n"], one_seed["low"], one_seed["mean"]) == (1, None, pytest.approx(0.15))
    # a zero-shot score is one number for every seed, and says so
    assert paired(a, for_every_seed(pd.Series({13: 0.80}), a.index))["mean"] == pytest.approx(0.04)
    with pytest.raises(ValueError, match="one score of a method that trains nothing, got 3"):
        for_every_seed(b, a.index)


def test_smollm2_suite_covers_every_claim_with_dev_splits_zero_shot_rows_and_equal_sweeps():
    runs = suite_runs("smollm2")
    budget = SUITES["smollm2"]
    keys = [spec.key() for _, spec in runs]
    assert len(keys) == len(set(keys))
    assert {claim for claim, _ in runs} == {"residual", "transfer", "multitask"}
    assert {spec.seed for _, spec in runs} == set(KSHOT_SEEDS) and {spec.model for _, spec in runs} == {"smollm2"}
    # the first two seeds run every LR; without their records the later seeds' runs wait, one per method and data
    sweeping = [spec for _, spec in runs if spec.seed in KSHOT_SEEDS[:2]]
    assert all(spec.lr is not WAITING_LR for spec in sweeping)
    for seed in KSHOT_SEEDS[2:]:
        later = [spec for _, spec in runs if spec.seed == seed]
        assert all(spec.lr is WAITING_LR for spec in later)
        assert 3 * len(later) == sum(spec.seed == KSHOT_SEEDS[1] for spec in sweeping)
    assert all(spec.data in ("kshot", "full") for _, spec in runs)  # both have a dev split to choose the LR on
    zero_shot = {(spec.tasks, spec.data) for _, spec in runs if spec.method == "zero_shot"}
    trained = {(spec.tasks, spec.data) for _, spec in runs if spec.method != "zero_shot" and len(spec.tasks) == 1}
    assert zero_shot == trained  # a zero-shot row for every table, recorded once (first seed)
    assert all(spec.seed == KSHOT_SEEDS[0] for _, spec in runs if spec.method == "zero_shot")
    sweeps = {}
    for _, spec in runs:
        if spec.seed == KSHOT_SEEDS[0] and spec.method != "zero_shot":
            sweeps.setdefault((spec.method, spec.tasks, spec.data, spec.num_virtual_tokens), set()).add(spec.lr)
    assert {len(lrs) for lrs in sweeps.values()} == {3}
    for _, spec in runs:
        assert not set(spec.sources) & set(spec.tasks)
    # one prompt per task (claim 3) is the single-task prompt tuning runs: every task and LR of the multi-task set
    for task in budget.multitask:
        assert sweeps[("prompt_tuning", (task,), "kshot", budget.num_virtual_tokens)] == set(budget.prompt_lrs)
    methods = {spec.method for _, spec in runs}
    claim2_bayesian = [name for name in BAYESIAN_METHODS if METHODS[name].claim == "transfer"]
    assert set(claim2_bayesian) <= methods  # each one's stage and options are asserted below
    # the authors' replicated particles at the sharded stage's compute (a quarter of its examples per step) and at
    # its data (all of its examples, each seen by every particle); the likelihood-scaled posterior is sharded
    transferred = {spec.method: spec for _, spec in runs if spec.sources}
    stages = {method: source_stage(transferred[method]) for method in claim2_bayesian}
    assert stages["bayesian_replicated"].batch_size * 4 == stages["bayesian"].batch_size
    assert stages["bayesian_replicated_equal_data"].batch_size == stages["bayesian"].batch_size
    assert stages["bayesian_decomposed"] == stages["bayesian_particle"] == stages["bayesian"]
    assert len({stages[method].folder() for method in POSTERIOR_KINDS}) == len(POSTERIOR_KINDS) == 4
    assert {"compt", "compt_authors"} <= methods
    assert {"residual", "residual_embedding_rms", "p_tuning", "spot", "source_average", "mpt"} <= methods
    # each Bayesian transfer method is told apart by the target options it passes to BayesianPromptConfig
    fields = set(ppt.BayesianPromptConfig.__dataclass_fields__)
    for _, spec in runs:
        if spec.method in BAYESIAN_METHODS:
            options = bayesian_target_options(spec)
            assert set(options) <= fields
            expected = {"target_prompt": "decomposed" if spec.method == "bayesian_decomposed" else "plain"}
            if spec.method == "bayesian_particle":
                expected |= {"target_init": "particle:random", "target_init_seed": spec.seed}
            assert options == expected
    with pytest.raises(ValueError, match="'spot' is not a Bayesian transfer method"):
        bayesian_target_options(next(spec for _, spec in runs if spec.method == "spot"))
    # the full suite's keys did not change when RunSpec gained train_examples and source_init (its records stay
    # valid), nor did the folders of the source stages it cached
    assert all("train_examples" not in spec.key() for _, spec in suite_runs("full"))
    assert all("source_init" not in spec.key() for _, spec in suite_runs("full"))
    sharded = SourceSpec("bayesian", "smollm2", ("sst2", "cola"), 20, steps=100, batch_size=16, lr=1e-2)
    assert sharded.folder().name == "bayesian-smollm2-sst2+cola-a6852df65aee"
    # every SmolLM2 prompt starts from the vocabulary, the source stages' prompts too
    transferred = [spec for _, spec in runs if spec.sources]
    assert transferred and all(spec.init == spec.source_init == "vocab" for spec in transferred)
    assert all(spec.source(kind).init == "vocab" for spec in transferred for kind in ("bayesian", "mpt"))


def _source_order(spec) -> list[list]:
    """A made-up `rank` of a library run's sources (the first source best), the model's own prompt last."""
    return [[source, float(i)] for i, source in enumerate(spec.sources)] + [["<current prompt>", 99.0]]


def _synthetic_records(budget, score, ranking=_source_order) -> list[dict]:
    """Records for every run of `budget`, with `score(spec) -> (dev, test)`; the later seeds run the LRs the
    sweeping seeds' records choose, as the suite does."""
    records = []
    for seed in budget.seeds:
        chosen_lr = lr_chooser(budget, records)
        for claim in CLAIMS:
            for spec in causal_runs(budget, claim, seed, chosen_lr):
                if any(record["key"] == spec.key() for record in records):
                    continue  # a run two claims share is recorded once
                dev, test = score(spec)
                records.append(
                    {
                        "key": spec.key(),
                        "claim": claim,
                        **json.loads(spec.key()),
                        "metric": test,
                        "metrics": dict.fromkeys(spec.tasks, test),
                        "dev_metric": dev,
                        "dev_loss": 1 - dev,
                        "losses": [] if spec.method == "zero_shot" else [2.0, 1.0 - dev],
                        "details": {"routing_weights": [[0.5, 0.5]] * len(spec.tasks), "ranking": ranking(spec)},
                        "train_seconds": 1.0,
                        "eval_seconds": 1.0,
                    }
                )
    return records


@pytest.mark.parametrize("sweep_seeds", [0, 2], ids=["every-seed-sweeps", "two-sweeping-seeds"])
def test_causal_report_reports_test_at_the_dev_chosen_lr_with_zero_shot_and_verdicts(tmp_path, sweep_seeds):
    budget = replace(
        SUITES["smollm2"],
        seeds=(13, 21, 42),
        residual_tasks=("sst2",),
        full_data=None,
        multitask=("sst2", "trec"),
        sweep_seeds=sweep_seeds,
    )
    noise = {13: 0.0, 21: 0.01, 42: -0.01}

    def score(spec):
        if spec.method == "zero_shot":
            return 0.5, 0.6
        base = 0.7 + noise[spec.seed] + (0.05 if spec.method == "residual" else 0.0)
        # dev prefers the middle LR of each sweep; the test set would prefer the highest
        lrs = SUITES["smollm2"].mlp_prompt_lrs if spec.method in ("residual", "p_tuning") else budget.prompt_lrs
        rank = sorted(lrs).index(spec.lr) if spec.lr in lrs else 0
        return (0.9 if rank == 1 else 0.8), base + 0.1 * (rank == 2)

    records = _synthetic_records(budget, score)
    if sweep_seeds:  # the later seed ran only the LR dev chose: the middle one of each sweep
        later = {r["lr"] for r in records if r["seed"] == 42 and r["method"] != "zero_shot"}
        assert later == {budget.prompt_lrs[1], budget.mlp_prompt_lrs[1]}
    # a sweeping seed whose sweep is not complete yet (a report rendered mid-suite) is left out: one LR is no choice
    partial = next(r for r in records if r["method"] == "prompt_tuning" and r["tasks"] == ["sst2"] and r["lr"] == 0.01)
    records.append({**partial, "key": "partial", "seed": 87, "metric": 0.99})
    frame = records_frame(records)
    budget = replace(budget, seeds=(13, 21, 87, 42), sweep_seeds=sweep_seeds and 3)  # 87 sweeps but has not finished
    lines, verdicts = causal_sections(frame, budget, tmp_path, lambda name: Path(name))
    text = "\n".join(lines)
    pt, res = LABELS["prompt_tuning"], LABELS["residual"]
    # at the dev-chosen (middle) LR: 70.0 ± 1.0 for prompt tuning, 75.0 for residual; the test-best LR is optimistic
    # and, when later seeds ran only the chosen LR, known for the sweeping seeds only
    optimistic = "80.0 ± 1.0 (n=3)" if not sweep_seeds else "80.5 ± 0.7 (n=2)"
    # training loss at the chosen LR: 2.0 at the start, 1 - dev = 0.1 at the end
    row = f"| {pt} | 70.0 ± 1.0 (n=3) | 0.01 ×3 | +10.0 [+7.5, +12.5] (3 of 3 seeds) | 2.00 → 0.10 | {optimistic} |"
    assert row in text
    assert f"| {LABELS['zero_shot']} | 60.0 ± 0.0 (n=1) | - |  | - | - |" in text
    assert f"- {res} − {pt}: +5.0 [+5.0, +5.0] (3 of 3 seeds) points: **better**" in text
    assert any("Claim 1, sst2 (16-shot), smollm2:" in line and "**better**" in line for line in verdicts)
    # claim 3's one prompt per task: each task's single-task prompt tuning at its own dev-chosen LR
    assert "| one prompt per task (peft PROMPT_TUNING) | 70.0 ± 1.0 (n=3) |" in text
    assert text.count(f"| {LABELS['bayesian']} | 70.0 ± 1.0 (n=3) |") == len(budget.transfer_targets)
    # claim 2 asks first whether any transfer helps the target, then sets the Bayesian method against each
    for first, second in [("spot", "prompt_tuning"), ("bayesian", "spot"), ("bayesian_particle", "bayesian")]:
        pair = f"- {LABELS[first]} − {LABELS[second]}: +0.0 [+0.0, +0.0] (0 of 3 seeds) points: **no difference shown**"
        assert text.count(pair) == len(budget.transfer_targets)
    assert (tmp_path / "claim3-smollm2-compt-routing.png").stat().st_size > 1000


def test_method_table_training_loss_averages_the_tasks_of_a_run_with_one_prompt_per_task():
    runs = pd.DataFrame(
        {
            "seed": [13, 21],
            "lr": [0.01, 0.01],
            "metric": [0.7, 0.8],
            "dev_metric": [0.7, 0.8],
            "dev_loss": [0.3, 0.2],
            # seed 13 trained one prompt per task (one log each): its ends are the tasks' means, 3.0 and 0.5
            "losses": [[[4.0, 1.0], [2.0, 0.0]], [3.0, 1.0]],
        }
    )
    assert "| 3.00 → 0.75 |" in method_table({"per task": runs})[2]


def test_method_table_sets_each_seed_against_the_one_zero_shot_score_and_a_one_seed_method_gets_no_interval():
    zero_shot = pd.DataFrame([{"seed": 13, "lr": 0.0, "metric": 0.5, "dev_metric": 0.0, "dev_loss": 0.0}])
    trained = pd.DataFrame(
        {
            "seed": [13, 21, 42],
            "lr": [0.01] * 3,
            "metric": [0.6, 0.7, 0.8],
            "dev_metric": [0.6] * 3,
            "dev_loss": [0.3] * 3,
        }
    )
    rows = method_table({"zero-shot": zero_shot, "trained": trained, "one seed": trained.iloc[:1]}, "zero-shot")
    half = stats.t.ppf(0.975, 2) * 0.1 / 3**0.5  # differences 0.1, 0.2, 0.3 over three seeds
    assert f"| +20.0 [{100 * (0.2 - half):+.1f}, {100 * (0.2 + half):+.1f}] (3 of 3 seeds) |" in rows[3]
    assert "| +10.0 (1 of 1 seeds) |" in rows[4]


@pytest.fixture
def restore_tasks():
    saved = dict(TASKS)
    yield
    TASKS.clear()
    TASKS.update(saved)


def _fake_task(folder: Path, **overrides) -> Path:
    """A two-class task in the LM-BFF k-shot layout (seed 13) and a GLUE-style train/dev pair, with its task file."""
    for seed in (13,):
        kshot = folder / "reviews" / f"16-{seed}"
        kshot.mkdir(parents=True)
        for split, rows in (("train", 8), ("dev", 4), ("test", 6)):
            lines = ["sentence\tlabel"] + [
                f"review {split} {i} {'great' if i % 2 else 'awful'}\t{i % 2}" for i in range(rows)
            ]
            (kshot / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    full = folder / "reviews-full"
    full.mkdir()
    for split, rows in (("train", 40), ("dev", 10)):
        labels = ["negative", "positive"]
        lines = ["text\tlabel"] + [f"full {split} {i}\t{labels[i % 2]}" for i in range(rows)]
        (full / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    task = {
        "name": "reviews",
        "label_names": ["negative", "positive"],
        "template": "Review: {text}\nSentiment:",
        "label_words": [" negative", " positive"],
        "kshot": {"folder": "reviews", "format": "tsv", "text": "sentence", "label": "label"},
        "full": {"folder": "reviews-full", "format": "tsv", "text": "text", "label": "label"},
        **overrides,
    }
    path = folder / "tasks.json"
    path.write_text(json.dumps({"tasks": [task]}))
    return path


def test_a_task_file_adds_a_task_every_split_of_which_reads(tmp_path, restore_tasks):
    assert register_tasks(str(_fake_task(tmp_path))) == ["reviews"]
    train = load_split("reviews", "kshot-train", seed=13)
    assert len(train) == 8 and train[1] == {"text": "review train 1 great", "text_pair": None, "label": 1}
    assert len(load_split("reviews", "kshot-test", seed=13)) == 6
    full = load_split("reviews", "train")
    assert len(full) == 40 and full["label"][:2] == [0, 1]  # label names become their indices
    with pytest.raises(FileNotFoundError, match=r"Task 'reviews': no file .*16-21/train.tsv"):
        load_split("reviews", "kshot-train", seed=21)
    budget = with_tasks(SUITES["smollm2"], ("reviews", "trec"))
    assert budget.residual_tasks == ("reviews", "trec") and budget.multitask == ("reviews", "trec")
    assert budget.full_data == ("reviews", 800, 100)  # its training set is too small: that run will say so
    assert budget.transfer_targets == ("reviews", "trec")
    assert with_tasks(SUITES["smollm2"], ("sst2",)).transfer_targets == ()  # a source is never a target


def test_a_full_data_run_that_does_not_fit_the_training_set_says_so(tmp_path, restore_tasks):
    from benchmarks.core.backbone import Backbone
    from benchmarks.core.runner import run, training_data
    from benchmarks.core.specs import RunSpec

    register_tasks(str(_fake_task(tmp_path)))
    spec = RunSpec("prompt_tuning", "smollm2", ("reviews",), 13, 1e-2, 4, data="full", train_examples=800)
    with pytest.raises(ValueError, match="reviews's training set has 40 examples; train_examples=800 plus 200"):
        training_data("reviews", spec)
    with pytest.raises(ValueError, match="zero_shot needs a causal LM"):
        run(RunSpec("zero_shot", "minilm", ("reviews",), 13, 0.0, 4), Backbone("minilm", tokenizer=None))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"name": "sst2"}, "the name is taken by a built-in task"),
        ({"label_words": [" yes"]}, "one label_words entry per label"),
        ({"template": "Review:"}, r"must contain \{text\}"),
        ({"metric": "auc"}, "metric must be"),
        ({"kshot": {"folder": "missing", "format": "tsv", "text": "t", "label": "l"}}, "missing does not exist"),
        ({"kshot": {"folder": "reviews", "format": "xml", "text": "t", "label": "l"}}, "format must be"),
        ({"colour": "red"}, r"unknown keys \['colour'\]"),
    ],
)
def test_a_bad_task_file_is_refused_with_what_to_fix(tmp_path, restore_tasks, overrides, message):
    with pytest.raises(ValueError, match=message):
        register_tasks(str(_fake_task(tmp_path, **overrides)))
    assert "reviews" not in TASKS or overrides.get("name") == "sst2"


def test_unknown_or_kshot_less_tasks_are_refused():
    with pytest.raises(ValueError, match=r"Unknown tasks \['nope'\]"):
        with_tasks(SUITES["quick"], ("nope",))
    with pytest.raises(ValueError, match=r"Tasks \['cb'\] have no k-shot splits"):
        with_tasks(SUITES["quick"], ("cb",))


@pytest.mark.slow
def test_a_custom_task_runs_through_the_quick_suite_from_the_command_line(tmp_path):
    """A user's own task, by a task file and --tasks, no code change: the quick suite's claim 1 on MiniLM."""
    task_file = _fake_task(tmp_path / "data")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PEFT_PROMPT_TRANSFER_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    results = tmp_path / "results"
    options = ["--task-file", str(task_file), "--tasks", "reviews", "--results-dir", str(results)]
    command = [sys.executable, "-m", "benchmarks", "quick", "--claims", "residual", "--models", "minilm", *options]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = load_records(results / "quick" / "runs.jsonl")
    assert records and all(r["tasks"] == ["reviews"] and "error" not in r for r in records)
    assert all(set(r["dev_metrics"]) == {"reviews"} for r in records)  # its own dev split chose nothing but is scored
    report = (results / "quick" / "RESULTS.md").read_text()
    assert "residual prompt tuning vs prompt tuning: reviews (16-shot), minilm" in report
    assert (
        f"`python -m benchmarks report quick --tasks reviews` (with the runs' --task-file). {len(records)} of" in report
    )


def test_the_report_counts_the_runs_the_suite_plans_and_keeps_records_of_an_old_design_out(tmp_path):
    budget = SUITES["smollm2-quick"]
    records = _synthetic_records(budget, lambda spec: (0.8, 0.7))
    bayesian = next(r for r in records if r["method"] == "bayesian")
    old_key = json.dumps({k: v for k, v in json.loads(bayesian["key"]).items() if k != "source_init"}, sort_keys=True)
    records.insert(0, {k: v for k, v in bayesian.items() if k != "source_init"} | {"key": old_key, "metric": 0.0})
    (tmp_path / "smollm2-quick").mkdir()
    for record in records:
        record |= {"date": "2026-12-04T00:00:00+00:00", "versions": {"peft": "0.21.2"}}
        append_record(tmp_path / "smollm2-quick" / "runs.jsonl", record)
    text = render("smollm2-quick", tmp_path / "smollm2-quick").read_text()
    planned = len(suite_runs("smollm2-quick"))
    assert planned == len(records) - 1
    assert f"{planned} of {planned} planned runs recorded; 1 run of a design the suite no longer plans" in text
    assert f"| {LABELS['bayesian']} | 70.0 ± 0.0 (n=1) |" in text  # the old run's 0.0 is not in its table
    # a report written elsewhere takes its figures along
    elsewhere = render("smollm2-quick", tmp_path / "smollm2-quick", tmp_path / "elsewhere" / "report.md")
    figures = re.findall(r"!\[[^]]*\]\(([^)]+)\)", elsewhere.read_text())
    assert figures and all((elsewhere.parent / figure).is_file() for figure in figures)


@pytest.mark.slow
def test_smollm2_quick_suite_runs_every_claim_and_renders_verdicts(tmp_path):
    """The SmolLM2 suite's code paths on a tiny budget with the real model: zero-shot runs, dev scoring, the
    full-data run, every posterior (both particle assignments, equal data, the scaled likelihood), the decomposed
    target and the target from one particle, ComPT in both designs; no numbers asserted."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PEFT_PROMPT_TRANSFER_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    smollm2_cache = Path.home() / ".cache" / "peft_prompt_transfer" / "smollm2-135m-instruct"
    if smollm2_cache.exists():  # reuse the converted model, not the source stages
        (tmp_path / "cache").mkdir()
        os.symlink(smollm2_cache, tmp_path / "cache" / "smollm2-135m-instruct")
    results = tmp_path / "results"
    command = [sys.executable, "-m", "benchmarks", "smollm2-quick", "--results-dir", str(results)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = load_records(results / "smollm2-quick" / "runs.jsonl")
    assert len(records) == len(suite_runs("smollm2-quick")) and not any("error" in r for r in records)
    for record in records:
        assert set(record["dev_metrics"]) == set(record["tasks"]) and "dev_loss" in record
        assert (record["method"] == "zero_shot") == (record["losses"] == [])
    sources = {
        json.loads((folder / "done.json").read_text())["spec"]["kind"]: json.loads((folder / "done.json").read_text())
        for folder in (tmp_path / "cache" / "benchmark-sources").iterdir()
        if (folder / "done.json").exists()
    }
    assert sources["bayesian_replicated"]["spec"]["batch_size"] * 4 == sources["bayesian"]["spec"]["batch_size"]
    # each posterior was trained as its kind says: its particles' assignment and likelihood scale, as saved
    posteriors = {
        json.loads((folder / "done.json").read_text())["spec"]["kind"]: json.loads(
            (folder / "adapter_config.json").read_text()
        )
        for folder in (tmp_path / "cache" / "benchmark-sources").iterdir()
        if (folder / "adapter_config.json").exists() and folder.name.startswith("bayesian")
    }
    assert {
        kind: (config["particle_assignment"], config["likelihood_scale"]) for kind, config in posteriors.items()
    } == {
        "bayesian": ("sharded", 1.0),
        "bayesian_replicated": ("replicated", 1.0),
        "bayesian_replicated_equal_data": ("replicated", 1.0),
        "bayesian_likelihood_scaled": ("sharded", 4.0),
    }
    assert {source["spec"]["init"] for source in sources.values()} == {"vocab"}
    # a built stage leaves no checkpoints behind
    assert not list((tmp_path / "cache" / "benchmark-sources").glob(".checkpoints-*"))
    report = (results / "smollm2-quick" / "RESULTS.md").read_text()
    for heading in ("### Verdicts at a glance", "### Claim 1", "### Claim 2", "### Claim 3", "Done so far: seed 13"):
        assert heading in report
    assert "zero-shot (template and label words, no training)" in report
    assert (
        results / "smollm2-quick" / "figures" / "smollm2-quick" / "claim3-smollm2-compt_authors-routing.png"
    ).exists()

    # every claim-2 starting point, scored untrained from the source stages just built
    output = tmp_path / "transfer_inits.json"
    command = [
        sys.executable,
        "-m",
        "benchmarks",
        "study",
        "transfer-inits",
        "--suite",
        "smollm2-quick",
        "--tasks",
        "mr",
    ]
    done = subprocess.run(
        command + ["--output", str(output)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    inits = json.loads(output.read_text())
    particles = [f"{kind} particle {k}" for kind in POSTERIOR_KINDS for k in range(4)]
    names = ["prompt_tuning", "source_average", "mpt", *POSTERIOR_KINDS]
    assert list(inits["results"]) == names + ["source prompt: sst2", "source prompt: cola"] + particles
    vocabulary = inits["vocabulary_token_norm"]
    for name in ["prompt_tuning", "source prompt: sst2", "source prompt: cola"] + particles:
        # started from vocabulary tokens (4 of them: 0.76-1.34 times the mean token's norm in 99.8% of draws) and
        # moved little in 2 steps; peft's random init would be 7.5 times as long
        assert 0.5 * vocabulary < inits["results"][name]["token_norm"] < 2 * vocabulary, name
    for kind in POSTERIOR_KINDS:  # the target starts from the posterior mean
        assert inits["results"][kind]["token_norm"] == pytest.approx(inits["posteriors"][kind]["mean_token_norm"])
        assert inits["posteriors"][kind]["spread"] > 0
    assert all(0 <= row["mr"]["metric"] <= 1 and row["mr"]["loss"] > 0 for row in inits["results"].values())


@pytest.mark.parametrize(
    "config",
    [
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),  # prepends 3 positions
        PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),  # prepends none
    ],
    ids=["prompt_tuning", "prefix_tuning"],
)
def test_the_label_word_loss_equals_the_models_own_loss_and_gradients(tmp_path, config):
    model = get_peft_model(TINY_MODELS["llama"].build(), config)
    # right-padded rows of different lengths with one label token each, as Backbone.encode and its collator make them
    input_ids = torch.randint(3, 64, (4, 7), generator=torch.Generator().manual_seed(0))
    lengths = [7, 5, 6, 3]
    attention_mask = torch.tensor([[1] * n + [0] * (7 - n) for n in lengths])
    labels = torch.full_like(input_ids, -100)
    for row, n in enumerate(lengths):
        labels[row, n - 1] = 5 + row
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def loss_and_gradient(loss_of):
        model.zero_grad()
        loss = loss_of()
        loss.backward()
        gradient = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        return loss.detach(), gradient

    trainer = LabelWordTrainer(model=model, args=TrainingArguments(str(tmp_path), use_cpu=True, report_to=[]))
    own_loss, own_gradient = loss_and_gradient(lambda: model(**batch).loss)
    loss, gradient = loss_and_gradient(lambda: trainer.compute_loss(model, dict(batch)))
    torch.testing.assert_close(loss, own_loss)
    torch.testing.assert_close(gradient, own_gradient)
    assert own_gradient.abs().sum() > 0


@pytest.fixture
def two_stage_suite(monkeypatch):
    """A one-claim causal suite whose first seed sweeps two LRs and whose second runs the one dev chose, with runs
    that record at once (dev prefers the higher LR of each sweep)."""
    from benchmarks.core import runner
    from benchmarks.core.backbone import Backbone

    budget = replace(
        SUITES["smollm2-quick"], seeds=(13, 21), sweep_seeds=1, prompt_lrs=(1e-2, 3e-2), mlp_prompt_lrs=(3e-3, 1e-2)
    )
    monkeypatch.setitem(SUITES, "two-stage", budget)
    monkeypatch.setattr(Backbone, "load", classmethod(lambda cls, name: None))

    def run(spec, backbone):
        dev = 0.9 if spec.lr == _higher_lr(spec.method) else 0.8
        return {"metrics": {}, "metric": 0.5, "dev_metric": dev, "dev_loss": 0.1}

    monkeypatch.setattr(runner, "run", run)
    return budget


def _higher_lr(method: str) -> float:
    return 1e-2 if method in MLP_PROMPT_METHODS else 3e-2


def test_the_later_seeds_run_the_lr_the_sweeping_seeds_chose_in_the_same_invocation(tmp_path, two_stage_suite):
    from benchmarks.__main__ import main

    assert main(["two-stage", "--claims", "residual", "--results-dir", str(tmp_path), "--no-report"]) == 0
    records = load_records(tmp_path / "two-stage" / "runs.jsonl")
    first = [r for r in records if r["seed"] == 13 and r["method"] != "zero_shot"]
    later = [r for r in records if r["seed"] == 21]
    assert len(first) == 2 * len(later) > 0 and {r["lr"] for r in first} == {3e-3, 1e-2, 3e-2}
    assert all(record["lr"] == _higher_lr(record["method"]) for record in later)
    planned = suite_runs("two-stage", claims=("residual",), records=records)
    assert {spec.key() for _, spec in planned} == {r["key"] for r in records}


def _record(path: Path, spec, error: bool = False) -> None:
    record = {"key": spec.key(), **json.loads(spec.key()), "dev_metric": 0.8, "dev_loss": 0.1}
    with path.open("a") as records:
        records.write(json.dumps({**record, "error": "Traceback ..."} if error else record) + "\n")


def test_a_worker_waits_for_the_sweeping_runs_other_workers_hold_before_it_stops(
    tmp_path, monkeypatch, two_stage_suite
):
    import argparse
    import hashlib

    records_path = tmp_path / "runs.jsonl"
    planned = suite_runs("two-stage", claims=("residual",))
    sweeping = [spec for _, spec in planned if spec.seed == 13]
    # another worker of the same invocation holds one LR of every sweep (claimed, not recorded yet), so every run
    # of the later seed waits for it and this worker has nothing else to do
    held = [spec for spec in sweeping if spec.lr == _higher_lr(spec.method)]
    queue = tmp_path / "queue"
    queue.mkdir()
    for spec in sweeping:
        if spec in held:
            (queue / hashlib.sha1(spec.key().encode()).hexdigest()).touch()
        else:
            _record(records_path, spec)
    waits = []

    def other_worker_finishes(seconds):
        waits.append(seconds)
        assert len(waits) == 1, "a worker waited for runs that will not finish"
        for spec in held:
            _record(records_path, spec)

    monkeypatch.setattr("time.sleep", other_worker_finishes)
    args = argparse.Namespace(
        suite="two-stage",
        claims=("residual",),
        models=("smollm2",),
        data=("kshot", "full"),
        tasks=None,
        shard=(0, 1),
        queue=str(queue),
    )
    todo = runs_to_do(args, records_path, set(), announce=False)
    assert len(waits) == 1 and todo and {spec.seed for _, spec in todo} == {21}
    assert all(spec.lr is not WAITING_LR for _, spec in todo)
    # had the held runs failed (recorded with an error), the worker would stop instead of waiting for nothing
    failed = tmp_path / "failed.jsonl"
    for spec in sweeping:
        _record(failed, spec, error=spec in held)
    waits.clear()
    assert runs_to_do(args, failed, set(), announce=False) == [] and waits == []


def test_a_run_recorded_twice_counts_once_by_its_last_record():
    first = {"key": "a", "method": "prompt_tuning", "tasks": ["mr"], "metric": 0.5}
    frame = records_frame([first, {**first, "key": "b"}, {**first, "metric": 0.7}, {"key": "c", "error": "x"}])
    assert list(frame["key"]) == ["a", "b"] and list(frame["metric"]) == [0.7, 0.5]


def test_the_library_suite_transfers_to_targets_no_source_saw_and_runs_its_oracle_on_two_seeds():
    budget = SUITES["smollm2-library"]
    runs = [spec for _, spec in suite_runs("smollm2-library")]
    assert len(budget.library_sources) >= 6 and len(budget.library_targets) >= 4
    assert not set(budget.library_sources) & set(budget.library_targets)
    transferred = [spec for spec in runs if spec.sources]
    assert transferred and all(
        spec.sources == budget.library_sources and spec.held_out == budget.library_targets for spec in transferred
    )
    # one library (prompt tuning stage) and one posterior serve every target and method
    stages = {source_stage(spec) for spec in transferred}
    assert {stage.kind for stage in stages} == {"prompt_tuning", "bayesian"} and len(stages) == 2
    oracle = [spec for spec in runs if spec.method == "oracle_source"]
    assert {spec.seed for spec in oracle} == set(KSHOT_SEEDS[:2])
    assert len(oracle) == 2 * len(budget.library_sources) * len(budget.library_targets)
    assert {spec.lr for spec in oracle} == {1e-2} and {spec.init_source for spec in oracle} == set(
        budget.library_sources
    )
    methods = {spec.method for spec in runs}
    assert methods == {"zero_shot", "prompt_tuning", "oracle_source", *claim_methods("library")}
    assert {spec.tasks for spec in runs if spec.method == "zero_shot"} == {(t,) for t in budget.library_targets}


@pytest.mark.parametrize("oracle_done", ["every source", "one source"])
def test_the_library_report_sets_rank_against_the_oracle(tmp_path, oracle_done):
    """The oracle picks the source with the best dev score per seed; rank's first source agrees or not, with
    Spearman's rho over the sources. A seed whose oracle has not fine-tuned every source yet is left out: its pick
    would be the best of a part of the library."""
    budget = SUITES["smollm2-quick"]  # library: sst2 and mpqa to mr, oracle on the first seed

    def score(spec):
        dev = {"mpqa": 0.9, "sst2": 0.6}.get(spec.init_source, 0.7)
        return dev, dev - 0.1

    def mpqa_first(spec):
        return [["mpqa", 0.5], ["<current prompt>", 1.0], ["sst2", 2.0]]

    records = _synthetic_records(budget, score, ranking=mpqa_first)
    if oracle_done == "one source":
        records = [r for r in records if not (r["method"] == "oracle_source" and r["init_source"] == "sst2")]
    (tmp_path / "smollm2-quick").mkdir()
    for record in records:
        record |= {"date": "2026-12-06T00:00:00+00:00", "versions": {"peft": "0.21.2"}}
        append_record(tmp_path / "smollm2-quick" / "runs.jsonl", record)
    text = render("smollm2-quick", tmp_path / "smollm2-quick").read_text()
    assert "### Library — transfer from 2 sources: target mr (16-shot), smollm2" in text
    oracle_row = "| oracle: every source fine-tuned at lr 0.01, the best on dev | 80.0 ± 0.0 (n=1) |"
    agreement_row = "| 13 | mpqa | mpqa | yes | +1.00 |"
    assert ("the same first source on 1 of 1 seeds, mean ρ +1.00 over 1 seeds." in text) == (
        oracle_done == "every source"
    )
    assert (oracle_row in text, agreement_row in text) == (
        (True, True) if oracle_done == "every source" else (False, False)
    )
    assert "| sst2 | train | 67,349 |" in text  # the deduplication counts


def test_the_time_profile_adds_the_library_runs_ranking_time_where_recorded():
    run = {"method": "prompt_tuning", "tasks": ["mr"], "data": "kshot", "steps": 40, "eval_seconds": 10.0}
    ranked = {**run, "method": "library_best", "train_seconds": 100.0}
    frame = records_frame(
        [
            {**run, "key": "a", "train_seconds": 100.0, "details": {}},
            {**ranked, "key": "b", "details": {"ranking": [], "rank_seconds": 30.0}},
            {**ranked, "key": "c", "details": {"ranking": []}},  # recorded before `rank_seconds` existed
        ]
    )
    line = time_profile(frame)
    assert "kshot, 40 steps: 100 s training + 10 s scoring." in line
    assert "ranks the library before training, outside both times: 30 s on average (1 of 2 such runs timed)." in line
    assert "not timed" in time_profile(frame[frame.key != "b"])
