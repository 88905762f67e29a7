"""peft-prompt-transfer: residual prompt tuning, ComPT and Bayesian prompt transfer as peft plugins.

Importing this package registers its methods with peft (idempotently), so that peft's own API
(`get_peft_model`, `PeftModel.from_pretrained`, `AutoPeftModel*`, `save_pretrained`, the
transformers Trainer, `generate`) works with them unchanged.
"""

from . import _compat, _patches
from ._version import __version__
from .bayesian import (
    BAYESIAN_PROMPT_TUNING,
    BayesianPromptConfig,
    BayesianPromptEncoder,
    ParticleReplicationCollator,
    bayesian_parameter_groups,
    ensemble_predict,
    load_posterior,
)
from .compt import (
    COMPT,
    COMPT_AUTHORS_LEARNING_RATES,
    ComPTConfig,
    ComPTEncoder,
    add_tasks,
    compt_parameter_groups,
    create_compt_optimizer,
    plot_routing_weights,
    set_active_task,
)
from .export import export_kv_prefix, export_prompt_tuning
from .library import CURRENT_PROMPT, LibraryEntry, PromptLibrary
from .multitask import TaskIdsCollator, check_task_ids, combine_tasks
from .residual import RESIDUAL_PROMPT_TUNING, ResidualPromptConfig, ResidualPromptEncoder
from .sharing import enable_shared_prefix

_patches.install()
_compat.register_method(RESIDUAL_PROMPT_TUNING, ResidualPromptConfig, ResidualPromptEncoder)
_compat.register_method(COMPT, ComPTConfig, ComPTEncoder)
_compat.register_method(BAYESIAN_PROMPT_TUNING, BayesianPromptConfig, BayesianPromptEncoder)

__all__ = [
    "__version__",
    "BayesianPromptConfig",
    "BayesianPromptEncoder",
    "ParticleReplicationCollator",
    "bayesian_parameter_groups",
    "ensemble_predict",
    "load_posterior",
    "COMPT_AUTHORS_LEARNING_RATES",
    "ComPTConfig",
    "ComPTEncoder",
    "add_tasks",
    "compt_parameter_groups",
    "create_compt_optimizer",
    "plot_routing_weights",
    "set_active_task",
    "ResidualPromptConfig",
    "ResidualPromptEncoder",
    "TaskIdsCollator",
    "check_task_ids",
    "combine_tasks",
    "export_kv_prefix",
    "export_prompt_tuning",
    "CURRENT_PROMPT",
    "LibraryEntry",
    "PromptLibrary",
    "enable_shared_prefix",
]
