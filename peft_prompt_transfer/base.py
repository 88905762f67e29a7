"""Pieces shared by the three methods: the config base class and the prompt-encoder protocol."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from peft import PromptLearningConfig
from peft.tuners.prompt_tuning import PromptEmbedding, PromptTuningInit
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor

from ._compat import (
    IMPORT_LINE,
    PACKAGE_NAME,
    PROMPT_FEATURE,
    SHARED_PREFIX_FEATURE,
    BasePromptEncoder,
    require_feature,
    settle_fsdp_root,
)
from ._version import __version__


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded `DTensor` (FSDP2's parameters and gradients), else `tensor` itself.

    Gathering is a collective: under FSDP2 every rank must call this, in the same order.
    """
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def reshard_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`whole` sharded as the `DTensor` `like` is (this rank's part, no communication), else `whole` itself."""
    if not isinstance(like, DTensor):
        return whole
    return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None)


@contextlib.contextmanager
def gathered_parameters(
    module: torch.nn.Module, whole_state: Optional[dict[str, torch.Tensor]] = None
) -> Iterator[None]:
    """Within this context the sharded (FSDP2 `DTensor`) parameters of `module` are whole plain tensors.

    Saving, loading and exporting an encoder read or write its parameters as a whole (a residual prompt goes through
    its MLP, ComPT's prompts through the router), which works on the whole tensors and not on the shards FSDP2 keeps
    between steps. On exit each rank keeps its own shard of the (possibly loaded) values. Every rank must enter the
    context, unless `whole_state` (names relative to `module`) already holds every sharded parameter whole, as the
    full state dict the Trainer gathers before saving from the first process only; outside FSDP2 it does nothing.
    """
    whole_state = whole_state or {}
    sharded = [
        (owner, name, parameter, f"{prefix}.{name}".lstrip("."))
        for prefix, owner in module.named_modules()
        for name, parameter in owner.named_parameters(recurse=False)
        if isinstance(parameter, DTensor)
    ]
    for owner, name, parameter, qualified_name in sharded:
        value = whole_state.get(qualified_name)
        value = parameter.full_tensor() if value is None else value.to(parameter.device, parameter.dtype)
        setattr(owner, name, torch.nn.Parameter(value.detach(), requires_grad=parameter.requires_grad))
    try:
        yield
    finally:
        with torch.no_grad():
            for owner, name, parameter, _ in sharded:
                whole = getattr(owner, name)
                setattr(owner, name, parameter)
                parameter.copy_(reshard_like(whole.detach(), parameter))


@contextlib.contextmanager
def unsharded_around(model: torch.nn.Module, inner: torch.nn.Module) -> Iterator[None]:
    """Within this context `inner`, a module inside `model`, can run forward by itself while `model` is sharded with
    FSDP2 (an FSDP2 root gathers its own parameters, such as the embeddings and the head, only in its own forward).

    The FSDP2 modules of `model` that hold `inner` keep their parameters whole until the context ends; those inside
    `inner` (a transformer's blocks) gather and free theirs in their own forward, as in training. `model` must be
    the sharded model's root (what the Trainer and accelerate shard); it need not have run forward yet. Every rank
    must enter the context; outside FSDP2 it does nothing.
    """
    holders = [
        module
        for module in model.modules()
        if isinstance(module, FSDPModule) and any(sub is inner for sub in module.modules())
    ]
    if holders:
        settle_fsdp_root(holders[0])  # the outermost: the first of modules()
    for module in holders:
        module.unshard()
    try:
        yield
    finally:
        for module in holders:
            module.reshard()


@torch.no_grad()
def load_module_state(module: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """`module.load_state_dict(state_dict, strict=True)` done by copying each value into the module's own tensor.

    Our encoders load their submodules (a residual MLP, ComPT's prompt encoders) inside [`gathered_parameters`]. Under
    FSDP2, `load_state_dict` there runs FSDP's post-load hook, which expects the module's parameters to be its sharded
    `DTensor`s, finds the whole tensors swapped in and fails (`'Parameter' object has no attribute '_local_tensor'`),
    so loading an adapter into a sharded model (what resuming from a sharded Trainer checkpoint does) failed. Copying
    in place runs no module hooks, and on leaving the context each rank keeps its shard of what was copied.
    """
    own = module.state_dict(keep_vars=True)
    missing, unexpected = sorted(own.keys() - state_dict.keys()), sorted(state_dict.keys() - own.keys())
    if missing or unexpected:
        raise RuntimeError(
            f"Error(s) in loading state_dict for {type(module).__name__}: missing keys {missing}, unexpected keys "
            f"{unexpected}."
        )
    for name, value in state_dict.items():
        if own[name].shape != value.shape:
            raise RuntimeError(
                f"Error(s) in loading state_dict for {type(module).__name__}: {name!r} has shape "
                f"{tuple(value.shape)} in the state dict but {tuple(own[name].shape)} in the module."
            )
        own[name].copy_(value)


SHARED_PREFIX_MODES = ("auto", "on", "off")


def _plugin_record() -> dict:
    return {"package": PACKAGE_NAME, "version": __version__, "import": IMPORT_LINE}


@dataclass
class TransferPromptLearningConfig(PromptLearningConfig):
    """
    Base configuration of this package's prompt-learning methods.

    It adds to peft's [`PromptLearningConfig`] the prompt initialisation options of peft's
    [`PromptTuningConfig`] and a record of the plugin needed to load the adapter, which is saved in
    `adapter_config.json` so that a reader without the plugin learns what to install.

    Args:
        prompt_tuning_init (Union[`PromptTuningInit`, `str`]):
            `"RANDOM"` (default), `"SAMPLE_VOCAB"` (embeddings of random vocabulary tokens) or `"TEXT"`
            (embeddings of `prompt_tuning_init_text`, repeated or cut to the prompt length).
        prompt_tuning_init_text (`str`, *optional*): The text for `"TEXT"` initialisation.
        tokenizer_name_or_path (`str`, *optional*): The tokenizer for `"TEXT"` initialisation.
        tokenizer_kwargs (`dict`, *optional*): Keyword arguments for `AutoTokenizer.from_pretrained`.
        peft_plugin (`dict`): Which package provides this method and how to load it. Filled in automatically.
        base_vocab_size (`int`, *optional*): The vocabulary size of the base model the adapter was made for. Filled
            in automatically; loading onto a model with another vocabulary warns.
        shared_prefix (`str`): How a decoder's forward (a causal LM's, a decoder classifier's) and `generate`'s
            prefill run the prompt: `"auto"` (default) runs each distinct
            prompt of a batch through the model once and gives its keys and values to the rows wherever that gives
            the concatenated path's outputs, and concatenates elsewhere; `"on"` always shares, or raises an error
            that says why it cannot; `"off"` always concatenates, as peft's `PROMPT_TUNING` does.
    """

    prompt_tuning_init: Union[PromptTuningInit, str] = field(
        default=PromptTuningInit.RANDOM,
        metadata={"help": "How to initialise the prompt: RANDOM, SAMPLE_VOCAB or TEXT."},
    )
    prompt_tuning_init_text: Optional[str] = field(
        default=None, metadata={"help": "Text to initialise the prompt from (prompt_tuning_init='TEXT')."}
    )
    tokenizer_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Tokenizer for prompt_tuning_init='TEXT'."}
    )
    tokenizer_kwargs: Optional[dict] = field(
        default=None, metadata={"help": "Keyword arguments for AutoTokenizer.from_pretrained (TEXT init only)."}
    )
    peft_plugin: dict = field(
        default_factory=_plugin_record,
        metadata={
            "help": (
                f"This adapter needs the `{PACKAGE_NAME}` plugin: `pip install {PACKAGE_NAME}` and "
                f"`{IMPORT_LINE}` before loading it with peft."
            )
        },
    )

    base_vocab_size: Optional[int] = field(
        default=None, metadata={"help": "Vocabulary size of the base model the adapter was made for (filled in)."}
    )
    shared_prefix: str = field(
        default="auto",
        metadata={
            "help": (
                "How a decoder's forward (a causal LM's, or transformers' generic decoder classifier's) and generate's "
                "prefill run the prompt. 'auto' (default): each distinct prompt of a batch runs "
                "through the model once and its keys and values are shared by the rows (the same outputs as "
                "peft's concatenation, at a fraction of the cost), wherever that is exact: a decoder-only base "
                "model whose cache holds only keys and values, no dropout active in training mode, no gradient "
                "checkpointing in training, no rope scaling that depends on the total length, no "
                "output_attentions, and a saving worth the second call (at least 128 positions, (B-U)*P for U distinct "
                "prompts in the batch, and U*P + B*L at most 0.9 of B*(P+L), by measurement); elsewhere it concatenates, as peft does. 'on': share, or raise an error that "
                "says why it cannot. 'off': always concatenate. It decides only how a forward runs: an adapter "
                "saved with any value loads anywhere. See docs/guides/shared-prefix.md."
            )
        },
    )

    @property
    def takes_task_ids(self) -> bool:
        """Whether forward takes `task_ids` (a multi-task adapter); the Trainer then keeps the `task_ids` column."""
        return False

    def __post_init__(self):
        require_feature(PROMPT_FEATURE)  # without its patches peft cannot build our encoders
        super().__post_init__()
        if (
            self.num_virtual_tokens is None
            or isinstance(self.num_virtual_tokens, bool)
            or not (isinstance(self.num_virtual_tokens, int) and self.num_virtual_tokens > 0)
        ):
            raise ValueError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}.")
        # Our prompts go on the encoder only (as peft's PROMPT_TUNING does for seq2seq models).
        if self.num_transformer_submodules is None:
            self.num_transformer_submodules = 1
        if self.num_transformer_submodules != 1:
            raise ValueError(
                f"num_transformer_submodules must be 1 (the prompt is prepended to the encoder input only), "
                f"got {self.num_transformer_submodules}. Leave it unset."
            )
        valid_inits = [init.value for init in PromptTuningInit]
        init = getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)
        if init not in valid_inits:
            raise ValueError(f"prompt_tuning_init must be one of {valid_inits}, got {self.prompt_tuning_init!r}.")
        self.prompt_tuning_init = PromptTuningInit(init)
        if self.prompt_tuning_init == PromptTuningInit.TEXT:
            if not self.tokenizer_name_or_path:
                raise ValueError(
                    "prompt_tuning_init='TEXT' needs tokenizer_name_or_path (the tokenizer to encode the text)."
                )
            if not self.prompt_tuning_init_text:
                raise ValueError("prompt_tuning_init='TEXT' needs a non-empty prompt_tuning_init_text.")
        elif self.tokenizer_kwargs:
            raise ValueError("tokenizer_kwargs is only used with prompt_tuning_init='TEXT'; remove it or use TEXT.")
        if self.shared_prefix not in SHARED_PREFIX_MODES:
            raise ValueError(f"shared_prefix must be one of {list(SHARED_PREFIX_MODES)}, got {self.shared_prefix!r}.")
        task_type = getattr(self.task_type, "value", self.task_type)
        if self.shared_prefix == "on":
            if task_type not in ("CAUSAL_LM", "SEQ_CLS"):
                raise ValueError(
                    f"shared_prefix='on' needs a decoder-only model (task_type='CAUSAL_LM', or 'SEQ_CLS' on a decoder "
                    f"classifier), got {task_type!r}: only a decoder's prompt keys and values are independent of the "
                    "input. Use 'auto' or 'off'."
                )
            require_feature(SHARED_PREFIX_FEATURE)


def initial_prompt(
    config: TransferPromptLearningConfig, word_embeddings: torch.nn.Module, num_tokens: int
) -> torch.Tensor:
    """A [num_tokens, token_dim] prompt initialised as `config.prompt_tuning_init` says.

    Delegates to peft's `PromptEmbedding`, so RANDOM / SAMPLE_VOCAB / TEXT behave exactly as for
    peft's PROMPT_TUNING (including DeepSpeed ZeRO-3 gathering of the word embeddings).
    """

    class _Shape:  # the attributes PromptEmbedding reads
        num_virtual_tokens = num_tokens
        num_transformer_submodules = 1
        token_dim = config.token_dim
        prompt_tuning_init = config.prompt_tuning_init
        prompt_tuning_init_text = config.prompt_tuning_init_text
        tokenizer_name_or_path = config.tokenizer_name_or_path
        tokenizer_kwargs = dict(config.tokenizer_kwargs or {})
        inference_mode = config.inference_mode

    return PromptEmbedding(_Shape, word_embeddings).embedding.weight.detach().clone()


class TransferPromptEncoder(BasePromptEncoder):
    """
    Base class of this package's prompt encoders.

    peft calls an encoder through the patch layer (`_patches`):

    - `forward(batch_size, task_ids)` returns the prompts `[batch_size, num_virtual_tokens, token_dim]`
      that are prepended to the input embeddings;
    - `distinct_prompts(batch_size, task_ids)` returns the same prompts without repeats: the distinct prompts
      `[num_distinct, num_virtual_tokens, token_dim]` and each row's index into them `[batch_size]`, so that
      `prompts.index_select(0, rows)` has `forward`'s values and passes the same gradients to the encoder (the
      shared-prefix path runs each distinct prompt through the model once), and `num_distinct_prompts` how many
      there are, without computing them;
    - `adapter_state_dict()` returns what `save_pretrained` writes: always `prompt_embeddings`
      (the prompt inference uses, shaped like `self.embedding.weight`), plus whatever the method
      needs to resume training exactly;
    - `_load_adapter_state_dict(state_dict)` loads it back (peft's `BasePromptEncoder` hook);
    - `inference_prompt(task)` is the `[num_virtual_tokens, token_dim]` prompt that
      `export_prompt_tuning` writes as a plain peft PROMPT_TUNING adapter.
    """

    embedding: torch.nn.Embedding

    def __init__(self, config: TransferPromptLearningConfig, word_embeddings: torch.nn.Module):
        super().__init__()
        # under DeepSpeed ZeRO-3 the weight is a shape-[0] shard and the real shape is in `ds_shape`
        vocab_size, hidden_size = tuple(getattr(word_embeddings.weight, "ds_shape", word_embeddings.weight.shape))
        if config.token_dim != hidden_size:
            raise ValueError(
                f"This {config.peft_type.value} adapter was made for a base model with token_dim={config.token_dim}, "
                f"but this base model's word embeddings have hidden size {hidden_size}. Load the adapter onto the "
                "base model it was trained on (base_model_name_or_path in its adapter_config.json: "
                f"{config.base_model_name_or_path!r})."
            )
        if config.base_vocab_size is None:
            config.base_vocab_size = vocab_size
        elif config.base_vocab_size != vocab_size:
            # not an error: a model whose embeddings were resized for added tokens is still the right model
            warnings.warn(
                f"This {config.peft_type.value} adapter was made for a base model with a vocabulary of "
                f"{config.base_vocab_size} tokens, but this one has {vocab_size}. Unless it is the same model with "
                "added tokens, the prompt will not work: load the adapter onto the model named in "
                f"adapter_config.json ({config.base_model_name_or_path!r}).",
                stacklevel=2,
            )
        self.config = config

    def forward(self, batch_size: int, task_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        raise NotImplementedError

    def distinct_prompts(
        self, batch_size: int, task_ids: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def num_distinct_prompts(self, batch_size: int, task_ids: Optional[torch.Tensor] = None) -> int:
        """How many distinct prompts `distinct_prompts` would return, without computing them (the shared-prefix
        path decides from it whether sharing pays)."""
        raise NotImplementedError

    def inference_prompt(self, task: Optional[Union[int, str]] = None) -> torch.Tensor:
        raise NotImplementedError

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_adapter_state(self, state_dict: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    # -- peft's BasePromptEncoder hooks (peft >= 0.21; the patch layer calls them on older peft)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        prefix = f"prompt_encoder.{adapter_name}."
        whole_state = {
            key[len(prefix) :]: value
            for key, value in (state_dict or {}).items()
            if key.startswith(prefix) and not isinstance(value, DTensor)
        }
        return model.prompt_encoder[adapter_name].whole_adapter_state_dict(whole_state)

    def _load_adapter_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.check_adapter_state_dict(state_dict)
        with gathered_parameters(self):
            self.load_adapter_state(state_dict)

    def whole_adapter_state_dict(
        self, whole_state: Optional[dict[str, torch.Tensor]] = None
    ) -> dict[str, torch.Tensor]:
        """`adapter_state_dict()` of the whole parameters, also when FSDP2 has sharded them: then on every rank, or
        on one with their whole values in `whole_state` (see [`gathered_parameters`])."""
        with gathered_parameters(self, whole_state):
            return self.adapter_state_dict()

    def check_adapter_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Raise a clear error if `state_dict` cannot belong to this encoder."""
        if "prompt_embeddings" not in state_dict:
            raise ValueError(
                f"The adapter weights have no 'prompt_embeddings' entry (found: {sorted(state_dict)[:8]}); "
                f"this is not a {self.config.peft_type} adapter, or the file is damaged. Save it again with "
                "`model.save_pretrained(...)`."
            )
        expected = tuple(self.embedding.weight.shape)
        found = tuple(state_dict["prompt_embeddings"].shape)
        if found != expected:
            raise ValueError(
                f"'prompt_embeddings' has shape {found} but this model expects {expected} "
                f"(num_virtual_tokens={self.config.num_virtual_tokens}, token_dim={self.config.token_dim}). "
                "The adapter was trained for a base model with a different hidden size or a different prompt "
                "length: load it onto the base model named in its adapter_config.json (base_model_name_or_path)."
            )
