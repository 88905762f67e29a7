"""The main job: residual prompt tuning vs plain prompt tuning on a real task with the real MiniLM model.

Trains both methods with the same budget on SST-2 (sampled from the full GLUE training set in ../shared/data),
evaluates on the official dev set, then shows the full life cycle of the residual adapter: save, reload with
stock `PeftModel.from_pretrained`, and export to a plain peft PROMPT_TUNING adapter, checking that the logits
match at every step.

    python -m benchmarks.demo [--data-dir ../shared/data] [--train-size 1000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from peft import PeftModel, PromptTuningConfig, get_peft_model
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

import peft_prompt_transfer
from benchmarks.core.models import load_classifier
from benchmarks.core.tasks import load_split, metric


def tokenize(dataset, tokenizer, max_length):
    def encode(batch):
        pairs = batch["text_pair"] if any(batch["text_pair"]) else None
        return tokenizer(batch["text"], pairs, truncation=True, max_length=max_length)

    return dataset.map(encode, batched=True, remove_columns=["text", "text_pair"]).rename_column("label", "labels")


def train(model, train_set, collator, args, output_dir):
    training_args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64,
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        warmup_steps=0.06,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=args.seed,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train_set, data_collator=collator)
    trainer.train()
    return trainer


def predict(trainer, model, dataset) -> np.ndarray:
    trainer.model = model
    return trainer.predict(dataset).predictions


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data-dir",
        default=None,
        help="the shared data folder (default: $PEFT_PROMPT_TRANSFER_DATA or ../shared/data)",
    )
    parser.add_argument("--train-size", type=int, default=1000)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-1)
    parser.add_argument("--num-virtual-tokens", type=int, default=10)
    parser.add_argument("--bottleneck-size", type=int, default=400)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output-dir", default=None, help="where to keep the adapters (default: a temporary folder)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    tokenizer, _ = load_classifier("minilm", num_labels=2)
    train_set = load_split("sst2", "train", root=args.data_dir).shuffle(seed=args.seed).select(range(args.train_size))
    dev_set = load_split("sst2", "dev", root=args.data_dir)
    train_set, dev_set = tokenize(train_set, tokenizer, args.max_length), tokenize(dev_set, tokenizer, args.max_length)
    collator = DataCollatorWithPadding(tokenizer)
    out = args.output_dir or tempfile.mkdtemp(prefix="ppt-demo-")
    print(f"SST-2: {len(train_set)} training examples, {len(dev_set)} dev examples; adapters in {out}")

    configs = {
        "peft PROMPT_TUNING": PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=args.num_virtual_tokens),
        "RESIDUAL_PROMPT_TUNING": peft_prompt_transfer.ResidualPromptConfig(
            task_type="SEQ_CLS", num_virtual_tokens=args.num_virtual_tokens, bottleneck_size=args.bottleneck_size
        ),
    }
    results, residual, predictions = {}, None, {}
    for name, config in configs.items():
        _, base = load_classifier("minilm", num_labels=2, seed=args.seed)
        model = get_peft_model(base, config)
        start = time.perf_counter()
        trainer = train(model, train_set, collator, args, os.path.join(out, "trainer"))
        seconds = time.perf_counter() - start
        model.eval()
        logits = predict(trainer, model, dev_set)
        predictions[name] = logits.argmax(-1)
        results[name] = {
            "accuracy": metric("sst2", dev_set["labels"], logits.argmax(-1)),
            "train_seconds": seconds,
            "trainable_params": model.get_nb_trainable_parameters()[0],
        }
        if isinstance(config, peft_prompt_transfer.ResidualPromptConfig):
            residual = (model, trainer, logits)

    model, trainer, logits = residual
    adapter_dir, export_dir = os.path.join(out, "residual-adapter"), os.path.join(out, "residual-exported")
    model.save_pretrained(adapter_dir)
    reloaded = PeftModel.from_pretrained(load_classifier("minilm", num_labels=2)[1], adapter_dir).eval()
    reloaded_logits = predict(trainer, reloaded, dev_set)
    peft_prompt_transfer.export_prompt_tuning(model, export_dir)
    exported = PeftModel.from_pretrained(load_classifier("minilm", num_labels=2)[1], export_dir).eval()
    exported_logits = predict(trainer, exported, dev_set)
    reload_diff = float(np.abs(reloaded_logits - logits).max())
    export_diff = float(np.abs(exported_logits - logits).max())

    print(
        "\nSST-2 dev accuracy, all-MiniLM-L6-v2, "
        f"{args.num_virtual_tokens} virtual tokens, {args.epochs:g} epochs on {args.train_size} examples, lr {args.lr:g}"
    )
    print(f"{'method':<26}{'accuracy':>10}{'train s':>10}{'trainable':>12}")
    for name, row in results.items():
        print(f"{name:<26}{row['accuracy']:>10.4f}{row['train_seconds']:>10.1f}{row['trainable_params']:>12,}")
    first, second = predictions.values()
    print(
        f"the two methods agree on {float((first == second).mean()):.1%} of the dev examples; "
        f"{float(first.mean()):.1%} / {float(second.mean()):.1%} predicted positive"
    )
    print(f"\nresidual adapter saved to {adapter_dir} and reloaded: max |logit diff| = {reload_diff:.2e}")
    print(f"exported to plain peft PROMPT_TUNING at {export_dir}: max |logit diff| = {export_diff:.2e}")
    if max(reload_diff, export_diff) > 1e-4:
        raise SystemExit("reloaded or exported adapter does not reproduce the trained model's logits")
    return {"results": results, "reload_diff": reload_diff, "export_diff": export_diff}


if __name__ == "__main__":
    main()
