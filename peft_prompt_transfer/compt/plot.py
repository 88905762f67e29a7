"""A heatmap of ComPT's routing weights (which sources each task uses)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
from peft import PeftModel


def plot_routing_weights(
    model_or_weights: Union[PeftModel, torch.Tensor],
    task_names: Optional[Sequence[str]] = None,
    ax=None,
    adapter_name: Optional[str] = None,
):
    """Draw the tasks x sources routing matrix (`ComPTEncoder.routing_weights()`) as an annotated heatmap.

    Args:
        model_or_weights: A model with a ComPT adapter, or a `[num_tasks, num_sources]` tensor.
        task_names: Row labels; taken from the adapter's config when a model is given.
        ax (`matplotlib.axes.Axes`, *optional*): The axes to draw on; a new figure is made if omitted.
        adapter_name: The adapter to plot; defaults to the active one.

    Returns:
        ax (`matplotlib.axes.Axes`): The axes drawn on.
    """
    import matplotlib.pyplot as plt

    if isinstance(model_or_weights, torch.Tensor):
        weights = model_or_weights.detach().cpu()
    else:
        adapter_name = adapter_name or model_or_weights.active_adapter
        weights = model_or_weights.prompt_encoder[adapter_name].routing_weights()
        task_names = task_names or model_or_weights.peft_config[adapter_name].task_names
    num_tasks, num_sources = weights.shape
    task_names = list(task_names) if task_names else [f"task {i}" for i in range(num_tasks)]
    if ax is None:
        # wide enough for the title and the colour bar even with one or two sources
        _, ax = plt.subplots(figsize=(max(5.5, 2.5 + 0.8 * num_sources), 1.5 + 0.5 * num_tasks), layout="constrained")
    image = ax.imshow(weights.numpy(), cmap="viridis", vmin=0.0, vmax=max(1.0, float(weights.max())), aspect="auto")
    ax.set_xticks(range(num_sources), [f"S{j}" for j in range(num_sources)])
    ax.set_yticks(range(num_tasks), task_names)
    ax.set_xlabel("source prompt")
    ax.set_title("ComPT routing weights (gate x normalised weight)")
    for t in range(num_tasks):
        for j in range(num_sources):
            value = float(weights[t, j])
            ax.text(
                j, t, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.5 else "black", fontsize=8
            )
    ax.figure.colorbar(image, ax=ax)
    return ax
