"""Reading and writing this package's files: safetensors written whole or not at all, and a file found in a local
folder or downloaded from a Hub repo."""

from __future__ import annotations

import inspect
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any, Optional

import torch
from safetensors.torch import save_file


def _write_atomically(path: str, write: Callable[[str], None]) -> None:
    """`write(temporary_path)`, then rename the file into place: an interrupted save never leaves half a file."""
    with tempfile.NamedTemporaryFile(dir=os.path.dirname(path) or ".", suffix=".tmp", delete=False) as tmp:
        tmp_path = tmp.name
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def save_safetensors(tensors: dict[str, torch.Tensor], path: str) -> None:
    """Write `tensors` to `path` as safetensors, whole or not at all."""
    contiguous = {name: tensor.contiguous() for name, tensor in tensors.items()}
    _write_atomically(path, lambda tmp_path: save_file(contiguous, tmp_path, metadata={"format": "pt"}))


def save_json(value: Any, path: str) -> None:
    """Write `value` to `path` as indented JSON, whole or not at all."""

    def write(tmp_path: str) -> None:
        with open(tmp_path, "w", encoding="utf-8") as file:
            json.dump(value, file, indent=1)

    _write_atomically(path, write)


def hub_download_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """`options` checked against `huggingface_hub.hf_hub_download`'s keywords (`subfolder`, `token`, `cache_dir`,
    `local_files_only`, ...), as peft's `from_pretrained` forwards them; a `TypeError` names any other."""
    from huggingface_hub import hf_hub_download

    # what names the file is the caller's; `dry_run` returns no path to read
    accepted = set(inspect.signature(hf_hub_download).parameters) - {
        "repo_id",
        "filename",
        "revision",
        "repo_type",
        "dry_run",
    }
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise TypeError(
            f"Unexpected keyword argument(s) {unknown}. The Hub options are huggingface_hub.hf_hub_download's: "
            f"{sorted(accepted)} (and revision=)."
        )
    return dict(options)


def local_or_hub_file(
    location: str, filename: str, revision: Optional[str], what: str, how_to_fix: str, **hub_options: Any
) -> str:
    """The path of `filename` in the folder `location` (in its `subfolder`, if given), or downloaded from the Hub
    repo `location` at `revision`, with `hub_options` (`hub_download_options`).

    Raises `FileNotFoundError` naming `what` was sought, what was tried, and `how_to_fix`."""
    if os.path.isdir(location):
        folder = os.path.join(location, hub_options["subfolder"]) if hub_options.get("subfolder") else location
        path = os.path.join(folder, filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"The {what} directory {folder!r} has no {filename}. {how_to_fix}")
        return path
    if os.path.exists(location):
        raise FileNotFoundError(f"{location!r} is a file, not a {what} directory. {how_to_fix}")
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id=location, filename=filename, revision=revision, **hub_options)
    except Exception as exc:  # offline, unknown repo, invalid id, missing file: all mean "not found here"
        at_revision = f" at revision {revision!r}" if revision else ""
        in_subfolder = f" (subfolder {hub_options['subfolder']!r})" if hub_options.get("subfolder") else ""
        raise FileNotFoundError(
            f"Cannot find the {what} {location!r}: it is not a local directory, and downloading {filename}"
            f"{in_subfolder} from the Hugging Face Hub repo {location!r}{at_revision} failed ({type(exc).__name__}: "
            f"{exc}). {how_to_fix} (check the name, the network and HF_HUB_OFFLINE)."
        ) from exc
