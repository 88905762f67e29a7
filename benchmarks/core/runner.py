"""One benchmark run: build a method on a real model, train it on real task data, score it.

`run` takes a `RunSpec` and returns the run's record; the method's entry in `METHODS` says how its model is built
and optimised. A run on several tasks trains one model on all of them (a method with a `joint_config`) or one model
per task.
"""

from __future__ import annotations

import time
from dataclasses import replace

from peft import get_peft_model

import peft_prompt_transfer as ppt
from benchmarks.core.backbone import Backbone
from benchmarks.core.methods import METHODS, source_stage
from benchmarks.core.sources import label_offsets, num_labels, stage_weights_digest
from benchmarks.core.specs import FULL_DATA_DEV_EXAMPLES, RunSpec
from benchmarks.core.tasks import TASKS, load_split
from benchmarks.core.training import train


def training_data(task: str, spec: RunSpec) -> tuple:
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


def evaluation_set(task: str, spec: RunSpec):
    """The run's test split: at most `max_eval` examples, the same subset for every method and seed."""
    split = {"full": "dev", "fewglue": "fewglue-test"}.get(spec.data, "kshot-test")
    test = load_split(task, split, seed=spec.seed)
    if len(test) > spec.max_eval:
        test = test.shuffle(seed=0).select(range(spec.max_eval))
    return test


def build_model(backbone: Backbone, spec: RunSpec, train_set) -> tuple:
    """The model of a run on one task, with any transfer initialisation applied. Returns (model, details); a
    transfer method's details name the build of the source stage it started from (`stage_weights_digest`)."""
    method = METHODS[spec.method]
    if method.build is None:
        raise ValueError(f"{spec.method!r} trains several tasks together; it has no single-task model")
    base = backbone.base_model(TASKS[spec.tasks[0]].num_labels, spec.seed)
    model, details = method.build(backbone, spec, base, train_set)
    stage = source_stage(spec)
    if stage is not None:
        details = {**details, "source_weights": stage_weights_digest(stage.folder())}
    return model, details


def score(record: dict, backbone: Backbone, model, task: str, spec: RunSpec, dev, **kwargs) -> None:
    """Record a task's test metric and, where there is a dev split, its dev metric and loss (for choosing the LR)."""
    record["metrics"][task] = backbone.evaluate(model, evaluation_set(task, spec), task, **kwargs)["metric"]
    if dev is not None:
        on_dev = backbone.evaluate(model, dev, task, **kwargs)
        record["dev_metrics"][task], record["dev_losses"][task] = on_dev["metric"], on_dev["loss"]


def run(spec: RunSpec, backbone: Backbone) -> dict:
    """Train and evaluate one run; returns its record (without versions and date).

    A method that does not train (`zero_shot`, causal LMs only) scores the template and label words as they are."""
    method = METHODS[spec.method]
    if not method.trains and not backbone.causal:
        raise ValueError(f"{spec.method} needs a causal LM: a classifier's new head knows nothing untrained.")
    record = {"metrics": {}, "dev_metrics": {}, "dev_losses": {}, "details": {}}
    if len(spec.tasks) > 1:
        multitask_run(spec, backbone, record)
    else:
        task = spec.tasks[0]
        train_split, dev = training_data(task, spec)
        train_set = backbone.encode(train_split, task, train=True)
        if method.task_ids:
            train_set = train_set.add_column("task_ids", [0] * len(train_set))
        model, record["details"] = build_model(backbone, spec, train_set)
        if method.trains:
            optimizer = method.optimizer(model, spec.lr)
            result = train(model, train_set, backbone, optimizer, spec.steps, spec.batch_size, spec.seed)
        else:
            result = {"train_seconds": 0.0, "losses": []}
        start = time.perf_counter()
        score(record, backbone, model, task, spec, dev, task_id=0 if method.task_ids else None)
        record.update(
            result,
            eval_seconds=time.perf_counter() - start,
            trainable_params=trainable_parameters(model),
            inference_params=method.inference_params(model),
        )
    record["metric"] = sum(record["metrics"].values()) / len(record["metrics"])
    if record["dev_metrics"]:
        record["dev_metric"] = sum(record["dev_metrics"].values()) / len(record["dev_metrics"])
        record["dev_loss"] = sum(record["dev_losses"].values()) / len(record["dev_losses"])
    return record


def multitask_run(spec: RunSpec, backbone: Backbone, record: dict) -> None:
    """Few-shot multi-task training: one model on every task (ComPT, one shared prompt) or one per task (each
    `steps` steps, the steps the joint methods give each task)."""
    method = METHODS[spec.method]
    separate = method.joint_config is None  # an independent model (and head) per task
    offsets = [0] * len(spec.tasks) if backbone.causal or separate else label_offsets(spec.tasks)
    splits = {task: training_data(task, spec) for task in spec.tasks}
    encoded = {
        task: backbone.encode(splits[task][0], task, train=True, label_offset=o) for task, o in zip(spec.tasks, offsets)
    }
    models, seconds, losses = {}, 0.0, []
    if separate:
        for task, data in encoded.items():
            model, _ = build_model(backbone, replace(spec, tasks=(task,)), data)
            optimizer = method.optimizer(model, spec.lr)
            result = train(model, data, backbone, optimizer, spec.steps, spec.batch_size, spec.seed)
            models[task], seconds, losses = model, seconds + result["train_seconds"], losses + [result["losses"]]
        trainable = sum(trainable_parameters(m) for m in models.values())
    else:
        mixed = ppt.combine_tasks(encoded, sampling="equal", seed=spec.seed)
        if not method.task_ids:
            mixed = mixed.remove_columns("task_ids")
        config = method.joint_config(backbone, spec)
        model = get_peft_model(backbone.base_model(num_labels(spec.tasks), spec.seed), config)
        optimizer = method.optimizer(model, spec.lr)
        result = train(model, mixed, backbone, optimizer, spec.steps * len(spec.tasks), spec.batch_size, spec.seed)
        models = dict.fromkeys(spec.tasks, model)
        seconds, losses, trainable = result["train_seconds"], [result["losses"]], trainable_parameters(model)
        if method.record_details:
            record["details"].update(method.record_details(model))
    start = time.perf_counter()
    for index, (task, offset) in enumerate(zip(spec.tasks, offsets)):
        task_id = index if method.task_ids else None
        score(record, backbone, models[task], task, spec, splits[task][1], task_id=task_id, label_offset=offset)
    record.update(
        train_seconds=seconds, losses=losses, eval_seconds=time.perf_counter() - start, trainable_params=trainable
    )


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
