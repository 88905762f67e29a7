"""The recorded evidence stays valid: every recorded run is a run its suite plans (or of a design kept on purpose),
keys and source-stage folders are what they were when the runs were recorded, and the report re-renders unchanged."""

import dataclasses
import json
from pathlib import Path

import pytest

from benchmarks.core.harness import load_records
from benchmarks.core.methods import METHODS, source_stage
from benchmarks.core.specs import RUN_FIELDS_ADDED_LATER, SOURCE_FIELDS_ADDED_LATER, RunSpec, SourceSpec
from benchmarks.report import page
from benchmarks.suites.budgets import SUITES
from benchmarks.suites.plans import RETIRED_DESIGNS, suite_runs

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RECORDS = sorted(RESULTS.glob("*/runs.jsonl"))


def test_there_are_records_to_check():
    assert {path.parent.name for path in RECORDS} == {"full", "smollm2", "smollm2-library"}


@pytest.mark.parametrize("path", RECORDS, ids=lambda path: path.parent.name)
def test_every_recorded_run_is_planned_by_its_suite_or_of_a_design_kept_on_purpose(path):
    suite, records = path.parent.name, load_records(path)
    planned = {spec.key() for _, spec in suite_runs(suite, records=records)}
    retired = [design for design in RETIRED_DESIGNS if design.suite == suite]
    unexplained, kept = [], {design.reason: 0 for design in retired}
    for key in {record["key"] for record in records} - planned:
        designs = [design for design in retired if design.matches(json.loads(key))]
        if not designs:
            unexplained.append(key)
        for design in designs:
            kept[design.reason] += 1
    assert unexplained == [], "recorded runs that no suite plans: a key changed, or a retired design is not listed"
    assert all(kept.values()), f"a retired design that matches no record: {kept}"


def test_the_methods_and_keys_of_the_records_are_those_of_the_registry_and_the_run_spec():
    keys = [json.loads(record["key"]) for path in RECORDS for record in load_records(path)]
    assert {fields["method"] for fields in keys} <= set(METHODS)
    # a field in the key of no recorded run was added later: it must be left out at its old value (or none has it)
    fields = {f.name: f for f in dataclasses.fields(RunSpec)}
    recorded = set().union(*keys)
    assert recorded <= set(fields)
    assert set(fields) - recorded <= set(RUN_FIELDS_ADDED_LATER), "a new RunSpec field needs RUN_FIELDS_ADDED_LATER"
    for name, value in RUN_FIELDS_ADDED_LATER.items():
        assert fields[name].default == value
    for fields, record in zip(keys, (record for path in RECORDS for record in load_records(path))):
        spec = RunSpec(**{**fields, "tasks": tuple(fields["tasks"]), "sources": tuple(fields["sources"])})
        assert spec.key() == record["key"]


def test_a_new_field_at_its_default_leaves_the_keys_and_folders_as_they_were():
    spec = RunSpec("bayesian", "smollm2", ("mr",), 13, 1e-2, 20, init="vocab", sources=("sst2", "cola"))
    assert json.loads(spec.key()).keys().isdisjoint(RUN_FIELDS_ADDED_LATER)
    assert json.loads(dataclasses.replace(spec, source_init="vocab").key())["source_init"] == "vocab"
    for name, value in SOURCE_FIELDS_ADDED_LATER.items():
        assert {f.name: f.default for f in dataclasses.fields(SourceSpec)}[name] == value


# the cached source stages of the repository's suites, named by a digest of their fields (as computed at b02ff1a)
SOURCE_FOLDERS = {
    "full": {
        "bayesian-minilm-sst2+cola-c49b27a385cd",
        "mpt-minilm-sst2+cola-425fc93f811d",
        "prompt_tuning-minilm-sst2+cola-cfe0ab31b80a",
    },
    "smollm2": {
        "bayesian-smollm2-sst2+cola-28716893724a",
        "bayesian_likelihood_scaled-smollm2-sst2+cola-4995700c419e",
        "bayesian_replicated-smollm2-sst2+cola-fcb6084df711",
        "bayesian_replicated_equal_data-smollm2-sst2+cola-d47af2f89aea",
        "mpt-smollm2-sst2+cola-2ba5a55a9324",
        "prompt_tuning-smollm2-sst2+cola-79593fc43ea7",
    },
}


@pytest.mark.parametrize("suite", SOURCE_FOLDERS)
def test_source_stage_folders_keep_their_digests(suite):
    records = load_records(RESULTS / suite / "runs.jsonl")
    stages = {source_stage(spec) for _, spec in suite_runs(suite, records=records)} - {None}
    assert {stage.folder().name for stage in stages} == SOURCE_FOLDERS[suite]


def test_re_rendering_results_md_from_the_records_changes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(page, "REPOSITORY_RESULTS", tmp_path / "RESULTS.md")
    rendered = page.render("full", RESULTS / "full")
    assert rendered.read_text() == (ROOT / "benchmarks" / "RESULTS.md").read_text()
    assert set(SUITES) >= set(page.REPOSITORY_SUITES)
