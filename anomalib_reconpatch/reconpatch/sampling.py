"""How representation training draws its mini-batches of patches, as small pure functions.

``uniform`` draws every patch of a batch independently from all training patches, as the
first version did. In a batch of 512 drawn from 200,000 patches, a patch's k nearest batch
neighbours are rarely its real neighbours, so the contextual similarity (shared neighbour sets)
has almost nothing to measure (``docs/design/training-analysis.md``). ``neighbors`` builds each
batch from groups of nearest neighbours instead, as STML's reference code does: a few anchor
patches, each with its closest patches from a larger random pool, measured in the target
network's space.
"""

from __future__ import annotations

import torch

from .similarity import squared_cross_distances

BATCH_SAMPLINGS = ("uniform", "neighbors")
NEIGHBOR_POOL = 16384  # patches searched for each step's neighbour groups: 32 times a 512 batch's density


def neighbor_groups(
    pool: torch.Tensor, batch_size: int, group: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Indices into ``pool`` of a batch made of nearest-neighbour groups.

    ``batch_size // group`` anchors are drawn without replacement; each brings itself and its
    ``group - 1`` nearest pool rows. A row that two groups share appears once, and the batch is
    topped up with distinct random rows, so it holds ``batch_size`` distinct rows (or the whole pool
    when it is smaller).

    Args:
        pool (torch.Tensor): ``P x D`` embedded candidate patches.
        batch_size (int): Rows in the batch.
        group (int): Rows in each anchor's group, the anchor included; at least 1.
        generator (torch.Generator | None): Random source; None uses torch's global one.
            Defaults to ``None``.

    Returns:
        torch.Tensor: ``min(batch_size, P)`` distinct indices into ``pool``, grouped rows first.

    Example:
        Two clusters of three points; groups of three keep each cluster together:

        >>> import torch
        >>> from anomalib_reconpatch.reconpatch.sampling import neighbor_groups
        >>> pool = torch.tensor([[0.0], [0.1], [0.2], [10.0], [10.1], [10.2]])
        >>> batch = neighbor_groups(pool, batch_size=3, group=3, generator=torch.Generator().manual_seed(0))
        >>> sorted(batch.tolist()) in ([0, 1, 2], [3, 4, 5])
        True
    """
    size = pool.shape[0]
    if batch_size >= size:
        return torch.randperm(size, generator=generator, device=pool.device)
    group = max(1, min(group, batch_size))
    anchors = torch.randperm(size, generator=generator, device=pool.device)[: max(1, batch_size // group)]
    distances = squared_cross_distances(pool[anchors], pool)
    distances[torch.arange(len(anchors), device=pool.device), anchors] = -1.0  # an anchor heads its own group
    grouped = distances.topk(group, dim=1, largest=False).indices.reshape(-1)
    chosen = torch.zeros(size, dtype=torch.bool, device=pool.device)
    chosen[grouped] = True
    first = torch.unique(grouped)
    missing = batch_size - len(first)
    rest = torch.randperm(size, generator=generator, device=pool.device)
    rest = rest[~chosen[rest]][:missing]
    return torch.cat([first, rest])
