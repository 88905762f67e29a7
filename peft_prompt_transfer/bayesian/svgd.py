"""Stein variational gradient descent (Liu & Wang, 2016, arXiv:1608.04471) on a set of particles.

Pure torch, no language model: the RBF kernel with the median-heuristic bandwidth, the Stein direction
`phi`, and the gradient that a torch optimizer (which minimises) must see so that its step moves the
particles along `phi`.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

Bandwidth = Union[str, float]


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    # half-precision particles (bf16/fp16 training) would round the kernel and distances badly: compute in fp32
    return torch.promote_types(tensor.dtype, torch.float32)


def pairwise_sq_distances(particles: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances `||x_i - x_j||^2` between the rows of a `[M, d]` tensor, as `[M, M]`.

    The differences are formed explicitly (not with the `|x|^2 + |y|^2 - 2 x.y` expansion), so identical
    particles are exactly 0 apart and nothing is lost to cancellation when particles are close.
    """
    return torch.cdist(particles, particles, compute_mode="donot_use_mm_for_euclid_dist").pow(2)


def median_bandwidth(sq_distances: torch.Tensor) -> torch.Tensor:
    """The median heuristic `h = med / log(M + 1)` for the kernel `exp(-||x - y||^2 / h)`.

    `med` is the median squared distance between distinct pairs of particles, so a typical pair has kernel value
    `1 / (M + 1)` and the kernel summed over the other particles stays of order one however many there are
    (Liu & Wang, 2016; `log(M + 1)` rather than `log M`, as in their reference code, keeps `M = 1` finite).

    When more than half of the pairs coincide the median is 0, which would make the kernel a point mass and its
    gradient 0/0; the mean squared distance is used instead, and when every particle coincides `h = 1` (the
    kernel's gradient is then zero whatever `h` is).
    """
    num_particles = sq_distances.shape[0]
    pairs = torch.triu_indices(num_particles, num_particles, offset=1, device=sq_distances.device)
    off_diagonal = sq_distances[pairs[0], pairs[1]]
    if off_diagonal.numel() == 0:  # one particle: there is no pair to repel
        return sq_distances.new_ones(())
    scale = off_diagonal.median()
    scale = torch.where(scale > 0, scale, off_diagonal.mean())
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale / math.log(num_particles + 1)


def rbf_kernel(particles: torch.Tensor, bandwidth: Bandwidth = "median") -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel matrix `K[i, j] = exp(-||x_i - x_j||^2 / h)` of a `[M, d]` tensor, and `h`.

    Args:
        particles: `[M, d]`.
        bandwidth: `"median"` for the median heuristic ([`median_bandwidth`]), or a fixed `h > 0` in units of
            squared distance.
    """
    sq_distances = pairwise_sq_distances(particles)
    if bandwidth == "median":
        h = median_bandwidth(sq_distances)
    else:
        h = sq_distances.new_tensor(float(bandwidth))
    return torch.exp(-sq_distances / h), h


def stein_direction(particles: torch.Tensor, scores: torch.Tensor, bandwidth: Bandwidth = "median") -> torch.Tensor:
    """The SVGD direction for every particle:

        phi(x_i) = 1/M * sum_j [ k(x_j, x_i) * score(x_j) + grad_{x_j} k(x_j, x_i) ]

    where `score(x) = grad log p(x)` of the target density. With the RBF kernel,
    `grad_{x_j} k(x_j, x_i) = 2/h * (x_i - x_j) * k(x_j, x_i)`: the first term moves particles up the
    kernel-smoothed log density, the second pushes them apart. Moving each particle by `+eps * phi` decreases the
    KL divergence from the particles to `p` fastest in the kernel's function space.

    Args:
        particles: `[M, d]` particle positions.
        scores: `[M, d]`, `grad log p` at each particle.
        bandwidth: `"median"` or a fixed `h > 0` (see [`rbf_kernel`]).

    Returns:
        `[M, d]`, `phi(x_i)` for every particle (float32 or wider, whatever the inputs are).
    """
    x = particles.to(_compute_dtype(particles))
    s = scores.to(x.dtype)
    kernel, h = rbf_kernel(x, bandwidth)
    attraction = kernel @ s  # K is symmetric: row i is sum_j k(x_j, x_i) score(x_j)
    # sum_j (x_i - x_j) k_ij, formed without the M x M x d tensor of differences
    repulsion = (2.0 / h) * (kernel.sum(dim=1, keepdim=True) * x - kernel @ x)
    return (attraction + repulsion) / x.shape[0]


def svgd_gradient(
    particles: torch.Tensor,
    loss_grad: torch.Tensor,
    likelihood_scale: float = 1.0,
    prior_scale: Optional[float] = None,
    bandwidth: Bandwidth = "median",
) -> torch.Tensor:
    """The gradient to hand a torch optimizer so that its step moves the particles along the SVGD direction.

    The target is the tempered posterior

        log p(x) = -likelihood_scale * L(x) - ||x||^2 / (2 * prior_scale^2) + const

    where `L(x)` is the mean loss of the examples a particle was given. `loss_grad` is the gradient of a loss that
    averages over all M particles' examples (a minibatch whose rows are shared out among the particles, or the
    mean over particles of `L`), so each particle received `1/M` of its own mean-loss gradient: the score is
    `-likelihood_scale * M * loss_grad - x / prior_scale^2`. The optimizer minimises, so the result is
    `-phi` ([`stein_direction`]). With one particle the kernel terms vanish and this is exactly the gradient of
    `-log p`: plain gradient descent on the (tempered) negative log posterior.

    Args:
        particles: `[M, ...]` particle positions (flattened after the first dimension).
        loss_grad: the gradient of the averaged loss with respect to `particles`, same shape.
        likelihood_scale: the inverse temperature multiplying the mean loss.
        prior_scale: standard deviation of the Gaussian prior `N(0, prior_scale^2 I)`; `None` for a flat prior.
        bandwidth: `"median"` or a fixed `h > 0`.

    Returns:
        The transformed gradient, shaped and typed like `loss_grad`.
    """
    num_particles = particles.shape[0]
    dtype = _compute_dtype(particles)
    x = particles.detach().reshape(num_particles, -1).to(dtype)
    scores = -(likelihood_scale * num_particles) * loss_grad.detach().reshape(num_particles, -1).to(dtype)
    if prior_scale is not None:
        scores = scores - x / prior_scale**2
    phi = stein_direction(x, scores, bandwidth)
    return (-phi).reshape(loss_grad.shape).to(loss_grad.dtype)
