"""The models a benchmark runs on, used the way users use them.

- `minilm`: sequence classification (`SEQ_CLS`); peft trains the new classifier head (`modules_to_save`) next to
  the prompt. The head always trains at `HEAD_LR`, whatever the method, so only the prompt's learning rate is swept.
  Multi-task models get one head row per (task, label) pair, and a task's prediction is the argmax over its rows.
- `smollm2`: causal LM with verbalised labels: the example is phrased with the task's template, training is the
  language-model loss on the label word, and the prediction is the label word with the highest next-token
  log-probability.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

from benchmarks.core.models import load_causal_lm, load_classifier, load_tokenizer
from benchmarks.core.specs import MAX_LENGTH
from benchmarks.core.tasks import TASKS, metric


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
