"""Relaxed contrastive loss of ReConPatch.

The loss trains the representation on soft pseudo-labels instead of hard positive and negative
pairs: each pair is pulled together in proportion to its similarity ``w_ij`` and pushed apart to the
margin in proportion to ``1 - w_ij``, both on distances relative to each anchor's mean distance.
"""

from __future__ import annotations

import torch
from torch import nn

from .similarity import squared_distances


def relaxed_contrastive_loss(z: torch.Tensor, weights: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Relaxed contrastive loss of a batch of projections against soft pseudo-labels.

    ``L = 1/N sum_i sum_{j != i} [w_ij d_ij^2 + (1 - w_ij) max(0, m - d_ij)^2]``, where ``d_ij`` is the
    relative distance ``||z_i - z_j|| / mean_{n != i} ||z_i - z_n||``, which makes the margin
    independent of the embedding's scale. Pairs ``j = i`` are left out: their distance is zero and its
    gradient undefined. Gradients flow only through ``z``; ``weights`` is a target and is detached.

    The loss and its gradient are computed together, in closed form (:class:`_RelaxedContrastive`):
    autograd through :func:`relaxed_contrastive_pairs` gives the same up to rounding, with about twice
    the passes over the ``N x N`` matrices, which dominate a training step.

    Args:
        z (torch.Tensor): ``N x E`` online projections ``g(f(x))``.
        weights (torch.Tensor): ``N x N`` pseudo-labels ``w_ij`` in ``[0, 1]`` (see
            :func:`~anomalib_reconpatch.reconpatch.similarity.pseudo_labels`).
        margin (float): Margin ``m`` on the relative distances. Defaults to ``1.0``.

    Returns:
        torch.Tensor: The scalar loss ``L``.

    Example:
        Two points at relative distance 1: a similar pair costs its squared distance, a dissimilar
        pair already at the margin costs nothing.

        >>> import torch
        >>> from anomalib_reconpatch.reconpatch.loss import relaxed_contrastive_loss
        >>> z = torch.eye(2)
        >>> relaxed_contrastive_loss(z, torch.ones(2, 2))
        tensor(1.)
        >>> relaxed_contrastive_loss(z, torch.zeros(2, 2))
        tensor(0.)
    """
    return _RelaxedContrastive.apply(z, weights.detach(), margin)


def relaxed_contrastive_pairs(
    z: torch.Tensor, weights: torch.Tensor, margin: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-pair pull and push terms of :func:`relaxed_contrastive_loss`, zero on the diagonal.

    Their sum over all pairs, divided by ``N``, is the loss; apart, they show whether a loss moves
    because similar pairs drift apart (pull) or dissimilar pairs come inside the margin (push).

    Args:
        z (torch.Tensor): ``N x E`` online projections ``g(f(x))``.
        weights (torch.Tensor): ``N x N`` pseudo-labels ``w_ij`` in ``[0, 1]``; detached.
        margin (float): Margin ``m`` on the relative distances. Defaults to ``1.0``.

    Returns:
        tuple[torch.Tensor, torch.Tensor]: ``N x N`` terms ``w_ij d_ij^2`` and ``(1 - w_ij) max(0, m - d_ij)^2``.

    Example:
        >>> import torch
        >>> from anomalib_reconpatch.reconpatch.loss import relaxed_contrastive_pairs
        >>> pull, push = relaxed_contrastive_pairs(torch.eye(2), torch.full((2, 2), 0.5), margin=2.0)
        >>> pull
        tensor([[0.0000, 0.5000],
                [0.5000, 0.0000]])
        >>> push
        tensor([[0.0000, 0.5000],
                [0.5000, 0.0000]])
    """
    n = z.shape[0]
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=z.device)
    sq = squared_distances(z)
    dist = torch.where(off_diagonal, sq, torch.ones_like(sq)).clamp_min(1e-12).sqrt() * off_diagonal
    mean_dist = dist.sum(dim=1, keepdim=True) / max(n - 1, 1)
    rel = dist / mean_dist.clamp_min(1e-12)
    weights = weights.detach()
    pull = weights * rel.pow(2)
    push = (1.0 - weights) * (margin - rel).clamp_min(0.0).pow(2)
    return pull * off_diagonal, push * off_diagonal


def loss_terms(
    sq: torch.Tensor, w: torch.Tensor, rows: slice, margin: float, with_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The loss terms of the rows ``rows`` and, with ``with_grad``, their rows of ``H`` (:class:`_RelaxedContrastive`).

    Every quantity up to ``H`` depends on its own row only, so a block of rows gives the same numbers as
    all of them; ``benchmarks/loss_halves.py`` computes two blocks on two threads.

    Args:
        sq (torch.Tensor): ``N x N`` squared distances of the projections, zero on the diagonal; the rows
            ``rows`` are overwritten.
        w (torch.Tensor): ``N x N`` pseudo-labels.
        rows (slice): The rows, ``a:b`` with a step of 1.
        margin (float): Margin ``m`` on the relative distances.
        with_grad (bool): Whether to compute ``H``.

    Returns:
        tuple[torch.Tensor, torch.Tensor | None]: The rows' pull-plus-push terms, zero on the diagonal, and
        their rows of ``H`` (None without ``with_grad``).
    """
    n = sq.shape[0]
    own = torch.arange(rows.stop - rows.start, device=sq.device), torch.arange(rows.start, rows.stop, device=sq.device)
    zero = torch.zeros((), dtype=sq.dtype, device=sq.device)
    block = sq[rows]
    moving = block > 1e-12  # the distances whose clamp lets a gradient through; never the diagonal
    dist = block.clamp_min_(1e-12).sqrt_().index_put_(own, zero)
    mean = dist.sum(dim=1, keepdim=True) / max(n - 1, 1)
    scale = mean.clamp_min(1e-12)
    rel = dist / scale
    gap = (margin - rel).clamp_min_(0.0)
    like = w[rows]
    unlike = 1.0 - like
    terms = (like * rel.square() + unlike * gap.square()).index_put_(own, zero)
    if not with_grad:
        return terms, None
    slope = (like * rel).sub_(unlike * gap).mul_(2.0).index_put_(own, zero)  # phi'
    inner = (slope * rel).sum(dim=1, keepdim=True) / max(n - 1, 1)
    inner = torch.where(mean > 1e-12, inner, 0.0)  # a clamped mean is a constant
    return terms, (slope - inner).div_(n * scale).div_(2.0 * dist.clamp_min(1e-12)).mul_(moving)


class _RelaxedContrastive(torch.autograd.Function):
    """:func:`relaxed_contrastive_loss` with its gradient with respect to ``z`` in closed form.

    With ``d_ij`` the distances, ``mu_i`` the row means over ``j != i``, ``r_ij = d_ij / mu_i`` and
    ``phi'_ij = 2 w_ij r_ij - 2 (1 - w_ij) max(0, m - r_ij)``, the loss's derivative by ``d_ij`` is
    ``G_ij = (phi'_ij - sum_k phi'_ik r_ik / (N - 1)) / (N mu_i)``. Through ``d_ij^2 = ||z_i - z_j||^2``,
    with ``H_ij = G_ij / (2 d_ij)`` and ``S = H + H^T``, the gradient of row ``i`` is
    ``2 sum_j S_ij (z_i - z_j)``. Where the reference clamps (zero distances, a zero row mean) no
    gradient flows, as in autograd.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, z: torch.Tensor, w: torch.Tensor, margin: float
    ) -> torch.Tensor:
        n = z.shape[0]
        terms, h = loss_terms(squared_distances(z), w, slice(0, n), margin, ctx.needs_input_grad[0])
        loss = terms.sum() / n
        if h is not None:
            s = h + h.T
            centred = z - z.mean(dim=0, keepdim=True)
            grad = 2.0 * (s.sum(dim=1, keepdim=True) * centred - s @ centred)
            ctx.save_for_backward(grad - grad.mean(dim=0, keepdim=True))
        return loss

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: torch.Tensor) -> tuple:
        (grad,) = ctx.saved_tensors
        return grad_loss * grad, None, None


class RelaxedContrastiveLoss(nn.Module):
    """Module form of :func:`relaxed_contrastive_loss`, holding the margin.

    Args:
        margin (float): Margin ``m`` on the relative distances. Defaults to ``1.0``.
    """

    def __init__(self, margin: float = 1.0) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Loss of online projections ``z`` against pseudo-label ``weights``.

        Args:
            z (torch.Tensor): ``N x E`` online projections.
            weights (torch.Tensor): ``N x N`` pseudo-labels in ``[0, 1]``, used as a target.

        Returns:
            torch.Tensor: The scalar loss.
        """
        return relaxed_contrastive_loss(z, weights, self.margin)
