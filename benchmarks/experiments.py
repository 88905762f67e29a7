"""One benchmark run: build a method on a real model, train it on real task data, score it.

A run is described by a `RunSpec` (method, model, target task(s), seed, learning rate, prompt length, ...), whose
JSON form is the run's key in the results file, so a killed suite continues where it stopped. Transfer methods
start from source stages (`SourceSpec`) trained once on the full training sets and kept in the cache folder.

Models are used the way users use them:

- `minilm`: sequence classification (`SEQ_CLS`); peft trains the new classifier head (`modules_to_save`) next to
  the prompt. The head always trains at `HEAD_LR`, whatever the method, so only the prompt's learning rate is swept.
  Multi-task models get one head row per (task, label) pair, and a task's prediction is the argmax over its rows.
- `smollm2`: causal LM with verbalised labels: the example is phrased with the task's template, training is the
  language-model loss on the label word, and the prediction is the label word with the highest next-token
  log-probability.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from peft import (
    MultitaskPromptTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)
from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding, PrinterCallback, Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

import peft_prompt_transfer as ppt
from benchmarks.harness import build_once
from benchmarks.models import cache_dir, load_causal_lm, load_classifier, load_tokenizer
from benchmarks.tasks import TASKS, load_split, metric

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

# which methods need what
# the Bayesian target runs: from the default (sharded) posterior with a plain prompt, from the authors' replicated
# assignment (every particle sees the same examples) at the sharded stage's compute per step and at its examples per
# step (M times the compute), from a sharded posterior with the likelihood scaled by M (each particle's mean loss
# weighs as much as the whole batch's), with the paper's decomposed target prompt, and starting from one particle
# drawn from the posterior (`target_init="particle:random"`, the paper's "prompt sampled from the posterior")
# instead of the particles' mean
BAYESIAN_METHODS = (
    "bayesian",
    "bayesian_replicated",
    "bayesian_decomposed",
    "bayesian_particle",
    "bayesian_replicated_equal_data",
    "bayesian_likelihood_scaled",
)
# a transfer method -> the kind of source stage it starts from (`SourceSpec.kind`)
SOURCE_KINDS = {
    "spot": "prompt_tuning",
    "source_average": "prompt_tuning",
    "mpt": "mpt",
    "bayesian": "bayesian",
    "bayesian_decomposed": "bayesian",
    "bayesian_particle": "bayesian",
    "bayesian_replicated": "bayesian_replicated",
    "bayesian_replicated_equal_data": "bayesian_replicated_equal_data",
    "bayesian_likelihood_scaled": "bayesian_likelihood_scaled",
}
# the posteriors the Bayesian methods start from, in the order of BAYESIAN_METHODS (the kind is also its method)
POSTERIOR_KINDS = tuple(dict.fromkeys(SOURCE_KINDS[method] for method in BAYESIAN_METHODS))
REPLICATED_KINDS = ("bayesian_replicated", "bayesian_replicated_equal_data")
TRANSFER_METHODS = ("spot", "source_average", "mpt", *BAYESIAN_METHODS)
# "compt_authors": ComPTConfig.authors_recipe, the authors' design, next to this package's defaults ("compt")
COMPT_METHODS = ("compt", "compt_authors")
MULTITASK_METHODS = (*COMPT_METHODS, "shared_prompt", "prompt_tuning")
# the ablation keeps the skip connection but drops the branch's LayerNorm, whose output starts at norm sqrt(hidden);
# the embedding-RMS variant keeps the LayerNorm but scales its output to the vocabulary's token length
RESIDUAL_METHODS = ("residual", "residual_no_layer_norm", "residual_embedding_rms")


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

    def folder(self) -> Path:
        fields = asdict(self)
        if fields["init"] == "random":  # folders built before the field existed stay the folders of their stages
            del fields["init"]
        digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
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

    def key(self) -> str:
        fields = asdict(self)
        if not fields["train_examples"]:  # keys written before these fields existed stay the keys of their runs
            del fields["train_examples"]
        if fields["source_init"] == "random":
            del fields["source_init"]
        return json.dumps(fields, sort_keys=True)

    def source_stage(self) -> Optional[SourceSpec]:
        """The source stage this run starts from, or None for a method that transfers nothing."""
        kind = SOURCE_KINDS.get(self.method)
        return self.source(kind) if kind and self.sources else None

    def source(self, kind: str) -> SourceSpec:
        batch_size = SourceSpec.batch_size
        # the same rows per step as the sharded stage: equal compute and steps ("bayesian_replicated_equal_data"
        # takes the sharded stage's examples per step instead, each seen by every particle)
        if kind == "bayesian_replicated":
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
        )


# --------------------------------------------------------------------------------------------------- models ---


@dataclass
class Backbone:
    """A model name with its tokenizer, how it encodes examples and how it predicts labels."""

    name: str
    tokenizer: object = field(repr=False)

    @classmethod
    def load(cls, name: str) -> Backbone:
        tokenizer = load_tokenizer(name)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        return cls(name, tokenizer)

    @property
    def causal(self) -> bool:
        return self.name != "minilm"

    @property
    def task_type(self) -> str:
        return "CAUSAL_LM" if self.causal else "SEQ_CLS"

    def base_model(self, num_labels: int, seed: int):
        torch.manual_seed(seed)  # the same new head for every method
        if self.causal:
            return load_causal_lm(self.name)[1]
        return load_classifier(self.name, num_labels=num_labels, seed=seed)[1]

    def label_token_ids(self, task: str) -> list[int]:
        ids = [self.tokenizer(word, add_special_tokens=False).input_ids[0] for word in TASKS[task].label_words]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{task}'s label words {TASKS[task].label_words} share a first token.")
        return ids

    def encode(self, dataset, task: str, train: bool, label_offset: int = 0):
        """Tokenise a standardised split; `label_offset` shifts class labels into a multi-task head's rows."""
        spec, limit = TASKS[task], MAX_LENGTH[self.name]
        if not self.causal:

            def encode_classification(batch):
                pairs = batch["text_pair"] if any(batch["text_pair"]) else None
                encoded = self.tokenizer(batch["text"], pairs, truncation=True, max_length=limit)
                encoded["labels"] = [label + label_offset for label in batch["label"]]
                return encoded

            return dataset.map(encode_classification, batched=True, remove_columns=dataset.column_names)
        label_ids = self.label_token_ids(task)

        def encode_causal(row):
            text = spec.template.format(text=row["text"], text_pair=row["text_pair"] or "")
            ids = self.tokenizer(text, add_special_tokens=False).input_ids[-(limit - 1) :]  # keep the question
            if not train:
                return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": row["label"]}
            return {
                "input_ids": ids + [label_ids[row["label"]]],
                "attention_mask": [1] * (len(ids) + 1),
                "labels": [-100] * len(ids) + [label_ids[row["label"]]],
            }

        return dataset.map(encode_causal, remove_columns=dataset.column_names)

    def collator(self):
        if self.causal:
            return DataCollatorForSeq2Seq(self.tokenizer, label_pad_token_id=-100)
        return DataCollatorWithPadding(self.tokenizer)

    @torch.no_grad()
    def label_scores(
        self, model, dataset, task: str, task_id: Optional[int] = None, label_offset: int = 0
    ) -> torch.Tensor:
        """Per example, one score per class: the label words' next-token log-probabilities (causal LMs) or the
        task's rows of the classifier's logits. Batched by length (causal LMs: equal lengths, so no padding)."""
        model.eval()
        lengths = [len(ids) for ids in dataset["input_ids"]]
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        batches, current = [], []
        columns = {k: dataset[k] for k in dataset.column_names if k != "labels"}
        for index in order:
            if current and (len(current) == 32 or (self.causal and lengths[index] != lengths[current[0]])):
                batches.append(current)
                current = []
            current.append(index)
        batches.append(current)
        pad = DataCollatorWithPadding(self.tokenizer)
        num_labels = TASKS[task].num_labels
        label_ids = torch.tensor(self.label_token_ids(task)) if self.causal else None
        scores = torch.empty(len(order), num_labels)
        for indices in batches:
            batch = pad([{k: values[i] for k, values in columns.items()} for i in indices])
            if task_id is not None:
                batch["task_ids"] = torch.full((len(indices),), task_id, dtype=torch.long)
            if self.causal:
                logits = model(**batch, logits_to_keep=1).logits[:, -1].float()
                scores[indices] = torch.log_softmax(logits, dim=-1)[:, label_ids]
            else:
                scores[indices] = model(**batch).logits[:, label_offset : label_offset + num_labels].float()
        return scores

    def evaluate(self, model, split, task: str, task_id: Optional[int] = None, label_offset: int = 0) -> dict:
        """Score a standardised split: the task's metric of the argmax predictions, and the mean loss of the right
        labels (causal LMs: the label word's negative log-probability, as in training; classifiers: cross-entropy
        over the task's classes), which breaks ties between learning rates chosen on a small dev set."""
        encoded = self.encode(split, task, train=False)
        scores = self.label_scores(model, encoded, task, task_id=task_id, label_offset=label_offset)
        labels = torch.tensor(split["label"])
        if not self.causal:
            scores = torch.log_softmax(scores, dim=-1)
        return {
            "metric": metric(task, labels.tolist(), scores.argmax(-1).tolist()),
            "loss": -scores.gather(1, labels[:, None]).mean().item(),
        }


# ------------------------------------------------------------------------------------------------- training ---


def _is_head(name: str) -> bool:
    return "modules_to_save" in name or name.startswith(("classifier.", "score."))


def make_optimizer(model, lr: float, method: str) -> torch.optim.Optimizer:
    """AdamW with the method's parameters at `lr` and a classification head (if any) at `HEAD_LR`."""
    if method in COMPT_METHODS:  # the same learning rates for both designs: the comparison is of the design
        return ppt.create_compt_optimizer(
            model, source_lr=lr, private_lr=lr, router_lr=COMPT_ROUTER_LR, other_lr=HEAD_LR
        )
    if method == "bayesian_decomposed":  # S at `lr`, the low-rank factors at MPT's rate
        return torch.optim.AdamW(
            ppt.bayesian_parameter_groups(model, shared_lr=lr, task_lr=DECOMPOSED_TASK_LR, other_lr=HEAD_LR)
        )
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if not _is_head(n)], "lr": lr},
        {"params": [p for n, p in named if _is_head(n)], "lr": HEAD_LR},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)


class LabelWordTrainer(Trainer):
    """The stock Trainer, with a causal-LM loss that projects onto the vocabulary only where a label word is predicted.

    A training example has one label token (its verbalised class) and -100 elsewhere, so the language-model loss is
    the mean cross-entropy at those positions. The model's own loss projects every position onto the 49k-word
    vocabulary first; keeping only the logits that predict a label (`logits_to_keep` with their indices) gives the same
    loss and gradients and saves about a quarter of a SmolLM2 training step (measured: 5.1 s -> 3.9 s on one thread
    for a batch of 8 SUBJ examples with 20 virtual tokens).
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        rows, positions = (labels != -100).nonzero(as_tuple=True)
        # counted from the end: whatever a method prepends (virtual tokens, nothing for prefix tuning), the logits
        # that predict the token at text position p sit at -(length - p + 1)
        predicting = positions - labels.shape[1] - 1
        keep = torch.unique(predicting)  # sorted, so each row's column is found by a binary search
        outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, logits_to_keep=keep)
        logits = outputs.logits[rows, torch.searchsorted(keep, predicting)]
        loss = torch.nn.functional.cross_entropy(logits.float(), labels[rows, positions])
        return (loss, outputs) if return_outputs else loss


def train(
    model,
    dataset,
    backbone: Backbone,
    optimizer,
    steps: int,
    batch_size: int,
    seed: int,
    collator=None,
    checkpoints: Optional[Path] = None,
) -> dict:
    """Train with the stock Trainer (`LabelWordTrainer` for causal LMs; linear schedule, 6% warm-up); returns the
    loss curve and the time taken.

    `collator` replaces the backbone's own (e.g. a [`ParticleReplicationCollator`] wrapping it). With `checkpoints`,
    the Trainer keeps its last checkpoint there (every twentieth of the steps) and a training killed before the end
    resumes from it, exactly, on the next call (a source stage can take longer than a sitting); the log then says
    from which step, and its time is this call's only."""
    with tempfile.TemporaryDirectory() as scratch:
        saving = (
            {"save_strategy": "no"}
            if checkpoints is None
            else {"save_strategy": "steps", "save_steps": max(1, steps // 20), "save_total_limit": 1}
        )
        args = TrainingArguments(
            output_dir=str(checkpoints or scratch),
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            warmup_steps=0.06,
            lr_scheduler_type="linear",
            logging_steps=max(1, steps // 10),
            **saving,
            report_to=[],
            disable_tqdm=True,
            use_cpu=True,
            seed=seed,
            data_seed=seed,
            remove_unused_columns=False,
        )
        trainer = (LabelWordTrainer if backbone.causal else Trainer)(
            model=model,
            args=args,
            train_dataset=dataset,
            data_collator=collator or backbone.collator(),
            optimizers=(optimizer, None),
        )
        trainer.remove_callback(PrinterCallback)  # the suite's own progress bar reports progress
        resume = get_last_checkpoint(str(checkpoints)) if checkpoints is not None and checkpoints.is_dir() else None
        start = time.perf_counter()
        trainer.train(resume_from_checkpoint=resume)
        seconds = time.perf_counter() - start
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    log = {"train_seconds": seconds, "losses": losses}
    if resume:
        log["resumed_from_step"] = int(Path(resume).name.rsplit("-", 1)[1])
    return log


def _prompt_config(backbone: Backbone, spec: RunSpec, **extra):
    init = {"prompt_tuning_init": "SAMPLE_VOCAB"} if spec.init == "vocab" else {}
    return PromptTuningConfig(task_type=backbone.task_type, num_virtual_tokens=spec.num_virtual_tokens, **init, **extra)


def _num_labels(tasks) -> int:
    return sum(TASKS[t].num_labels for t in tasks)


def _offsets(tasks) -> list[int]:
    return [sum(TASKS[t].num_labels for t in tasks[:i]) for i in range(len(tasks))]


# ---------------------------------------------------------------------------------------------- source stage ---


def _source_data(backbone: Backbone, source: SourceSpec, multitask: bool):
    """Each source's full training set, shuffled and cut to what `steps` x `batch_size` will see."""
    offsets = _offsets(source.sources) if multitask and not backbone.causal else [0] * len(source.sources)
    data = {}
    for task, offset in zip(source.sources, offsets):
        full = load_split(task, "train").shuffle(seed=source.seed)
        seen = full.select(range(min(source.steps * source.batch_size, len(full))))
        data[task] = backbone.encode(seen, task, train=True, label_offset=offset)
    return data


def ensure_source(backbone: Backbone, source: SourceSpec) -> Path:
    """Train a source stage once (kept in the cache folder; see `build_once`) and return its folder. A build killed
    mid-training resumes from its last checkpoint, kept beside the folder until the stage is built."""
    vocab_init = {"prompt_tuning_init": "SAMPLE_VOCAB"} if source.init == "vocab" else {}
    folder = source.folder()
    checkpoints = folder.with_name(f".checkpoints-{folder.name}")

    def train_source(staging: Path) -> None:
        log = {}
        if source.kind == "prompt_tuning":
            for task, data in _source_data(backbone, source, multitask=False).items():
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
                    make_optimizer(model, source.lr, "prompt_tuning"),
                    source.steps,
                    source.batch_size,
                    source.seed,
                    checkpoints=checkpoints / task,
                )
                model.save_pretrained(staging / task)
        else:
            data = ppt.combine_tasks(_source_data(backbone, source, multitask=True), sampling="equal", seed=source.seed)
            common = dict(task_type=backbone.task_type, num_virtual_tokens=source.num_virtual_tokens)
            collator = None
            if source.kind == "mpt":
                config = MultitaskPromptTuningConfig(**common, num_tasks=len(source.sources))
            else:
                replicated = source.kind in REPLICATED_KINDS
                config = ppt.BayesianPromptConfig(
                    **common,
                    **vocab_init,
                    num_particles=BAYESIAN_PARTICLES,
                    source_tasks=list(source.sources),
                    particle_assignment="replicated" if replicated else "sharded",
                    likelihood_scale=BAYESIAN_PARTICLES if source.kind == "bayesian_likelihood_scaled" else 1.0,
                )
                if replicated:
                    collator = ppt.ParticleReplicationCollator(BAYESIAN_PARTICLES, backbone.collator())
            model = get_peft_model(backbone.base_model(_num_labels(source.sources), source.seed), config)
            if source.kind == "mpt" and vocab_init:  # MPT has no such init: sampled as peft samples a prompt
                vocabulary = model.get_input_embeddings().weight
                token_ids = torch.randint(0, vocabulary.shape[0], (source.num_virtual_tokens,))
                model.prompt_encoder["default"].embedding.weight.data.copy_(vocabulary[token_ids].detach())
            log["all"] = train(
                model,
                data,
                backbone,
                make_optimizer(model, source.lr, source.kind),
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


def _source_prompts(backbone: Backbone, spec: RunSpec) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    folder = ensure_source(backbone, spec.source("prompt_tuning"))
    return {task: load_file(folder / task / "adapter_model.safetensors")["prompt_embeddings"] for task in spec.sources}


def _initial_loss(model, dataset, backbone: Backbone) -> float:
    """Mean training loss of a not yet trained model (SPoT-style choice of the source prompt)."""
    model.eval()
    collate, total = backbone.collator(), 0.0
    with torch.no_grad():
        for start in range(0, len(dataset), 16):
            rows = [dataset[i] for i in range(start, min(start + 16, len(dataset)))]
            total += model(**collate(rows)).loss.item() * len(rows)
    return total / len(dataset)


# ---------------------------------------------------------------------------------------------------- a run ---


def bayesian_target_options(spec: RunSpec) -> dict:
    """The `BayesianPromptConfig` target-stage options that tell the Bayesian transfer methods apart."""
    if spec.method not in BAYESIAN_METHODS:
        raise ValueError(f"{spec.method!r} is not a Bayesian transfer method; expected one of {BAYESIAN_METHODS}")
    options = {"target_prompt": "decomposed" if spec.method == "bayesian_decomposed" else "plain"}
    if spec.method == "bayesian_particle":
        # the particle is drawn with the run's seed, so each seed starts from its own posterior sample
        options.update(target_init="particle:random", target_init_seed=spec.seed)
    return options


def build_single_task_model(backbone: Backbone, spec: RunSpec, train_set):
    """The model for a single-task method, with any transfer initialisation applied. Returns (model, details)."""
    task = spec.tasks[0]
    base = backbone.base_model(TASKS[task].num_labels, spec.seed)
    common = dict(task_type=backbone.task_type, num_virtual_tokens=spec.num_virtual_tokens)
    details = {}
    if spec.method == "full_finetuning":
        return base, details
    if spec.method == "prompt_tuning":
        return get_peft_model(base, _prompt_config(backbone, spec)), details
    if spec.method == "p_tuning":
        return get_peft_model(
            base,
            PromptEncoderConfig(
                **common, encoder_reparameterization_type="MLP", encoder_hidden_size=RESIDUAL_BOTTLENECK
            ),
        ), details
    if spec.method in RESIDUAL_METHODS:
        init = {"prompt_tuning_init": "SAMPLE_VOCAB"} if spec.init == "vocab" else {}
        config = ppt.ResidualPromptConfig(
            **common,
            bottleneck_size=RESIDUAL_BOTTLENECK,
            layer_norm=spec.method != "residual_no_layer_norm",
            branch_scale="embedding_rms" if spec.method == "residual_embedding_rms" else "unit",
            **init,
        )
        return get_peft_model(base, config), details
    if spec.method in ("spot", "source_average"):
        prompts = _source_prompts(backbone, spec)
        model = get_peft_model(base, _prompt_config(backbone, spec))
        weight = model.prompt_encoder["default"].embedding.weight
        if spec.method == "source_average":
            weight.data.copy_(torch.stack(list(prompts.values())).mean(0))
            return model, details
        losses = {}
        for name, prompt in prompts.items():  # SPoT: the source prompt that fits the target best before training
            weight.data.copy_(prompt)
            losses[name] = _initial_loss(model, train_set, backbone)
        details["spot_source"] = min(losses, key=losses.get)
        details["spot_initial_losses"] = losses
        weight.data.copy_(prompts[details["spot_source"]])
        return model, details
    if spec.method == "mpt":
        folder = ensure_source(backbone, spec.source_stage())
        config = MultitaskPromptTuningConfig(
            **common,
            num_tasks=1,
            prompt_tuning_init="AVERAGE_SOURCE_TASKS",
            prompt_tuning_init_state_dict_path=str(folder / "adapter_model.safetensors"),
        )
        return get_peft_model(base, config), details
    if spec.method in BAYESIAN_METHODS:
        folder = ensure_source(backbone, spec.source_stage())
        config = ppt.BayesianPromptConfig(
            **common, stage="target", posterior=str(folder), **bayesian_target_options(spec)
        )
        return get_peft_model(base, config), details
    raise ValueError(f"unknown single-task method {spec.method!r}")


def training_data(task: str, spec: RunSpec):
    """The run's training split and the dev split its learning rate is chosen on (None for FewGLUE, which has none).

    k-shot: LM-BFF's train and dev files of the seed. `data="full"`: `train_examples` examples of the shuffled full
    training set, and the next `FULL_DATA_DEV_EXAMPLES` as dev; the test set is then the official dev set."""
    if spec.data == "full":
        full = load_split(task, "train").shuffle(seed=spec.seed)
        needed = spec.train_examples + FULL_DATA_DEV_EXAMPLES
        if not 0 < spec.train_examples or needed > len(full):
            raise ValueError(
                f"{task}'s training set has {len(full)} examples; train_examples={spec.train_examples} plus "
                f"{FULL_DATA_DEV_EXAMPLES} held out for dev does not fit it."
            )
        return full.select(range(spec.train_examples)), full.select(range(spec.train_examples, needed))
    if spec.data == "fewglue":
        return load_split(task, "fewglue-train"), None
    return load_split(task, "kshot-train", seed=spec.seed), load_split(task, "kshot-dev", seed=spec.seed)


def _test_set(task: str, spec: RunSpec):
    split = {"full": "dev", "fewglue": "fewglue-test"}.get(spec.data, "kshot-test")
    test = load_split(task, split, seed=spec.seed)
    if len(test) > spec.max_eval:  # the same subset for every method and seed
        test = test.shuffle(seed=0).select(range(spec.max_eval))
    return test


def score(record: dict, backbone: Backbone, model, task: str, spec: RunSpec, dev, **kwargs) -> None:
    """Record a task's test metric and, where there is a dev split, its dev metric and loss (for choosing the LR)."""
    record["metrics"][task] = backbone.evaluate(model, _test_set(task, spec), task, **kwargs)["metric"]
    if dev is not None:
        on_dev = backbone.evaluate(model, dev, task, **kwargs)
        record["dev_metrics"][task], record["dev_losses"][task] = on_dev["metric"], on_dev["loss"]


def run(spec: RunSpec, backbone: Backbone) -> dict:
    """Train and evaluate one run; returns its record (without versions and date).

    `zero_shot` (causal LMs) trains nothing: the frozen model scores the template and label words as they are."""
    if spec.method == "zero_shot" and not backbone.causal:
        raise ValueError("zero_shot needs a causal LM: a classifier's new head knows nothing untrained.")
    record = {"metrics": {}, "dev_metrics": {}, "dev_losses": {}, "details": {}}
    if spec.method in MULTITASK_METHODS and len(spec.tasks) > 1:
        multitask_run(spec, backbone, record)
    else:
        task = spec.tasks[0]
        needs_task_ids = spec.method == "mpt"
        train_split, dev = training_data(task, spec)
        train_set = backbone.encode(train_split, task, train=True)
        if needs_task_ids:
            train_set = train_set.add_column("task_ids", [0] * len(train_set))
        if spec.method == "zero_shot":
            model, result = backbone.base_model(TASKS[task].num_labels, spec.seed), {"train_seconds": 0.0, "losses": []}
        else:
            model, record["details"] = build_single_task_model(backbone, spec, train_set)
            optimizer = make_optimizer(model, spec.lr, spec.method)
            result = train(model, train_set, backbone, optimizer, spec.steps, spec.batch_size, spec.seed)
        start = time.perf_counter()
        score(record, backbone, model, task, spec, dev, task_id=0 if needs_task_ids else None)
        record.update(
            result,
            eval_seconds=time.perf_counter() - start,
            trainable_params=_trainable(model),
            inference_params=None if spec.method == "zero_shot" else _inference_params(model, spec),
        )
    record["metric"] = sum(record["metrics"].values()) / len(record["metrics"])
    if record["dev_metrics"]:
        record["dev_metric"] = sum(record["dev_metrics"].values()) / len(record["dev_metrics"])
        record["dev_loss"] = sum(record["dev_losses"].values()) / len(record["dev_losses"])
    return record


def multitask_run(spec: RunSpec, backbone: Backbone, record: dict) -> None:
    """Few-shot multi-task training: ComPT, one shared prompt, or one prompt per task (each `steps` steps)."""
    separate = spec.method == "prompt_tuning"  # an independent prompt (and head) per task
    offsets = [0] * len(spec.tasks) if backbone.causal or separate else _offsets(spec.tasks)
    splits = {task: training_data(task, spec) for task in spec.tasks}
    encoded = {
        task: backbone.encode(splits[task][0], task, train=True, label_offset=o) for task, o in zip(spec.tasks, offsets)
    }
    models, seconds, losses = {}, 0.0, []
    if separate:  # the same steps per task as the joint methods give each task
        for task, data in encoded.items():
            model = get_peft_model(
                backbone.base_model(TASKS[task].num_labels, spec.seed), _prompt_config(backbone, spec)
            )
            result = train(
                model,
                data,
                backbone,
                make_optimizer(model, spec.lr, spec.method),
                spec.steps,
                spec.batch_size,
                spec.seed,
            )
            models[task], seconds, losses = model, seconds + result["train_seconds"], losses + [result["losses"]]
        trainable = sum(_trainable(m) for m in models.values())
    else:
        mixed = ppt.combine_tasks(encoded, sampling="equal", seed=spec.seed)
        if spec.method == "compt":
            init = {"prompt_tuning_init": "SAMPLE_VOCAB"} if spec.init == "vocab" else {}
            config = ppt.ComPTConfig(
                task_type=backbone.task_type,
                num_virtual_tokens=spec.num_virtual_tokens,
                task_names=list(spec.tasks),
                num_source_prompts=len(spec.tasks),
                normalization="sparsemax",
                **init,
            )
        elif spec.method == "compt_authors":  # the authors' initialisation is part of the recipe
            config = ppt.ComPTConfig.authors_recipe(
                task_type=backbone.task_type,
                num_virtual_tokens=spec.num_virtual_tokens,
                task_names=list(spec.tasks),
                num_source_prompts=len(spec.tasks),
            )
        else:  # one prompt shared by every task
            mixed = mixed.remove_columns("task_ids")
            config = _prompt_config(backbone, spec)
        model = get_peft_model(backbone.base_model(_num_labels(spec.tasks), spec.seed), config)
        result = train(
            model,
            mixed,
            backbone,
            make_optimizer(model, spec.lr, spec.method),
            spec.steps * len(spec.tasks),
            spec.batch_size,
            spec.seed,
        )
        models = dict.fromkeys(spec.tasks, model)
        seconds, losses, trainable = result["train_seconds"], [result["losses"]], _trainable(model)
        if spec.method in COMPT_METHODS:
            record["details"]["routing_weights"] = model.prompt_encoder["default"].routing_weights().tolist()
    start = time.perf_counter()
    for index, (task, offset) in enumerate(zip(spec.tasks, offsets)):
        task_id = index if spec.method in COMPT_METHODS else None
        score(record, backbone, models[task], task, spec, splits[task][1], task_id=task_id, label_offset=offset)
    record.update(
        train_seconds=seconds, losses=losses, eval_seconds=time.perf_counter() - start, trainable_params=trainable
    )


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _inference_params(model, spec: RunSpec) -> Optional[int]:
    """Prompt parameters the saved adapter needs at inference (after folding; the head is not counted)."""
    if spec.method == "full_finetuning":
        return None
    count = math.prod(model.get_prompt_embedding_to_save("default").shape)
    if spec.method == "mpt":  # MPT also keeps its task-specific low-rank factors
        encoder = model.prompt_encoder["default"]
        count += encoder.prefix_task_cols.numel() + encoder.prefix_task_rows.numel()
    return count
