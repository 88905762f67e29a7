"""`PromptLibrary`: a named collection of source prompts for one base model, ranked for a new task and used to
start any method's prompt."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData
from peft import PeftModel
from safetensors import SafetensorError
from safetensors.torch import load_file

from .._compat import PACKAGE_NAME
from .._version import __version__
from ..bayesian.config import BayesianPromptConfig
from ..bayesian.posterior import ADAPTER_WEIGHTS_NAME, PARTICLES_KEY
from ..files import hub_download_options, local_or_hub_file, save_json, save_safetensors
from .fingerprint import base_model_of, check_base_model, describe_base_model, same_base_model
from .initialization import fit_length, mean_prompt, one_prompt_per_entry, prompt_length, warn_on_length, write_prompts
from .ranking import PromptScorer
from .reading import NamedPrompt, current_prompt, live_adapter_prompts, saved_adapter_prompts

LIBRARY_CONFIG_NAME = "prompt_library.json"
LIBRARY_WEIGHTS_NAME = "prompt_library.safetensors"
LIBRARY_FORMAT = "peft-prompt-transfer prompt library"
LIBRARY_FORMAT_VERSION = 1
# what an entry records beside its prompt, length, task type and origin
ENTRY_METADATA = ("template", "label_words")
# the name `rank` gives the model's own prompt: starting without transfer is a candidate too
CURRENT_PROMPT = "<current prompt>"
AdapterSource = Union[str, os.PathLike, PeftModel]


@dataclass
class LibraryEntry:
    """One prompt of a library and what is known about it.

    Attributes:
        name (`str`): Its name in the library (`name/task` for a ComPT task, `name/particle-i` for a particle).
        prompt (`torch.Tensor`): `[num_virtual_tokens, token_dim]`, float32.
        task_type (`str`, *optional*): The task type of the adapter it came from (`CAUSAL_LM`, ...).
        origin (`dict`): Where it came from: `peft_type`, `source` (a folder, Hub repo id or live adapter) and, where
            they apply, `task`, `particle` and `revision`.
        template (`str`, *optional*): The template the examples were phrased with, where known.
        label_words (`list[str]`, *optional*): The label words, where known.
    """

    name: str
    prompt: torch.Tensor
    task_type: Optional[str] = None
    origin: dict[str, Any] = field(default_factory=dict)
    template: Optional[str] = None
    label_words: Optional[list[str]] = None

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt.shape[0]

    def metadata(self) -> dict[str, Any]:
        """Everything but the prompt, as `prompt_library.json` stores it."""
        return {
            "name": self.name,
            "num_virtual_tokens": self.num_virtual_tokens,
            "task_type": self.task_type,
            "origin": self.origin,
            "template": self.template,
            "label_words": self.label_words,
        }


class PromptLibrary:
    """
    A named collection of source prompts for one base model: rank them for a new task, and start any method's prompt
    from the best.

    Build one from trained adapters with [`PromptLibrary.from_adapters`], rank its entries on a few examples of a new
    task with [`~PromptLibrary.rank`] (the frozen model's loss with each prompt, SPoT's choice without training; the
    model's own prompt is ranked too, so you learn when no source beats starting fresh), and copy the winner into a
    model with [`~PromptLibrary.initialize`]. A library saves to one folder (safetensors and JSON) and loads from a
    folder or the Hub.

    The library records the base model it was made for (name, embedding shape and a fingerprint of its input
    embeddings): a model whose embeddings have another size is refused, and another vocabulary or checkpoint warns.

    Args:
        base_model (`torch.nn.Module`): The model (or `PeftModel`) the prompts were trained on.

    Example:

    ```py
    >>> from peft_prompt_transfer import PromptLibrary
    >>> library = PromptLibrary.from_adapters(base_model, {"sst2": "prompts/sst2", "mnli": "org/mnli-prompt"})
    >>> library.rank(model, train_examples)[:3]
    [('sst2', 0.412), ('<current prompt>', 1.873), ('mnli', 2.105)]
    >>> library.initialize(model, "sst2")
    ```
    """

    def __init__(self, base_model: Union[torch.nn.Module, Mapping[str, Any]]):
        self.base_model_record = (
            dict(base_model) if isinstance(base_model, Mapping) else describe_base_model(base_model)
        )
        self._entries: dict[str, LibraryEntry] = {}

    # -- building -------------------------------------------------------------------------------

    @classmethod
    def from_adapters(
        cls,
        base_model: torch.nn.Module,
        adapters: Mapping[str, AdapterSource],
        metadata: Optional[Mapping[str, Mapping[str, Any]]] = None,
        revision: Optional[str] = None,
        **hub_options: Any,
    ) -> PromptLibrary:
        """A library of the prompts of `adapters`, for `base_model`.

        Args:
            base_model (`torch.nn.Module`): The base model the adapters were trained on. It is not changed.
            adapters (`dict`): name -> a folder that `save_pretrained` or `export_prompt_tuning` wrote, a Hub repo
                id, or a `PeftModel` (its active adapter, as it is now). peft `PROMPT_TUNING` adapters give their
                prompt; residual its folded prompt; ComPT one entry per task, `name/task`; a Bayesian source one per
                particle, `name/particle-i`; a Bayesian target its prompt.
            metadata (`dict`, *optional*): an adapter's or an entry's name (`name/task`) -> `{"template": ...,
                "label_words": [...]}`, recorded with the entries that name gives (an entry's own over its adapter's).
            revision (`str`, *optional*): The Hub revision of every repo id in `adapters`.
            hub_options: Passed to `huggingface_hub.hf_hub_download` for every saved adapter, as peft's
                `from_pretrained` passes them: `subfolder` (also in a local folder), `token`, `cache_dir`,
                `local_files_only`, ...

        A live `PeftModel` whose base model is not `base_model` (another embedding size, vocabulary or fingerprint)
        warns: its prompts were trained for another model. A saved adapter records no more than its base model's name
        (and, for this package's adapters, its vocabulary size, which is checked), so pass the base model the saved
        adapters were trained on.
        """
        hub_options = hub_download_options(hub_options)
        library = cls(base_model)
        metadata = {name: dict(fields) for name, fields in (metadata or {}).items()}
        for name, fields in metadata.items():
            unknown = set(fields) - set(ENTRY_METADATA)
            if unknown:
                raise ValueError(
                    f"metadata[{name!r}] has {sorted(unknown)}; an entry records {list(ENTRY_METADATA)} (the prompt "
                    "length, task type and origin are read from the adapter)."
                )
        word_embeddings = base_model_of(base_model).get_input_embeddings()
        made_for = library.base_model_record.get("name_or_path")
        for name, source in adapters.items():
            if isinstance(source, PeftModel) and not same_base_model(library.base_model_record, source):
                warnings.warn(
                    f"Adapter {name!r} is live on a model whose input embeddings are not those of base_model "
                    f"({made_for!r}): its prompts were trained for that other model, and would be recorded as prompts "
                    "for this one. Pass the base model the adapters were trained on.",
                    stacklevel=2,
                )
            prompts: Iterator[NamedPrompt] = (
                live_adapter_prompts(name, source)
                if isinstance(source, PeftModel)
                else saved_adapter_prompts(
                    name, source, word_embeddings, library.base_model_record, revision, hub_options
                )
            )
            for named in prompts:
                # an adapter's metadata applies to each of its entries; an entry's own (`name/task`) overrides it
                fields = {**metadata.get(name, {}), **metadata.get(named.name, {})}
                library.add(named.name, named.prompt, task_type=named.task_type, origin=named.origin, **fields)
        unused = set(metadata) - set(adapters) - set(library.names)
        if unused:
            raise ValueError(
                f"metadata names {sorted(unused)}, which are neither adapters ({sorted(adapters)}) nor entries "
                f"({library.names})."
            )
        return library

    def add(
        self,
        name: str,
        prompt: torch.Tensor,
        task_type: Optional[str] = None,
        origin: Optional[dict[str, Any]] = None,
        template: Optional[str] = None,
        label_words: Optional[Sequence[str]] = None,
    ) -> LibraryEntry:
        """Add a prompt `[num_virtual_tokens, token_dim]` under a new `name`; returns its entry."""
        if not isinstance(name, str) or not name or name.startswith("<") or name == "__metadata__":
            # "<...>" names are rank's (CURRENT_PROMPT); "__metadata__" is the safetensors header's own key
            raise ValueError(
                f"An entry name is a non-empty string that does not start with '<' and is not '__metadata__', got "
                f"{name!r}."
            )
        if name in self._entries:
            raise ValueError(f"The library already has an entry named {name!r}; choose another name.")
        if isinstance(label_words, str):
            raise ValueError(
                f"Entry {name!r}: label_words is a list of words, one per label, got the string {label_words!r}; pass "
                f"[{label_words!r}] if the task has one label word."
            )
        hidden = self.base_model_record["hidden_size"]
        if prompt.dim() != 2 or prompt.shape[1] != hidden or prompt.shape[0] == 0:
            raise ValueError(
                f"Entry {name!r}: a prompt is [num_virtual_tokens, {hidden}] for this library's base model "
                f"({self.base_model_record.get('name_or_path')!r}), got {list(prompt.shape)}: was it trained on "
                "another model?"
            )
        entry = LibraryEntry(
            name,
            prompt.detach().to("cpu", torch.float32, copy=True),  # the library's own: the source may train on
            task_type=task_type,
            origin=dict(origin or {}),
            template=template,
            label_words=list(label_words) if label_words is not None else None,
        )
        self._entries[name] = entry
        return entry

    # -- reading --------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[LibraryEntry]:
        return iter(self._entries.values())

    def __getitem__(self, name: str) -> LibraryEntry:
        if name not in self._entries:
            raise KeyError(f"No entry named {name!r}; the library has {self.names}.")
        return self._entries[name]

    def __repr__(self) -> str:
        made_for = self.base_model_record.get("name_or_path")
        return f"PromptLibrary({len(self)} entries for {made_for!r}: {self.names})"

    def _chosen(self, names: Union[str, Sequence[str]]) -> list[LibraryEntry]:
        names = [names] if isinstance(names, str) else list(names)
        if CURRENT_PROMPT in names:
            raise ValueError(
                f"{CURRENT_PROMPT!r} is the model's own start, which rank ranks next to the entries; it is not an "
                "entry. When it ranks first, no entry fits better than starting fresh: leave the prompt as it is. To "
                "take the top entries, skip it: [name for name, _ in ranking if name != CURRENT_PROMPT][:3]."
            )
        if not names:
            raise ValueError(
                "No entries chosen" + ("." if self._entries else ": the library is empty; add prompts with add().")
            )
        return [self[name] for name in names]

    # -- ranking and initialising ---------------------------------------------------------------

    def rank(
        self,
        model: torch.nn.Module,
        examples: Any,
        names: Optional[Sequence[str]] = None,
        include_current: bool = True,
        task: Optional[Union[int, str]] = None,
        batch_size: int = 8,
        progress: bool = True,
    ) -> list[tuple[str, float]]:
        """Rank entries for a new task: best first, as `(name, score)` pairs.

        An entry's score is the frozen model's mean negative log-likelihood per label token on `examples` with the
        entry in front of every example, as a plain prompt (SPoT's choice without training), fitted to the length
        [`~PromptLibrary.initialize`] writes. That is the start of a peft `PROMPT_TUNING` or Bayesian target prompt;
        a residual adapter starts from `MLP(P) + P` and ComPT composes its source prompts with a private one, so
        for them the score ranks the entries as prompts, not the model's exact start. With `include_current`, the
        model's own prompt (what it uses now) is ranked too, as `CURRENT_PROMPT` ("<current prompt>"): the start
        without transfer.

        It costs one forward pass of the examples per entry (N entries x K examples). On a decoder-only model that
        can share a prompt's keys and values, each entry's prompt runs once, every batch runs after its keys and
        values, and only the positions that predict a label token get logits: on SmolLM2 at batch 8, 0.62 of the
        time of scoring each entry with peft `PROMPT_TUNING` for 20-token entries and 0.32 for 100-token ones
        (docs/guides/prompt-library.md). Sequence classifiers are refused: their head is new, so a
        loss before training ranks nothing.

        Args:
            model (`torch.nn.Module`): The model to train: a `PeftModel` (peft `PROMPT_TUNING` or one of this
                package's adapters) on a causal or seq2seq language model, or the language model itself with
                `include_current=False`. It is not changed.
            examples: A `datasets.Dataset` or a list of tokenized examples, as the Trainer takes them: `input_ids`,
                `attention_mask` (optional) and `labels` (the label tokens, -100 elsewhere).
            names (`list[str]`, *optional*): The entries to rank; all by default.
            include_current (`bool`): Rank the model's own prompt too. Default True.
            task (`int` or `str`, *optional*): For a ComPT model, the task whose prompt is its own.
            batch_size (`int`): Examples per forward pass. Default 8.
            progress (`bool`): Show a progress bar. Default True.
        """
        check_base_model(self.base_model_record, model, "This prompt library")
        scorer = PromptScorer(model, examples, batch_size)
        entries = self._chosen(self.names if names is None else names)
        adapter = getattr(model, "active_adapter", None)
        length = prompt_length(model, adapter) if adapter in getattr(model, "prompt_encoder", {}) else None
        candidates = {}
        if include_current:
            candidates[CURRENT_PROMPT] = current_prompt(model, task)
            length = length or candidates[CURRENT_PROMPT].shape[0]
        if length:
            warn_on_length({entry.name: entry.num_virtual_tokens for entry in entries}, length)
        for entry in entries:
            candidates[entry.name] = fit_length(entry.prompt, length) if length else entry.prompt
        scores = scorer.score_all(candidates, progress=progress)
        return sorted(scores.items(), key=lambda item: item[1])

    def prompt(self, names: Union[str, Sequence[str]], num_virtual_tokens: Optional[int] = None) -> torch.Tensor:
        """One entry's prompt, or several entries' mean scaled to their mean token norm (see
        [`~PromptLibrary.initialize`]), fitted to `num_virtual_tokens` if given."""
        entries = self._chosen(names)
        length = num_virtual_tokens or entries[0].num_virtual_tokens
        prompts = [fit_length(entry.prompt, length) for entry in entries]
        return prompts[0].clone() if len(prompts) == 1 else mean_prompt(prompts)

    def initialize(
        self, model: PeftModel, names: Union[str, Sequence[str]], adapter_name: Optional[str] = None
    ) -> torch.Tensor:
        """Start a model's prompt from library entries; returns what was written.

        - peft `PROMPT_TUNING`: one name copies that prompt exactly; a list gives their mean, scaled to the entries'
          mean token norm so that it keeps the prompts' size (the mean of prompts that point different ways is
          shorter than any of them).
        - Residual: the same prompt becomes the MLP's input, as the paper initialises it; at step 0 the model sees
          `MLP(P) + P`, not `P`.
        - Bayesian target: its prompt starts there (a decomposed target's `S`); its anchor stays the posterior it was
          built with (see [`~PromptLibrary.save_as_posterior`] to make a posterior of entries).
        - ComPT: each name becomes one of its shared source prompts, in order (the top entries of `rank`); at most
          `num_source_prompts`. A Bayesian source: one entry per particle.

        An entry whose length is not the adapter's is cut or tiled as peft's TEXT initialisation fits a text, with a
        warning.

        Args:
            model (`PeftModel`): The model whose prompt to set (not yet trained, as a rule).
            names (`str` or `list[str]`): Entry names, e.g. the top of `rank`.
            adapter_name (`str`, *optional*): The adapter to set; the active one by default.
        """
        adapter_name = adapter_name or getattr(model, "active_adapter", None)
        if not isinstance(model, PeftModel) or adapter_name not in getattr(model, "prompt_encoder", {}):
            raise ValueError(
                f"initialize sets the prompt of a PeftModel's prompt adapter; {type(model).__name__} has none "
                f"named {adapter_name!r}. Build it with get_peft_model (peft PROMPT_TUNING or one of this package's "
                "methods) first."
            )
        check_base_model(self.base_model_record, model, "This prompt library")
        entries = self._chosen(names)
        length = prompt_length(model, adapter_name)
        warn_on_length({entry.name: entry.num_virtual_tokens for entry in entries}, length)
        prompts = [fit_length(entry.prompt, length) for entry in entries]
        if not one_prompt_per_entry(model, adapter_name):
            prompts = [prompts[0] if len(prompts) == 1 else mean_prompt(prompts)]
        written = write_prompts(model, adapter_name, prompts)
        return torch.stack(written) if len(written) > 1 else written[0]

    def save_as_posterior(
        self, names: Sequence[str], save_directory: Union[str, os.PathLike], task_type: Optional[str] = None
    ) -> str:
        """Write entries as the particles of a Bayesian source-stage posterior, so that a target can start from them
        without a source stage: `BayesianPromptConfig(stage="target", posterior=save_directory)` starts from their
        mean (or `target_init="particle:<k>"`) and stays near it.

        The entries must have one length. Returns the folder.
        """
        entries = self._chosen(names)
        lengths = {entry.num_virtual_tokens for entry in entries}
        if len(lengths) != 1:
            raise ValueError(f"A posterior's particles have one length; the entries have {sorted(lengths)} tokens.")
        task_type = task_type or entries[0].task_type
        if task_type is None:
            raise ValueError("The entries do not say which task type they are for; pass task_type=.")
        config = BayesianPromptConfig(
            task_type=task_type,
            num_virtual_tokens=lengths.pop(),
            token_dim=self.base_model_record["hidden_size"],
            num_particles=len(entries),
            source_tasks=[entry.name for entry in entries],
            base_model_name_or_path=self.base_model_record.get("name_or_path"),
            base_vocab_size=self.base_model_record["vocab_size"],
            inference_mode=True,
        )
        particles = torch.stack([entry.prompt for entry in entries])
        os.makedirs(save_directory, exist_ok=True)
        save_safetensors(
            {"prompt_embeddings": particles.mean(0), PARTICLES_KEY: particles},
            os.path.join(save_directory, ADAPTER_WEIGHTS_NAME),
        )
        config.save_pretrained(save_directory)
        return os.fspath(save_directory)

    # -- saving and loading ---------------------------------------------------------------------

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> None:
        """Write the library to a folder: `prompt_library.safetensors` (one tensor per entry),
        `prompt_library.json` (the base model's record and the entries' metadata) and a `README.md` card."""
        os.makedirs(save_directory, exist_ok=True)
        save_safetensors(
            {entry.name: entry.prompt for entry in self}, os.path.join(save_directory, LIBRARY_WEIGHTS_NAME)
        )
        record = {
            "format": LIBRARY_FORMAT,
            "format_version": LIBRARY_FORMAT_VERSION,
            "package": {"name": PACKAGE_NAME, "version": __version__},
            "base_model": self.base_model_record,
            "entries": [entry.metadata() for entry in self],
        }
        save_json(record, os.path.join(save_directory, LIBRARY_CONFIG_NAME))
        self._model_card().save(os.path.join(save_directory, "README.md"))

    def _model_card(self) -> ModelCard:
        data = ModelCardData(
            library_name="peft",
            base_model=self.base_model_record.get("name_or_path"),
            tags=[PACKAGE_NAME, "prompt-library"],
        )
        rows = "\n".join(
            f"| `{entry.name}` | {entry.num_virtual_tokens} | {entry.origin.get('peft_type', '')} |" for entry in self
        )
        return ModelCard(
            f"---\n{data.to_yaml()}\n---\n\n# Prompt library\n\n"
            f"{len(self)} soft prompts for `{self.base_model_record.get('name_or_path')}`, made with "
            f"[{PACKAGE_NAME}](https://pypi.org/project/{PACKAGE_NAME}/).\n\n"
            "| entry | tokens | from |\n|---|---|---|\n"
            f"{rows}\n\n"
            "```python\nfrom peft_prompt_transfer import PromptLibrary\n\n"
            'library = PromptLibrary.from_pretrained("<this repo>")\n'
            "ranking = library.rank(model, examples)  # best first\n"
            "library.initialize(model, ranking[0][0])\n```\n"
        )

    @classmethod
    def from_pretrained(
        cls, location: Union[str, os.PathLike], revision: Optional[str] = None, **hub_options: Any
    ) -> PromptLibrary:
        """Load a library from a folder `save_pretrained` wrote or a Hub repo id (at `revision`).

        Args:
            location (`str` or `os.PathLike`): A local folder or a Hub repo id.
            revision (`str`, *optional*): The Hub revision (branch, tag or commit).
            hub_options: Passed to `huggingface_hub.hf_hub_download`, as peft's `from_pretrained` passes them:
                `subfolder` (also in a local folder), `token`, `cache_dir`, `local_files_only`, ...
        """
        location = os.fspath(location)
        hub_options = hub_download_options(hub_options)
        if not os.path.isdir(location):
            # both files from one commit, even if a push lands between them
            revision = _pinned_revision(location, revision, hub_options)
        try:
            with open(_library_file(location, LIBRARY_CONFIG_NAME, revision, hub_options), encoding="utf-8") as file:
                record = json.load(file)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"The library at {location!r} is damaged: {LIBRARY_CONFIG_NAME} is not valid JSON ({exc}). Save it "
                "again with save_pretrained."
            ) from exc
        if record.get("format") != LIBRARY_FORMAT:
            raise ValueError(
                f"{location!r} holds a {LIBRARY_CONFIG_NAME} that is not a prompt library's (format "
                f"{record.get('format')!r}); point from_pretrained at a folder PromptLibrary.save_pretrained wrote."
            )
        if record.get("format_version", 0) > LIBRARY_FORMAT_VERSION:
            raise ValueError(
                f"The library at {location!r} was written in format {record['format_version']} by "
                f"{PACKAGE_NAME} {record.get('package', {}).get('version')}; this version reads format "
                f"{LIBRARY_FORMAT_VERSION}. Upgrade: pip install -U {PACKAGE_NAME}."
            )
        try:
            prompts = load_file(_library_file(location, LIBRARY_WEIGHTS_NAME, revision, hub_options))
        except SafetensorError as exc:
            raise ValueError(
                f"The library at {location!r} is damaged: {LIBRARY_WEIGHTS_NAME} cannot be read ({exc}). Save it "
                "again with save_pretrained."
            ) from exc
        named = {entry["name"] for entry in record["entries"]}
        if named != set(prompts):
            raise ValueError(
                f"The library at {location!r} is damaged: {LIBRARY_CONFIG_NAME} names {sorted(named)} but "
                f"{LIBRARY_WEIGHTS_NAME} holds {sorted(prompts)}. Save it again with save_pretrained."
            )
        library = cls(record["base_model"])
        for entry in record["entries"]:
            library.add(
                entry["name"],
                prompts[entry["name"]],
                task_type=entry.get("task_type"),
                origin=entry.get("origin"),
                template=entry.get("template"),
                label_words=entry.get("label_words"),
            )
        return library

    def push_to_hub(
        self,
        repo_id: str,
        private: Optional[bool] = None,
        token: Optional[str] = None,
        commit_message: str = "Upload prompt library",
        revision: Optional[str] = None,
    ) -> str:
        """Upload the library (what `save_pretrained` writes) to a Hub model repo, created if missing, in one
        commit. Returns the commit's URL."""
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id  # the namespace filled in
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            operations = [
                CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(folder, name))
                for name in sorted(os.listdir(folder))
            ]
            commit = api.create_commit(
                repo_id, operations, commit_message=commit_message, revision=revision, repo_type="model"
            )
        return str(commit)


def _pinned_revision(repo_id: str, revision: Optional[str], hub_options: dict[str, Any]) -> Optional[str]:
    """The commit a Hub revision points at now; the revision itself when the Hub cannot or must not be asked
    (`local_files_only`, offline with the files cached: they then come from one download anyway)."""
    if hub_options.get("local_files_only"):
        return revision
    try:
        api = HfApi(endpoint=hub_options.get("endpoint"), token=hub_options.get("token"))
        return api.model_info(repo_id, revision=revision).sha or revision
    except Exception:  # offline, unknown repo: `_library_file` says what is missing
        return revision


def _library_file(location: str, filename: str, revision: Optional[str], hub_options: dict[str, Any]) -> str:
    return local_or_hub_file(
        location,
        filename,
        revision,
        "prompt library",
        "Point PromptLibrary.from_pretrained at the folder or Hub repo id that PromptLibrary.save_pretrained or "
        "push_to_hub wrote",
        **hub_options,
    )
