"""From patch distances to an image score and an anomaly map, as in PatchCore.

The map is anomalib's PatchCore generator (nearest upsampling, Gaussian blur sigma=4) with the
blur applied as two 1-D passes; the image score keeps PatchCore's re-weighting of the most
anomalous patch.
"""

from __future__ import annotations

import torch
from anomalib.models.components.filters import GaussianBlur2d
from anomalib.models.image.patchcore.anomaly_map import AnomalyMapGenerator as PatchcoreAnomalyMapGenerator
from torch.nn import functional as F  # noqa: N812

from .similarity import squared_cross_distances

__all__ = ["AnomalyMapGenerator", "reweighted_image_score"]


class SeparableGaussianBlur2d(GaussianBlur2d):
    """anomalib's Gaussian blur, run as a column pass then a row pass of its own kernel's factors.

    The 2-D Gaussian is the outer product of its row and column sums, so the output equals the 33x33
    convolution up to rounding at a fifteenth of the work (the FP32 export ran 1.06x faster,
    benchmarks/ir_timing.py). The kernel buffer is anomalib's, so checkpoints keep their keys.
    """

    def forward(self, input_tensor: torch.Tensor) -> torch.Tensor:
        """Blur ``B x C x H x W`` maps with reflect padding; the output has the input's shape."""
        padded = F.pad(input_tensor, self.padding_shape, mode=self.border_type)
        column = self.kernel.sum(dim=3, keepdim=True)
        row = self.kernel.sum(dim=2, keepdim=True)
        return F.conv2d(F.conv2d(padded, column, groups=self.channels), row, groups=self.channels)


class AnomalyMapGenerator(PatchcoreAnomalyMapGenerator):
    """anomalib's PatchCore anomaly map generator with the separable blur."""

    def __init__(self, sigma: int = 4) -> None:
        super().__init__(sigma=sigma)
        size = self.blur.kernel.shape[-1]
        self.blur = SeparableGaussianBlur2d(sigma=(sigma, sigma), channels=1, kernel_size=(size, size))


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
