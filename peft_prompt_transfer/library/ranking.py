"""Scoring prompts on a new task's examples: the frozen model's loss on the labels with each prompt in front.

This is SPoT's choice of a source prompt without training (the lowest loss before the first step). Scoring N
prompts on K examples costs N·K forward passes of the examples:

- On a decoder-only model that can share a prompt's keys and values (the shared-prefix rule,
  docs/guides/shared-prefix.md), each prompt runs through the model once, alone, and every batch of examples runs
  after its keys and values, so no batch runs the prompt's positions again; only the positions that predict a
  label token get logits (the vocabulary-sized projection is a fifth of SmolLM2-135M's forward per position). The
  loss is the one the concatenated forward gives, to float rounding.
- Otherwise (seq2seq models, and decoders whose cache or rope scaling cannot be shared) the prompt goes in front of
  every example through this package's own forward: a residual adapter in inference mode holds nothing but a fixed
  prompt, so a scorer is one such adapter over the model's base model, its prompt replaced by each candidate in turn.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from peft import PeftModelForCausalLM, PeftModelForSeq2SeqLM
from tqdm.auto import tqdm

from .._compat import enum_value
from ..base import unsharded_around
from ..prompt_kv import forward_after_prompt, prompt_cache, why_architecture_cannot_share
from ..residual import ResidualPromptConfig
from .fingerprint import base_model_of

SCORER_ADAPTER = "prompt_library_scorer"
SCORED_TASK_TYPES = {"CAUSAL_LM": PeftModelForCausalLM, "SEQ_2_SEQ_LM": PeftModelForSeq2SeqLM}


def task_type_of(model: torch.nn.Module) -> str:
    """`CAUSAL_LM` or `SEQ_2_SEQ_LM` for a language model (or a `PeftModel` around one); a clear error otherwise."""
    peft_config = getattr(model, "peft_config", None)
    base = base_model_of(model)
    if isinstance(peft_config, Mapping) and getattr(model, "active_adapter", None) in peft_config:
        task_type = enum_value(peft_config[model.active_adapter].task_type)
    elif base.can_generate():
        task_type = "SEQ_2_SEQ_LM" if getattr(base.config, "is_encoder_decoder", False) else "CAUSAL_LM"
    else:
        task_type = type(base).__name__
    if task_type not in SCORED_TASK_TYPES:
        raise ValueError(
            f"rank scores a prompt by the frozen model's loss on the labels, which needs a causal or seq2seq language "
            f"model; this one is a {task_type} model. A classifier's head is new, so its loss before training says "
            "nothing about how well a source prompt fits. For a classifier on a decoder-only model (Llama, Qwen, "
            "SmolLM2, ...), rank with the causal LM of the same checkpoint (AutoModelForCausalLM) and the task phrased "
            "as text (a template and label words), then initialize the classifier's prompt from the winner. Encoder "
            "models (BERT, RoBERTa: a masked LM is not scored either) cannot be ranked: initialize their prompt from "
            "an entry you choose."
        )
    return task_type


def _as_list(value: Any) -> Any:
    """A tensor or a numpy array as nested lists, any other sequence (a range, ...) as a list; anything else as is."""
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        return value.tolist()
    if isinstance(value, Sequence) and not isinstance(value, (str, list, tuple)):
        return list(value)
    return value


def _token_ids(value: Any, key: str, index: int) -> list[int]:
    """One example's `key` as a list of ints: from a list, a tensor or a numpy array, also of shape `[1, L]` (a
    tokenizer called with `return_tensors=`); a clear error for a class index, text, a batch or values that are not
    token ids."""
    value = _as_list(value)
    if isinstance(value, (list, tuple)) and len(value) == 1:
        inner = _as_list(value[0])
        if isinstance(inner, (list, tuple)):
            value = inner  # [1, L]: one example with a batch dimension
    if isinstance(value, str):
        raise ValueError(
            f"Example {index} has {key}={value!r}, text; rank takes tokenized examples: tokenize it, as the Trainer "
            "takes it (input_ids, attention_mask and labels: the label tokens, -100 elsewhere)."
        )
    if key == "labels" and not isinstance(value, (list, tuple)):
        raise ValueError(
            f"Example {index} has labels={value!r}, a class index; rank needs the label tokens (a list of token ids, "
            "-100 where nothing is scored), as a language model is trained on them."
        )
    if isinstance(value, (list, tuple)):
        value = [_as_list(v) for v in value]  # numpy or 0-d torch scalars as Python numbers
    if not isinstance(value, list) or any(isinstance(v, (list, tuple)) for v in value):
        raise ValueError(
            f"Example {index} has {key}={value!r}; rank takes one example per row, its {key} a list of token ids (a "
            "1-D tensor or array, or [1, L]). Pass a batch's rows one by one."
        )
    if key == "attention_mask":
        wrong = next((v for v in value if v not in (0, 1)), None)  # True, 1.0 and tensors' 1 are 1
        if wrong is not None:
            raise ValueError(
                f"Example {index} has an attention_mask holding {wrong!r}; a mask is 1 for a token the model attends "
                "to and 0 for padding. Pass the attention_mask the tokenizer returned."
            )
        return [int(v) for v in value]
    wrong = next((v for v in value if not isinstance(v, int) or isinstance(v, bool)), None)
    if wrong is not None:
        raise ValueError(f"Example {index} has {key} holding {wrong!r}, which is not a token id (an integer).")
    return value


def _rows(examples: Any, causal: bool) -> list[dict[str, list[int]]]:
    """The examples as lists of token ids, checked: `input_ids` and `labels` (and optionally `attention_mask`)."""
    rows = []
    for index, example in enumerate(examples):
        if not isinstance(example, Mapping) or example.get("input_ids") is None or example.get("labels") is None:
            found = (
                sorted(key for key, value in example.items() if value is not None)
                if isinstance(example, Mapping)
                else type(example).__name__
            )
            raise ValueError(
                f"Example {index} has no input_ids and labels (found {found}). rank takes tokenized examples as the "
                "Trainer does: input_ids, attention_mask and labels (the tokens to score, -100 elsewhere)."
            )
        row = {
            key: _token_ids(example[key], key, index)
            for key in ("input_ids", "attention_mask", "labels")
            if example.get(key) is not None
        }
        if "attention_mask" in row and len(row["attention_mask"]) != len(row["input_ids"]):
            raise ValueError(
                f"Example {index} has {len(row['input_ids'])} input_ids but an attention_mask of "
                f"{len(row['attention_mask'])}; they go together, one mask value per token."
            )
        if not any(label != -100 for label in row["labels"]):
            raise ValueError(f"Example {index} has no label token to score (every label is -100).")
        if causal and len(row["labels"]) != len(row["input_ids"]):
            raise ValueError(
                f"Example {index} has {len(row['input_ids'])} input_ids but {len(row['labels'])} labels; a causal LM's "
                "labels are aligned with its input_ids (the tokens to score, -100 elsewhere)."
            )
        rows.append(row)
    if not rows:
        raise ValueError("rank needs at least one example.")
    return rows


def _batches(rows: list[dict], batch_size: int, pad_token_id: int) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of examples of similar length (padding: masked inputs, labels -100)."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    batches = []
    for start in range(0, len(order), batch_size):
        chosen = [rows[i] for i in order[start : start + batch_size]]
        width = max(len(row["input_ids"]) for row in chosen)
        label_width = max(len(row["labels"]) for row in chosen)
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for row in chosen:
            pad = width - len(row["input_ids"])
            batch["input_ids"].append(row["input_ids"] + [pad_token_id] * pad)
            batch["attention_mask"].append(row.get("attention_mask", [1] * len(row["input_ids"])) + [0] * pad)
            batch["labels"].append(row["labels"] + [-100] * (label_width - len(row["labels"])))
        batches.append({key: torch.tensor(value) for key, value in batch.items()})
    return batches


class PromptScorer:
    """Scores fixed prompts `[num_virtual_tokens, token_dim]` on tokenized examples: the mean negative
    log-likelihood per label token with the prompt in front of every example, the model frozen and in eval mode.

    A decoder-only model that can share a prompt's keys and values runs its base model directly (see the module's
    docstring); any other model's base model is wrapped in a second `PeftModel` (prompt-learning adapters change
    nothing in the base model). It restores the base model's training mode and `requires_grad` flags afterwards,
    and keeps a model's own adapters untouched."""

    def __init__(self, model: torch.nn.Module, examples: Any, batch_size: int = 8):
        self.task_type = task_type_of(model)
        self.model = model
        self.base = base_model_of(model)
        pad = getattr(self.base.config, "pad_token_id", None)
        rows = _rows(examples, causal=self.task_type == "CAUSAL_LM")
        self.batches = _batches(rows, batch_size, pad if isinstance(pad, int) else 0)
        self._scorers: dict[int, torch.nn.Module] = {}

    def _scorer(self, num_virtual_tokens: int) -> torch.nn.Module:
        if num_virtual_tokens not in self._scorers:
            config = ResidualPromptConfig(
                task_type=self.task_type, num_virtual_tokens=num_virtual_tokens, inference_mode=True
            )
            # under gradient checkpointing peft's constructor hooks the input embeddings to require gradients; the
            # user's model has its own such hook, and the scorer needs none
            embeddings = self.base.get_input_embeddings()
            hooks, require_grads_hook = set(embeddings._forward_hooks), getattr(self.base, "_require_grads_hook", None)
            with warnings.catch_warnings():  # peft reads transformers' deprecated `is_gradient_checkpointing`
                warnings.simplefilter("ignore", FutureWarning)
                self._scorers[num_virtual_tokens] = SCORED_TASK_TYPES[self.task_type](
                    self.base, config, adapter_name=SCORER_ADAPTER
                )
            for key in set(embeddings._forward_hooks) - hooks:
                del embeddings._forward_hooks[key]
            if require_grads_hook is not None:
                self.base._require_grads_hook = require_grads_hook
        return self._scorers[num_virtual_tokens]

    def score_all(self, prompts: Mapping[str, torch.Tensor], progress: bool = True) -> dict[str, float]:
        """The score of each prompt (lower fits better), with a progress bar over prompts x batches."""
        flags = {name: p.requires_grad for name, p in self.base.named_parameters()}
        modes = {name: module.training for name, module in self.base.named_modules()}
        try:
            with (
                unsharded_around(self.model, self.base),  # under FSDP2 the scorer runs the base model outside its root
                tqdm(total=len(prompts) * len(self.batches), desc="ranking prompts", disable=not progress) as bar,
            ):
                return {name: self._score(prompt, bar) for name, prompt in prompts.items()}
        finally:
            for name, parameter in self.base.named_parameters():
                parameter.requires_grad_(flags[name])
            for name, module in self.base.named_modules():
                module.training = modes[name]

    @torch.no_grad()
    def _score(self, prompt: torch.Tensor, bar: tqdm) -> float:
        if self.task_type == "CAUSAL_LM" and why_architecture_cannot_share(self.base) is None:
            return self._score_after_prompt(prompt, bar)
        scorer = self._scorer(prompt.shape[0]).eval()
        weight = scorer.prompt_encoder[SCORER_ADAPTER].embedding.weight
        weight.copy_(prompt.to(device=weight.device, dtype=weight.dtype))
        device = weight.device
        total, count = 0.0, 0
        for batch in self.batches:
            batch = {key: value.to(device) for key, value in batch.items()}
            labels = batch.pop("labels")
            if self.task_type == "CAUSAL_LM":
                logits = scorer(**batch).logits[:, prompt.shape[0] - 1 : -1]  # position t predicts token t
            else:
                logits = scorer(**batch, labels=labels).logits
            scored = labels != -100  # only the label positions go to float32, not the whole vocabulary everywhere
            total += torch.nn.functional.cross_entropy(logits[scored].float(), labels[scored], reduction="sum").item()
            count += int(scored.sum())
            bar.update()
        return total / count

    def _score_after_prompt(self, prompt: torch.Tensor, bar: tqdm) -> float:
        """`_score` on a decoder-only model: the prompt's keys and values computed once, every batch run after them,
        and logits only where a label token is predicted (position t predicts token t+1; the prompt's last position
        predicts token 0). The frozen base model runs alone, in eval mode (`score_all` restores its modes)."""
        self.base.eval()
        weight = self.base.get_input_embeddings().weight
        cache, first_logits = prompt_cache(self.base, prompt.to(device=weight.device, dtype=weight.dtype))
        total, count = 0.0, 0
        for batch in self.batches:
            batch = {key: value.to(weight.device) for key, value in batch.items()}
            labels = batch.pop("labels")
            scored = labels != -100
            logits, targets = [], []
            positions = scored[:, 1:].any(dim=0).nonzero().flatten()
            if positions.numel():
                kept = forward_after_prompt(self.base, cache, **batch, logits_to_keep=positions).logits
                predicted = scored[:, positions + 1]
                logits.append(kept[predicted])
                targets.append(labels[:, positions + 1][predicted])
            first = scored[:, 0]
            if first.any():
                logits.append(first_logits.expand(int(first.sum()), -1))
                targets.append(labels[first, 0])
            logits = torch.cat(logits).float()
            total += torch.nn.functional.cross_entropy(logits, torch.cat(targets), reduction="sum").item()
            count += int(scored.sum())
            bar.update()
        return total / count
