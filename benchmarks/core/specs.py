"""What identifies a benchmark run and a source stage, and the hyperparameters every run shares.

A run is described by a `RunSpec` (method, model, target task(s), seed, learning rate, prompt length, ...), whose
JSON form is the run's key in the results file, so a killed suite continues where it stopped. Transfer methods
start from source stages (`SourceSpec`) trained once on the full training sets and kept in the cache folder, in a
folder named by a digest of the stage's fields.

Keys and folder digests are the identity of recorded evidence: `benchmarks/results/**/runs.jsonl` holds hundreds of
runs under their keys, and the cached stages live in folders named by their digests. A field added to either
dataclass after records existed must therefore be listed in `RUN_FIELDS_ADDED_LATER` or `SOURCE_FIELDS_ADDED_LATER`
with the value every earlier run had: at that value it is left out of the key, so the earlier runs keep theirs.
`tests/test_benchmark_records.py` fails for a field that is in neither the recorded keys nor these lists.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.core.models import cache_dir

HEAD_LR = 1e-3
COMPT_ROUTER_LR = 1e-1
# the source stages' prompt LR per model: MiniLM's prompts train at 1e-1, SmolLM2's best prompt LRs are 1e-2
SOURCE_LR = {"minilm": 1e-1, "smollm2": 1e-2}
# the low-rank factors of the decomposed Bayesian target (MPT's, whose decomposition the paper uses: 1e-4)
DECOMPOSED_TASK_LR = 1e-4
# data="full": examples held out of the training set (after the training examples) to choose the learning rate
FULL_DATA_DEV_EXAMPLES = 200
MAX_LENGTH = {"minilm": 128, "smollm2": 160}
RESIDUAL_BOTTLENECK = 400
BAYESIAN_PARTICLES = 4

# fields added after runs were recorded -> the value every earlier run had, at which the key leaves the field out
RUN_FIELDS_ADDED_LATER: dict[str, Any] = {
    "train_examples": 0,
    "source_init": "random",
    "held_out": (),
    "init_source": "",
    "source_data_version": 1,
}
SOURCE_FIELDS_ADDED_LATER: dict[str, Any] = {"init": "random", "held_out": (), "data_version": 1}
# the oracle of the library suite fine-tunes each source prompt on the target at one learning rate, the source
# stages' own (`SOURCE_LR`), the middle of the prompt sweep
ORACLE_LR = 1e-2


@dataclass(frozen=True)
class PosteriorStage:
    """How a Bayesian source stage trains its SVGD particles (`BayesianPromptConfig`'s source-stage options)."""

    particle_assignment: str = "sharded"
    likelihood_scale: float = 1.0
    # replicated particles at the sharded stage's compute per step: each particle sees batch_size / particles rows
    equal_compute: bool = False


# the posteriors (source-stage kinds) the Bayesian methods start from: the default sharded one, the authors'
# replicated assignment at the sharded stage's compute per step and at its examples per step (M times the compute),
# and a sharded one with the likelihood scaled by M (each particle's mean loss weighs as much as the whole batch's)
POSTERIORS = {
    "bayesian": PosteriorStage(),
    "bayesian_replicated": PosteriorStage("replicated", equal_compute=True),
    "bayesian_replicated_equal_data": PosteriorStage("replicated"),
    "bayesian_likelihood_scaled": PosteriorStage(likelihood_scale=BAYESIAN_PARTICLES),
}
POSTERIOR_KINDS = tuple(POSTERIORS)


def identity(fields: dict[str, Any], added_later: dict[str, Any]) -> str:
    """The JSON identity of a spec's `fields`, without the fields added later that still have their earlier value."""
    kept = {name: value for name, value in fields.items() if name not in added_later or value != added_later[name]}
    return json.dumps(kept, sort_keys=True)


@dataclass(frozen=True)
class SourceSpec:
    """A source stage: prompts trained once on full training sets, reused by every target run."""

    kind: str  # "prompt_tuning" (one prompt per source task), "mpt" or one of POSTERIOR_KINDS
    model: str
    sources: tuple[str, ...]
    num_virtual_tokens: int
    steps: int = 300  # per source task
    batch_size: int = 16  # examples per step; "bayesian_replicated" sees batch_size / particles, each particle all
    lr: float = 1e-1
    seed: int = 0
    init: str = "random"  # the prompts' initialisation: "random" (peft's default, N(0, 1)) or "vocab"
    # the target tasks whose test and dev texts (and pieces of them) the sources' training sets leave out, and whose
    # k-shot-only sources pool their k-shot files (`benchmarks.core.library_data`); () reads the training sets whole
    held_out: tuple[str, ...] = ()
    # with `held_out`: the version of the rows the sources keep (`benchmarks.core.library_data.SOURCE_DATA_VERSION`)
    data_version: int = 1

    def folder(self) -> Path:
        digest = hashlib.sha1(identity(asdict(self), SOURCE_FIELDS_ADDED_LATER).encode()).hexdigest()[:12]
        return cache_dir() / "benchmark-sources" / f"{self.kind}-{self.model}-{'+'.join(self.sources)}-{digest}"


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines one benchmark run; `key()` identifies it in the results file."""

    method: str
    model: str
    tasks: tuple[str, ...]  # the target task, or the tasks trained together
    seed: int  # the k-shot split's seed and the training seed
    lr: float
    num_virtual_tokens: int
    init: str = "random"  # the prompt's initialisation: "random" or "vocab" (sampled vocabulary embeddings)
    steps: int = 100  # optimizer steps per task
    batch_size: int = 8
    data: str = "kshot"  # "kshot" (LM-BFF 16-shot), "fewglue" or "full" (a part of the full training set)
    sources: tuple[str, ...] = ()
    source_steps: int = 300
    max_eval: int = 500  # test examples scored per task (a fixed random subset of bigger test sets)
    train_examples: int = 0  # data="full": the training examples taken from the shuffled training set
    source_init: str = "random"  # the source stages' prompt initialisation (`SourceSpec.init`)
    held_out: tuple[str, ...] = ()  # the source stages' held-out targets (`SourceSpec.held_out`)
    init_source: str = ""  # the library oracle: the one source whose prompt this run fine-tunes
    source_data_version: int = 1  # the source stages' `SourceSpec.data_version`

    def key(self) -> str:
        return identity(asdict(self), RUN_FIELDS_ADDED_LATER)

    def source(self, kind: str) -> SourceSpec:
        """The source stage of `kind` (`SourceSpec.kind`) on this run's model, sources and prompt length."""
        batch_size = SourceSpec.batch_size
        posterior = POSTERIORS.get(kind)
        if posterior and posterior.equal_compute:
            batch_size //= BAYESIAN_PARTICLES
        return SourceSpec(
            kind,
            self.model,
            self.sources,
            self.num_virtual_tokens,
            steps=self.source_steps,
            batch_size=batch_size,
            lr=SOURCE_LR[self.model],
            init=self.source_init,
            held_out=self.held_out,
            data_version=self.source_data_version,
        )
