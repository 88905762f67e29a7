"""Sparsemax (Martins & Astudillo, 2016): a softmax alternative whose outputs can be exactly zero."""

from __future__ import annotations

import torch


class _Sparsemax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor) -> torch.Tensor:
        # Euclidean projection onto the simplex along the last dimension:
        # p = max(z - tau, 0) with tau chosen so that sum(p) = 1.
        sorted_logits, _ = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.cumsum(dim=-1)
        ranks = torch.arange(1, logits.shape[-1] + 1, device=logits.device, dtype=logits.dtype)
        in_support = 1 + ranks * sorted_logits > cumulative  # true for the first k(z) entries
        support_size = in_support.sum(dim=-1, keepdim=True)
        tau = (cumulative.gather(-1, support_size - 1) - 1) / support_size.to(logits.dtype)
        probabilities = torch.clamp(logits - tau, min=0)
        ctx.save_for_backward(probabilities)
        return probabilities

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        (probabilities,) = ctx.saved_tensors
        # Jacobian: diag(s) - s s^T / |S| with s the support indicator
        support = (probabilities > 0).to(grad_output.dtype)
        mean_on_support = (grad_output * support).sum(-1, keepdim=True) / support.sum(-1, keepdim=True)
        return support * (grad_output - mean_on_support)


def sparsemax(logits: torch.Tensor) -> torch.Tensor:
    """Sparsemax over the last dimension, with its exact gradient. Entries of `-inf` get probability 0."""
    return _Sparsemax.apply(logits)
