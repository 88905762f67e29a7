"""Reading and writing this package's files: safetensors written whole or not at all, and a file found in a local
folder or downloaded from a Hub repo."""

from __future__ import annotations

import os
import tempfile
from typing import Optional

import torch
from safetensors.torch import save_file


def save_safetensors(tensors: dict[str, torch.Tensor], path: str) -> None:
    """Write `tensors` to `path` through a temporary file renamed into place, so an interrupted save never leaves
    half a file."""
    with tempfile.NamedTemporaryFile(dir=os.path.dirname(path) or ".", suffix=".tmp", delete=False) as tmp:
        tmp_path = tmp.name
    try:
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, tmp_path, metadata={"format": "pt"})
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def local_or_hub_file(location: str, filename: str, revision: Optional[str], what: str, how_to_fix: str) -> str:
    """The path of `filename` in the folder `location`, or downloaded from the Hub repo `location` at `revision`.

    Raises `FileNotFoundError` naming `what` was sought, what was tried, and `how_to_fix`."""
    if os.path.isdir(location):
        path = os.path.join(location, filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"The {what} directory {location!r} has no {filename}. {how_to_fix}")
        return path
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id=location, filename=filename, revision=revision)
    except Exception as exc:  # offline, unknown repo, invalid id, missing file: all mean "not found here"
        at_revision = f" at revision {revision!r}" if revision else ""
        raise FileNotFoundError(
            f"Cannot find the {what} {location!r}: it is not a local directory, and downloading {filename} from "
            f"the Hugging Face Hub repo {location!r}{at_revision} failed ({type(exc).__name__}: {exc}). {how_to_fix} "
            "(check the name, the network and HF_HUB_OFFLINE)."
        ) from exc
