"""Pseudo-label similarities of ReConPatch, as small pure functions.

All functions take a batch of ``N`` embeddings (or their distances) and return
``N x N`` matrices. They are used without gradient: the similarities are targets,
computed on the EMA copy of the networks.
"""

from __future__ import annotations

import torch


def squared_cross_distances(queries: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``Q x M`` squared distances through one matmul (exportable, unlike ``cdist``), clamped at 0."""
    return (queries.pow(2).sum(-1, keepdim=True) - 2.0 * queries @ rows.T + rows.pow(2).sum(-1)[None, :]).clamp_min(0)


def squared_distances(z: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between all rows of ``z`` (``N x D`` -> ``N x N``): symmetric, 0 on the diagonal.

    The rows are centred first: far from the origin, ``|a|^2 - 2 a.b + |b|^2`` cancels to float32
    rounding noise, and four equal rows at 20.6 gave "distances" whose Gaussian similarity was 0.14
    (found by tests/test_properties.py). The matmul is not exactly symmetric, so it is averaged with
    its transpose.
    """
    centred = z - z.mean(dim=0, keepdim=True)
    sq = squared_cross_distances(centred, centred)
    return (0.5 * (sq + sq.T)).fill_diagonal_(0.0)


def knn_bandwidth(sq_dist: torch.Tensor, k: int) -> torch.Tensor:
    """Mean squared distance from each point to its ``k``-th nearest other point.

    ReConPatch's ``sigma`` is given in units of this value, so that the pairwise
    similarity means the same on any feature scale: the k-th neighbour of a typical
    patch gets ``exp(-1/sigma)`` whatever the backbone or its layer norms.
    """
    k = min(k, sq_dist.shape[0] - 1)
    kth = sq_dist.topk(k + 1, dim=1, largest=False).values[:, k]
    return kth.mean().clamp_min(torch.finfo(sq_dist.dtype).tiny)


def pairwise_similarity(sq_dist: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """Gaussian kernel on squared distances: ``w^P_ij = exp(-||z_i - z_j||^2 / sigma)``."""
    return torch.exp(-sq_dist / sigma)


def knn_indicator(sq_dist: torch.Tensor, k: int) -> torch.Tensor:
    """``M_ij = 1`` if ``j`` is among the ``k`` nearest neighbours of ``i`` (``i`` itself included), else 0."""
    k = min(k, sq_dist.shape[0])
    self_first = sq_dist.clone().fill_diagonal_(-1.0)  # i stays in N_k(i) even among exact duplicates
    idx = self_first.topk(k, dim=1, largest=False).indices
    return torch.zeros_like(sq_dist).scatter_(1, idx, 1.0)


def contextual_similarity(sq_dist: torch.Tensor, k: int) -> torch.Tensor:
    """Contextual similarity ``w^C`` from shared k-nearest-neighbour sets, with query expansion.

    ``w~_ij = |N_k(i) & N_k(j)| / |N_k(i)|`` for ``j`` in ``N_k(i)`` (else 0); then each row is
    averaged over the reciprocal neighbours ``R_{k/2}(i)`` of ``i``; finally symmetrised.
    A point counts as its own nearest neighbour, so ``R_{k/2}(i)`` always holds ``i``.
    """
    neighbours = knn_indicator(sq_dist, k)
    shared = neighbours @ neighbours.T
    w_tilde = shared / neighbours.sum(dim=1, keepdim=True) * neighbours
    half = knn_indicator(sq_dist, max(1, k // 2))
    reciprocal = half * half.T
    w_hat = (reciprocal @ w_tilde) / reciprocal.sum(dim=1, keepdim=True)
    return 0.5 * (w_hat + w_hat.T)


@torch.no_grad()
def pseudo_labels(z_target: torch.Tensor, k: int, alpha: float, sigma: float) -> torch.Tensor:
    """Mixed similarity ``w = alpha * w^P + (1 - alpha) * w^C`` on target projections, without gradient."""
    sq_dist = squared_distances(z_target.float())
    pairwise = pairwise_similarity(sq_dist, sigma * knn_bandwidth(sq_dist, k))
    return alpha * pairwise + (1.0 - alpha) * contextual_similarity(sq_dist, k)
