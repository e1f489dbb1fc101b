"""Pseudo-label similarities of ReConPatch, as small pure functions.

The soft targets of the relaxed contrastive loss mix a pairwise similarity (a Gaussian kernel on
squared distances) and a contextual one (shared k-nearest-neighbour sets with query expansion).
All functions take a batch of ``N`` embeddings (or their distances) and return ``N x N`` matrices;
:func:`squared_cross_distances` is also the exportable distance of the memory-bank search. They are
used without gradient: the similarities are targets, computed on the EMA copy of the networks.
"""

from __future__ import annotations

import torch


def squared_cross_distances(queries: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between two sets of rows, through one matmul.

    ``|q|^2 - 2 q.r + |r|^2`` traces to ONNX and OpenVINO, unlike ``torch.cdist``. Rounding can make
    it slightly negative, so it is clamped at 0.

    Args:
        queries (torch.Tensor): ``Q x D`` rows.
        rows (torch.Tensor): ``M x D`` rows.

    Returns:
        torch.Tensor: ``Q x M`` squared distances, all ``>= 0``.
    """
    return (queries.pow(2).sum(-1, keepdim=True) - 2.0 * queries @ rows.T + rows.pow(2).sum(-1)[None, :]).clamp_min(0)


def squared_distances(z: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between all rows of ``z``, symmetric and 0 on the diagonal.

    The rows are centred first: far from the origin, ``|a|^2 - 2 a.b + |b|^2`` cancels to float32
    rounding noise, and four equal rows at 20.6 gave "distances" whose Gaussian similarity was 0.14
    (found by ``tests/test_properties.py``). The matmul is not exactly symmetric, so it is averaged
    with its transpose.

    Args:
        z (torch.Tensor): ``N x D`` embeddings.

    Returns:
        torch.Tensor: ``N x N`` squared distances: symmetric, ``>= 0``, exactly 0 on the diagonal.
    """
    centred = z - z.mean(dim=0, keepdim=True)
    sq = squared_cross_distances(centred, centred)
    return (0.5 * (sq + sq.T)).fill_diagonal_(0.0)


def nearest_neighbours(sq_dist: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each point's ``k + 1`` nearest points, itself first: one ``topk`` for the bandwidth and both neighbourhoods.

    Args:
        sq_dist (torch.Tensor): ``N x N`` squared distances with 0 on the diagonal.
        k (int): Neighbours besides the point itself; clamped to ``N - 1``.

    Returns:
        tuple[torch.Tensor, torch.Tensor]: ``N x (k + 1)`` squared distances, ascending (the first
        column is -1, the point itself), and the points' indices. Each point is ranked first among its
        own neighbours, even among exact duplicates.
    """
    k = min(k, sq_dist.shape[0] - 1)
    self_first = sq_dist.clone().fill_diagonal_(-1.0)
    return self_first.topk(k + 1, dim=1, largest=False)


def knn_bandwidth(sq_dist: torch.Tensor, k: int) -> torch.Tensor:
    """Mean squared distance from each point to its ``k``-th nearest other point.

    ReConPatch's ``sigma`` is given in units of this value, so that the pairwise
    similarity means the same on any feature scale: the k-th neighbour of a typical
    patch gets ``exp(-1/sigma)`` whatever the backbone or its layer norms
    (see ``docs/design/sigma-units.md``).

    Args:
        sq_dist (torch.Tensor): ``N x N`` squared distances with 0 on the diagonal.
        k (int): Neighbour rank; clamped to ``N - 1``.

    Returns:
        torch.Tensor: Scalar bandwidth, clamped to the dtype's smallest positive value so that it
        can divide.
    """
    return bandwidth_of(nearest_neighbours(sq_dist, k)[0])


def bandwidth_of(nearest_sq: torch.Tensor) -> torch.Tensor:
    """:func:`knn_bandwidth` from the distances that :func:`nearest_neighbours` returns.

    Args:
        nearest_sq (torch.Tensor): ``N x (k + 1)`` ascending squared distances, the point itself first.

    Returns:
        torch.Tensor: The mean of the last column, clamped to the dtype's smallest positive value.
    """
    return nearest_sq[:, -1].mean().clamp_min(torch.finfo(nearest_sq.dtype).tiny)


def pairwise_similarity(sq_dist: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """Pairwise similarity ``w^P``: a Gaussian kernel on squared distances.

    ``w^P_ij = exp(-||z_i - z_j||^2 / sigma)``.

    Args:
        sq_dist (torch.Tensor): ``N x N`` squared distances.
        sigma (float | torch.Tensor): Kernel width, in the units of ``sq_dist``
            (:func:`pseudo_labels` passes ``sigma * knn_bandwidth``).

    Returns:
        torch.Tensor: ``N x N`` similarities in ``(0, 1]``, 1 on the diagonal.
    """
    return torch.exp(-sq_dist / sigma)


def knn_indicator(sq_dist: torch.Tensor, k: int) -> torch.Tensor:
    """Indicator matrix of each point's ``k`` nearest neighbours, the point itself included.

    ``M_ij = 1`` if ``j`` is among the ``k`` nearest neighbours of ``i``, else 0. Each point is ranked
    first among its own neighbours, even among exact duplicates.

    Args:
        sq_dist (torch.Tensor): ``N x N`` squared distances.
        k (int): Neighbourhood size; clamped to ``N``.

    Returns:
        torch.Tensor: ``N x N`` matrix of 0s and 1s with ``k`` ones per row, in ``sq_dist``'s dtype.
    """
    idx = nearest_neighbours(sq_dist, k - 1)[1]
    return torch.zeros_like(sq_dist).scatter_(1, idx, 1.0)


def contextual_similarity(sq_dist: torch.Tensor, k: int) -> torch.Tensor:
    """Contextual similarity ``w^C`` from shared k-nearest-neighbour sets, with query expansion.

    Two patches are similar in context when their neighbourhoods overlap, whatever their distance:
    ``w~_ij = |N_k(i) & N_k(j)| / |N_k(i)|`` for ``j`` in ``N_k(i)`` (else 0); then each row is
    averaged over the reciprocal neighbours ``R_{k/2}(i)`` of ``i``; finally symmetrised.
    A point counts as its own nearest neighbour, so ``R_{k/2}(i)`` always holds ``i``.

    Args:
        sq_dist (torch.Tensor): ``N x N`` squared distances.
        k (int): Neighbourhood size; the reciprocal neighbours use ``max(1, k // 2)``.

    Returns:
        torch.Tensor: ``N x N`` symmetric similarities in ``[0, 1]``.

    Example:
        Two separated pairs of points: full similarity within each pair, none across.

        >>> import torch
        >>> from anomalib_reconpatch.reconpatch.similarity import contextual_similarity, squared_distances
        >>> points = torch.tensor([[0.0], [1.0], [10.0], [11.0]])
        >>> contextual_similarity(squared_distances(points), k=2)
        tensor([[1., 1., 0., 0.],
                [1., 1., 0., 0.],
                [0., 0., 1., 1.],
                [0., 0., 1., 1.]])
    """
    return contextual_from_neighbours(nearest_neighbours(sq_dist, k - 1)[1], sq_dist.dtype)


def contextual_from_neighbours(neighbours: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """:func:`contextual_similarity` from each point's nearest-neighbour indices, itself first.

    Works on the ``N x k`` index lists rather than ``N x N`` indicator matrices: the overlaps are
    counted only for the ``k`` neighbours where ``w~`` can be non-zero, and the query expansion averages
    at most ``k // 2`` rows, so the two ``N x N x N`` products of the matrix form (most of a training
    step's time at 512 patches) become gathers.

    Args:
        neighbours (torch.Tensor): ``N x k`` indices of each point's nearest points, ascending by
            distance, the point itself first (as :func:`nearest_neighbours` returns them).
        dtype (torch.dtype): Of the result. Defaults to ``torch.float32``.

    Returns:
        torch.Tensor: ``N x N`` symmetric similarities in ``[0, 1]``.
    """
    n, k = neighbours.shape
    of_neighbours = neighbours[neighbours]  # N x k x k: the neighbourhood of each neighbour
    shared = (of_neighbours[:, :, :, None] == neighbours[:, None, None, :]).sum(dim=(2, 3))
    w_tilde = torch.zeros(n, n, dtype=dtype, device=neighbours.device)
    w_tilde.scatter_(1, neighbours, shared.to(dtype) / k)
    half = neighbours[:, : max(1, k // 2)]
    reciprocal = (half[half] == torch.arange(n, device=neighbours.device)[:, None, None]).any(dim=2).to(dtype)
    w_hat = (w_tilde[half] * reciprocal[:, :, None]).sum(dim=1) / reciprocal.sum(dim=1, keepdim=True)
    return 0.5 * (w_hat + w_hat.T)


# The units the pairwise kernel width can be given in, and the width that ``sigma: null`` stands for in
# each (docs/design/sigma-units.md).
DEFAULT_SIGMA = {"knn": 1.0, "normalized": 0.1}
SIGMA_UNITS = tuple(DEFAULT_SIGMA)


@torch.no_grad()
def pseudo_labels(z_target: torch.Tensor, k: int, alpha: float, sigma: float, sigma_unit: str = "knn") -> torch.Tensor:
    """Pseudo-labels of a batch: the mixed similarity ``w = alpha * w^P + (1 - alpha) * w^C``.

    Computed on the EMA target projections, in float32 and without gradient. With ``sigma_unit``
    ``knn`` the pairwise kernel's width is ``sigma`` times :func:`knn_bandwidth`, so the weights do not
    depend on the features' scale (see ``docs/design/sigma-units.md``); with ``normalized`` the
    projections are scaled to unit length first and ``sigma`` is absolute, as in STML's reference code
    (squared distances then lie in ``[0, 4]``).

    Args:
        z_target (torch.Tensor): ``N x E`` target projections ``g'(f'(x))``.
        k (int): Neighbourhood size of the contextual similarity and of the bandwidth.
        alpha (float): Weight of the pairwise similarity; ``1 - alpha`` goes to the contextual one.
        sigma (float): Pairwise kernel width, in units of :func:`knn_bandwidth` or absolute.
        sigma_unit (str): ``knn`` or ``normalized``, as above. Defaults to ``"knn"``.

    Returns:
        torch.Tensor: ``N x N`` symmetric pseudo-labels in ``[0, 1]``.

    Example:
        Three points at equal distances. With ``k=1`` the contextual term is the identity (a
        point's only neighbour is itself), and every pair lies at the bandwidth (the squared distance
        to the nearest other point), so its pairwise term is ``exp(-1/sigma)`` at any scale:

        >>> import torch
        >>> from anomalib_reconpatch.reconpatch.similarity import pseudo_labels
        >>> z = torch.eye(3)
        >>> w = pseudo_labels(z, k=1, alpha=0.5, sigma=1.0)
        >>> w
        tensor([[1.0000, 0.1839, 0.1839],
                [0.1839, 1.0000, 0.1839],
                [0.1839, 0.1839, 1.0000]])
        >>> torch.allclose(pseudo_labels(10 * z, k=1, alpha=0.5, sigma=1.0), w)
        True

        On unit-length projections a fixed ``sigma`` gives the same pairs ``exp(-2/sigma)``:

        >>> pseudo_labels(10 * z, k=1, alpha=1.0, sigma=2.0, sigma_unit="normalized")[0]
        tensor([1.0000, 0.3679, 0.3679])
    """
    sq_dist, nearest, width = labelling_space(z_target, k, sigma, sigma_unit)
    pairwise = pairwise_similarity(sq_dist, width)
    return alpha * pairwise + (1.0 - alpha) * contextual_from_neighbours(nearest[:, :k], sq_dist.dtype)


def labelling_space(
    z_target: torch.Tensor, k: int, sigma: float, sigma_unit: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The squared distances that :func:`pseudo_labels` works on, each point's neighbours and the kernel width.

    Args:
        z_target (torch.Tensor): ``N x E`` target projections.
        k (int): Neighbourhood size.
        sigma (float): Pairwise kernel width, in units of :func:`knn_bandwidth` or absolute.
        sigma_unit (str): ``knn`` or ``normalized`` (the projections scaled to unit length first).

    Returns:
        tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ``N x N`` float32 squared distances, the
        ``N x (k + 1)`` indices of each point's nearest points (itself first), and the kernel width.

    Raises:
        ValueError: If ``sigma_unit`` is not one of ``SIGMA_UNITS``.
    """
    if sigma_unit not in SIGMA_UNITS:
        msg = f"sigma_unit must be one of {SIGMA_UNITS}, got {sigma_unit!r}"
        raise ValueError(msg)
    z = z_target.float()
    normalized = sigma_unit == "normalized"
    sq_dist = squared_distances(torch.nn.functional.normalize(z, dim=1) if normalized else z)
    nearest_sq, nearest = nearest_neighbours(sq_dist, k)
    width = torch.tensor(sigma) if normalized else sigma * bandwidth_of(nearest_sq)
    return sq_dist, nearest, width
