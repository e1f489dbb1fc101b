"""From patch distances to an image score and an anomaly map, as in PatchCore.

The map reuses anomalib's PatchCore generator (nearest upsampling, Gaussian blur sigma=4);
the image score keeps PatchCore's re-weighting of the most anomalous patch.
"""

from __future__ import annotations

import torch
from anomalib.models.image.patchcore.anomaly_map import AnomalyMapGenerator
from torch.nn import functional as F  # noqa: N812

from .similarity import squared_cross_distances

__all__ = ["AnomalyMapGenerator", "reweighted_image_score"]


def reweighted_image_score(
    patch_scores: torch.Tensor,
    embedding: torch.Tensor,
    memory_bank: torch.Tensor,
    num_neighbors: int,
) -> torch.Tensor:
    """PatchCore's image score: the largest patch distance, damped when its bank neighbour is isolated.

    The top patch's nearest bank row is searched here, for that patch alone: the patch search
    returns distances only.

    Args:
        patch_scores: ``B x P`` nearest-neighbour distances.
        embedding: ``B x P x D`` patch embeddings.
        memory_bank: ``M x D`` bank.
        num_neighbors: support size; 1 returns the plain maximum.

    """
    max_scores, max_patches = patch_scores.max(dim=1)
    if num_neighbors <= 1:
        return max_scores
    batch = torch.arange(patch_scores.shape[0], device=patch_scores.device)
    max_features = embedding[batch, max_patches]
    bank_neighbour = memory_bank[squared_cross_distances(max_features, memory_bank).argmin(dim=1)]
    support_size = min(num_neighbors, memory_bank.shape[0])
    support = squared_cross_distances(bank_neighbour, memory_bank).topk(support_size, dim=1, largest=False).indices
    support_dist = (max_features[:, None, :] - memory_bank[support]).pow(2).sum(-1).clamp_min(0).sqrt()
    weights = 1.0 - F.softmax(support_dist, dim=1)[:, 0]
    return weights * max_scores
