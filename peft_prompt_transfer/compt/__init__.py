"""ComPT (arXiv:2408.13227): task prompts composed from shared source prompts and private prompts."""

from .config import COMPT, ComPTConfig
from .extend import add_tasks
from .model import ComPTEncoder, set_active_task
from .optim import COMPT_AUTHORS_LEARNING_RATES, compt_parameter_groups, create_compt_optimizer
from .plot import plot_routing_weights
from .sparsemax import sparsemax

__all__ = [
    "COMPT",
    "COMPT_AUTHORS_LEARNING_RATES",
    "ComPTConfig",
    "ComPTEncoder",
    "add_tasks",
    "compt_parameter_groups",
    "create_compt_optimizer",
    "plot_routing_weights",
    "set_active_task",
    "sparsemax",
]
