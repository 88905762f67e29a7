"""The decomposed target prompt `P = S ⊙ (U V)` (after MPT): the low-rank factors' initialisation and the
gradient of the anchor regulariser `λ/2 ||P - anchor||^2` with respect to `S`, `U` and `V`."""

from __future__ import annotations

from typing import Optional

import torch

# MPT's init of its task factors (peft's MultitaskPromptEncoder: N(0, 0.02^2) entries)
EXTRA_RANK_STD = 0.02


def initial_task_factors(
    num_tokens: int, token_dim: int, rank: int, generator: Optional[torch.Generator] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`U [num_tokens, rank]` and `V [rank, token_dim]` with `U V` all ones, so that `S ⊙ (U V) = S` at step 0.

    MPT starts both factors from N(0, 0.02^2), so its product starts near zero: right for a prompt trained from
    scratch, but it would erase a prompt taken from the posterior. Here `U`'s first column and `V`'s first row are
    ones; the other columns of `U` are N(0, 0.02^2) (MPT's) and the other rows of `V` zero, as LoRA starts one factor
    at zero: the product is still all ones, and the ranks get different gradients (all-ones factors would keep
    every rank identical).
    """
    cols = torch.zeros(num_tokens, rank)
    rows = torch.zeros(rank, token_dim)
    cols[:, 0], rows[0] = 1.0, 1.0
    cols[:, 1:] = EXTRA_RANK_STD * torch.randn(num_tokens, rank - 1, generator=generator)
    return cols, rows


def anchor_gradients(
    shared: torch.Tensor, cols: torch.Tensor, rows: torch.Tensor, anchor: torch.Tensor, weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of `weight/2 * ||S ⊙ (U V) - anchor||^2` with respect to `S`, `U` and `V`.

    With `R = weight * (S ⊙ (U V) - anchor)`: `dS = R ⊙ (U V)`, `dU = (R ⊙ S) V^T`, `dV = U^T (R ⊙ S)`.
    """
    product = cols @ rows
    residual = weight * (shared * product - anchor)
    through_product = residual * shared
    return residual * product, through_product @ rows.T, cols.T @ through_product
