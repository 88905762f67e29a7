"""Every place where peft_prompt_transfer hooks into peft's, transformers' or torch's internals.

peft has a public plugin entry point, `register_peft_method` (used in `_compat`, with the extension of peft's closed
`PeftType` enum), but a prompt-learning method needs more. Each patch below wraps one upstream callable, checks the
active config's `peft_type` and calls upstream's original for anything that is not ours, so peft's own methods
behave exactly as without the plugin. Patches are grouped by what they make work; each group is installed whole,
only while upstream still needs it (its gate), and is disabled as its kind says when upstream has moved (see
`patching`): a **correctness** group never lets our adapters run unpatched (its features raise a clear error), a
**convenience** group warns, naming what stops working.

| # | target | file | group (kind; gate) | why |
|---|---|---|---|---|
| 1 | `PeftModel._setup_prompt_encoder` | `prompt.py` | prompt set-up and forward (correctness) | peft builds encoders only for its own prompt types: for ours it runs its code on a stand-in `PromptTuningConfig` (freezing the base model, finding the word embeddings and the backbone), then swaps in our encoder |
| 2 | `PeftModel.get_prompt` | `prompt.py` | prompt set-up and forward | peft branches on its own prompt types; ours ask their encoder, which takes `task_ids` and needs no `prompt_tokens` |
| 3 | `PeftModelForSeq2SeqLM.forward` | `prompt.py` | the forward pass of seq2seq models (correctness) | peft puts only `PROMPT_TUNING` / `P_TUNING` prompts on the encoder input; ours take the same path, with `task_ids` (mirrors peft 0.21.2) |
| 4 | `PeftModelForCausalLM.forward` | `prompt.py`, `shared_prefix.py` | the shared-prefix forward of causal LMs (convenience: without it, peft's concatenation) | with `shared_prefix` "auto" or "on", each distinct prompt of the batch runs through the decoder once and its keys and values are gathered to the rows (`prompt_kv.py` says when it applies); otherwise peft's own forward (mirrors peft 0.21.2) |
| 5 | `PeftModelForCausalLM.generate` | `prompt.py`, `shared_prefix.py` | the shared-prefix forward of causal LMs | for the call, peft's generate hands the base model a `prepare_inputs_for_generation` whose prefill step runs each distinct prompt once into generate's own cache and gathers its keys and values to the rows and beams, instead of peft's concatenation; decoding steps are peft's |
| 6 | `PeftModelForSequenceClassification.forward` | `prompt.py`, `shared_prefix.py` | the shared-prefix forward of causal LMs | on a decoder-only classifier that pools the last position (transformers' `GenericForSequenceClassification`: Llama, Mistral, Qwen, Gemma, Phi-3, ...), the distinct prompts run once through its body and the rows run with their keys and values, as 4; otherwise peft's own forward (mirrors peft 0.21.2) |
| 7 | `PeftModelForCausalLM.prepare_inputs_for_generation` | `generation.py` | cached generation on causal LMs (correctness; only while transformers passes `cache` and peft's function does not read it) | transformers 5.24 passes the KV cache as `cache` and no `cache_position`; peft <= 0.21.2 looks for `past_key_values`, finds none and prepends the prompt at every decoding step. peft's code gets the inputs in the form it knows, and its result is handed back in transformers' form |
| 8 | `PeftModelForSeq2SeqLM.generate` | `generation.py` | generation on seq2seq models (correctness) | as 3, for `generate` (mirrors peft 0.21.2) |
| 9 | `PeftModel.get_prompt_embedding_to_save` | `persistence.py` | saving and loading (correctness) | peft feeds token indices to the encoder; ours return the prompt inference uses (under FSDP2 without gathering the shards) |
| 10 | `get_peft_model_state_dict`, `set_peft_model_state_dict` | `persistence.py` | saving and loading the whole training state (correctness; only on peft < 0.21, which has no `BasePromptEncoder` hooks) | our encoders' save/load hooks run there too, with the state dict they are given (under FSDP2 the Trainer hands the full one to the first process only) |
| 11 | `PeftModel.save_pretrained` | `persistence.py` | saving through a staging folder (convenience) | writes into a staging folder beside the target, then moves each file into place: a failed save leaves the previous adapter intact |
| 12 | `PeftModel.load_adapter`, `PeftConfigMixin.from_json_file` | `persistence.py` | clear errors for damaged adapter files (convenience) | a truncated `adapter_model.safetensors` of ours, or an `adapter_config.json` that is not JSON (any adapter type: only the message changes), names the file and the fix |
| 13 | `PeftModel.from_pretrained`, `PeftModel._check_new_adapter_config`, `PeftModel.set_requires_grad` | `persistence.py` | loading our adapters for training (convenience) | peft refuses trainable loads of prompt methods, whose encoders save only the inference prompt; ours save their whole training state, so `from_pretrained(..., is_trainable=True)` builds the model in training mode and loads with `load_adapter(..., is_trainable=True)` (mirrors peft 0.21.2) |
| 14 | `PeftModel.create_or_update_model_card`, `PeftModel.push_to_hub` | `persistence.py` | model cards that name this plugin (convenience; uses `_upload_modified_files`) | the card gets our tag and install/import lines; `push_to_hub` overwrites the card with a transformers template, so ours is put back just before the upload |
| 15 | `transformers.Trainer._get_dataloader` | `trainer.py` | the Trainer's task_ids column (convenience) | for adapters that take `task_ids`, `task_ids` joins the columns `remove_unused_columns=True` keeps and the collator is wrapped in `TaskIdsCollator` for the call (TRL's collators drop unknown keys) |
| 16 | `_filter_expected_adapter_keys` (a function of `peft.peft_model`) | `persistence.py` | peft's adapter key check on our adapters (convenience; only while peft's `load_adapter` checks keys: `strict_adapter_check`, peft >= 0.22) | peft excuses only a prompt method's top-level keys; ours nest some (a residual MLP's `reparameterization.*`), so every load warned of unexpected keys. For our adapters, the keys outside the base model (`base_model.`) are left to the encoder, which loads and checks them |

Two process-wide torch optimizer hooks live with the methods that need them, since they act on the methods' own
parameters:

| # | hook | file | scope |
|---|---|---|---|
| 17 | `torch.optim.optimizer.register_optimizer_step_post_hook` | `compt/model.py` | ComPT's temperature clock counts the steps of optimizers that hold the encoder's parameters (or, as under DeepSpeed ZeRO or FSDP1, step flattened copies of them); another optimizer in the process leaves it alone |
| 18 | `torch.optim.optimizer.register_optimizer_step_pre_hook` | `bayesian/step_transform.py` | SVGD's gradient transform: acts only on parameters that carry a registered transform (a Bayesian source's particles), in whichever optimizer holds them |

The supported peft and transformers ranges are in `_compat.SUPPORTED_VERSIONS` (and, tested equal, in
`pyproject.toml`); importing the plugin next to a version outside them warns with the command that installs a
supported one. The suite runs against the oldest and the newest releases of both (`constraints/`), and
`scripts/canary.sh` against whatever pip resolves today.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

from .._compat import check_versions
from .generation import CAUSAL_GENERATION, SEQ2SEQ_GENERATION
from .patching import PatchGroup, install_groups
from .persistence import (
    ADAPTER_KEY_CHECK,
    ATOMIC_SAVE,
    CLEAR_LOAD_ERRORS,
    HUB_CARDS,
    PERSISTENCE,
    STATE_DICT_HOOKS,
    TRAINABLE_LOADS,
)
from .prompt import PROMPT, SEQ2SEQ_FORWARD, SHARED_PREFIX
from .trainer import TRAINER_TASK_IDS

# in dependency order: a group after the groups it requires
GROUPS: tuple[PatchGroup, ...] = (
    PROMPT,
    SEQ2SEQ_FORWARD,
    SHARED_PREFIX,
    CAUSAL_GENERATION,
    SEQ2SEQ_GENERATION,
    PERSISTENCE,
    STATE_DICT_HOOKS,
    ATOMIC_SAVE,
    CLEAR_LOAD_ERRORS,
    ADAPTER_KEY_CHECK,
    TRAINABLE_LOADS,
    HUB_CARDS,
    TRAINER_TASK_IDS,
)


def install() -> None:
    """Check the versions, then install every patch group that upstream still needs and allows (idempotent)."""
    check_versions()
    install_groups(GROUPS)


def installed_patches() -> dict[str, Optional[Callable]]:
    """Each patch target and the upstream original its wrapper delegates to (None: not installed), for tests and
    debugging."""
    return {patch.target: patch.original() for group in GROUPS for patch in group.patches}


def disabled_groups() -> dict[str, list[str]]:
    """The groups that are off in this process (upstream moved), with the reasons."""
    return {group.name: list(group.disabled_because) for group in GROUPS if group.disabled_because}
