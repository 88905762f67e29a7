"""Source stages: prompts trained once on the sources' full training sets, kept in the cache folder and reused by
every target run that transfers from them (`SourceSpec` says which stage, `ensure_source` builds it once)."""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from peft import MultitaskPromptTuningConfig, PromptTuningConfig, get_peft_model

import peft_prompt_transfer as ppt
from benchmarks.core.backbone import Backbone
from benchmarks.core.harness import build_once
from benchmarks.core.library_data import source_training_set
from benchmarks.core.specs import BAYESIAN_PARTICLES, POSTERIORS, RunSpec, SourceSpec
from benchmarks.core.tasks import TASKS, load_split
from benchmarks.core.training import prompt_and_head_optimizer, train


def num_labels(tasks: tuple[str, ...]) -> int:
    """The rows of a multi-task classification head: one per (task, label) pair."""
    return sum(TASKS[t].num_labels for t in tasks)


def label_offsets(tasks: tuple[str, ...]) -> list[int]:
    """Where each task's rows start in a multi-task classification head."""
    return [sum(TASKS[t].num_labels for t in tasks[:i]) for i in range(len(tasks))]


def source_data(backbone: Backbone, source: SourceSpec, multitask: bool) -> dict:
    """Each source's training set, shuffled and cut to what `steps` x `batch_size` will see: its full training set,
    or with `held_out` targets, the set `benchmarks.core.library_data.source_training_set` leaves them."""
    offsets = label_offsets(source.sources) if multitask and not backbone.causal else [0] * len(source.sources)
    data = {}
    for task, offset in zip(source.sources, offsets):
        if source.held_out:
            full = source_training_set(task, source.held_out)[0].shuffle(seed=source.seed)
        else:
            full = load_split(task, "train").shuffle(seed=source.seed)
        seen = full.select(range(min(source.steps * source.batch_size, len(full))))
        data[task] = backbone.encode(seen, task, train=True, label_offset=offset)
    return data


def stage_weights_digest(folder: Path) -> str:
    """A digest of a built source stage's weights (every `*.safetensors` file under `folder`, with its path).

    A stage's folder is named by its spec, so a stage trained again (after a lost cache) keeps the name, yet its
    weights can differ from the first build's (SVGD compounds float rounding over its steps): a run records this
    digest to say which build it started from."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.safetensors")):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def ensure_source(backbone: Backbone, source: SourceSpec) -> Path:
    """Train a source stage once (kept in the cache folder; see `build_once`) and return its folder. A build killed
    mid-training resumes from its last checkpoint, kept beside the folder until the stage is built."""
    vocab_init = {"prompt_tuning_init": "SAMPLE_VOCAB"} if source.init == "vocab" else {}
    folder = source.folder()
    checkpoints = folder.with_name(f".checkpoints-{folder.name}")

    def train_source(staging: Path) -> None:
        log = {}
        if source.kind == "prompt_tuning":
            for task, data in source_data(backbone, source, multitask=False).items():
                model = get_peft_model(
                    backbone.base_model(TASKS[task].num_labels, source.seed),
                    PromptTuningConfig(
                        task_type=backbone.task_type, num_virtual_tokens=source.num_virtual_tokens, **vocab_init
                    ),
                )
                log[task] = train(
                    model,
                    data,
                    backbone,
                    prompt_and_head_optimizer(model, source.lr),
                    source.steps,
                    source.batch_size,
                    source.seed,
                    checkpoints=checkpoints / task,
                )
                model.save_pretrained(staging / task)
        else:
            data = ppt.combine_tasks(source_data(backbone, source, multitask=True), sampling="equal", seed=source.seed)
            common = dict(task_type=backbone.task_type, num_virtual_tokens=source.num_virtual_tokens)
            collator = None
            if source.kind == "mpt":
                config = MultitaskPromptTuningConfig(**common, num_tasks=len(source.sources))
            else:
                posterior = POSTERIORS[source.kind]
                config = ppt.BayesianPromptConfig(
                    **common,
                    **vocab_init,
                    num_particles=BAYESIAN_PARTICLES,
                    source_tasks=list(source.sources),
                    particle_assignment=posterior.particle_assignment,
                    likelihood_scale=posterior.likelihood_scale,
                )
                if posterior.particle_assignment == "replicated":
                    collator = ppt.ParticleReplicationCollator(BAYESIAN_PARTICLES, backbone.collator())
            model = get_peft_model(backbone.base_model(num_labels(source.sources), source.seed), config)
            if source.kind == "mpt" and vocab_init:  # MPT has no such init: sampled as peft samples a prompt
                vocabulary = model.get_input_embeddings().weight
                token_ids = torch.randint(0, vocabulary.shape[0], (source.num_virtual_tokens,))
                model.prompt_encoder["default"].embedding.weight.data.copy_(vocabulary[token_ids].detach())
            log["all"] = train(
                model,
                data,
                backbone,
                prompt_and_head_optimizer(model, source.lr),
                source.steps * len(source.sources),
                source.batch_size,
                source.seed,
                collator=collator,
                checkpoints=checkpoints / "all",
            )
            model.save_pretrained(staging)
        (staging / "done.json").write_text(json.dumps({"spec": asdict(source), "log": log}, indent=1))

    build_once(folder, train_source)
    shutil.rmtree(checkpoints, ignore_errors=True)
    return folder


def source_prompts(backbone: Backbone, spec: RunSpec) -> dict[str, torch.Tensor]:
    """The prompt tuning source stage's prompts for `spec`'s sources (built first if it is not cached)."""
    from safetensors.torch import load_file

    folder = ensure_source(backbone, spec.source("prompt_tuning"))
    return {task: load_file(folder / task / "adapter_model.safetensors")["prompt_embeddings"] for task in spec.sources}


def particle_spread(particles: torch.Tensor) -> float:
    """A posterior's spread: the mean pairwise distance between its particles over their mean norm."""
    flat = particles.flatten(1)
    distances = [(a - b).norm().item() for a, b in itertools.combinations(flat, 2)]
    return sum(distances) / len(distances) / flat.norm(dim=1).mean().item()
