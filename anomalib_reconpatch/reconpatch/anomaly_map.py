"""From patch distances to an anomaly map, as in PatchCore.

The map is anomalib's PatchCore generator (nearest upsampling, Gaussian blur sigma=4) with the
blur applied as two 1-D passes. The image score, like PatchCore's, is computed in ``torch_model``.
"""

from __future__ import annotations

import torch
from anomalib.models.components.filters import GaussianBlur2d
from anomalib.models.image.patchcore.anomaly_map import AnomalyMapGenerator as PatchcoreAnomalyMapGenerator
from torch.nn import functional as F  # noqa: N812

__all__ = ["AnomalyMapGenerator"]


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
    """anomalib's PatchCore anomaly map generator with the separable blur, returning ``B x H x W`` maps.

    ``B x H x W`` is the shape anomalib's batches hold the map in. In INT8 graphs OpenVINO's CPU plugin
    ran the post-processing's element-wise ops on PatchCore's ``B x 1 x H x W`` map channels-last, where
    ``Greater`` and ``Select`` took 1.2 ms each (benchmarks/export.py's op profile); on the 3-D map the
    INT8 model ran 1.13x faster (benchmarks/ir_timing.py).
    """

    def __init__(self, sigma: int = 4) -> None:
        super().__init__(sigma=sigma)
        size = self.blur.kernel.shape[-1]
        self.blur = SeparableGaussianBlur2d(sigma=(sigma, sigma), channels=1, kernel_size=(size, size))

    def forward(
        self, patch_scores: torch.Tensor, image_size: tuple[int, int] | torch.Size | None = None
    ) -> torch.Tensor:
        """``B x 1 x h x w`` patch scores -> ``B x H x W`` blurred map at ``image_size``."""
        return self.compute_anomaly_map(patch_scores, image_size)[:, 0]
