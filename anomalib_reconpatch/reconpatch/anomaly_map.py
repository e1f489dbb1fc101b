"""From patch distances to an anomaly map, as in PatchCore.

The map is anomalib's PatchCore generator (nearest upsampling, Gaussian blur sigma=4) with the
blur applied as two 1-D passes, returned as ``B x H x W``. Neither change alters the map's values
(see ``docs/design/anomaly-map.md``). PatchCore's image score is computed in ``torch_model``;
:func:`largest_pixel` is the alternative that reads it off the map (``docs/design/image-score.md``).

Example:
    >>> import torch
    >>> from anomalib_reconpatch.reconpatch.anomaly_map import AnomalyMapGenerator
    >>> generator = AnomalyMapGenerator(sigma=4)
    >>> generator(torch.rand(2, 1, 32, 32), image_size=(256, 256)).shape
    torch.Size([2, 256, 256])
"""

from __future__ import annotations

import torch
from anomalib.models.components.filters import GaussianBlur2d
from anomalib.models.image.patchcore.anomaly_map import AnomalyMapGenerator as PatchcoreAnomalyMapGenerator
from torch.nn import functional as F  # noqa: N812

__all__ = ["AnomalyMapGenerator", "largest_pixel"]


def largest_pixel(maps: torch.Tensor) -> torch.Tensor:
    """Each map's largest value: the image score under ``image_score: map``.

    The blurred map's peak weighs a patch together with its neighbours, so a lone outlying patch
    counts for less than a defect that spans several (``docs/design/image-score.md``).

    Args:
        maps (torch.Tensor): ``B x H x W`` (or ``B x ...``) anomaly maps.

    Returns:
        torch.Tensor: ``B`` image scores.
    """
    return maps.flatten(1).amax(1)


class SeparableGaussianBlur2d(GaussianBlur2d):
    """anomalib's Gaussian blur, run as a column pass then a row pass of its own kernel's factors.

    The 2-D Gaussian is the outer product of its row and column sums, so the output equals the 33x33
    convolution up to rounding with 66 instead of 1,089 multiply-adds per pixel (see
    ``docs/design/anomaly-map.md``). The kernel buffer is anomalib's, so checkpoints keep their keys.
    Takes ``GaussianBlur2d``'s arguments.
    """

    def forward(self, input_tensor: torch.Tensor) -> torch.Tensor:
        """Blur maps with the separable kernel.

        Args:
            input_tensor (torch.Tensor): ``B x C x H x W`` maps, ``C`` the blur's ``channels``.

        Returns:
            torch.Tensor: The blurred maps, padded with ``border_type`` (reflect by default), in the input's shape.
        """
        padded = F.pad(input_tensor, self.padding_shape, mode=self.border_type)
        column = self.kernel.sum(dim=3, keepdim=True)
        row = self.kernel.sum(dim=2, keepdim=True)
        return F.conv2d(F.conv2d(padded, column, groups=self.channels), row, groups=self.channels)


class AnomalyMapGenerator(PatchcoreAnomalyMapGenerator):
    """anomalib's PatchCore anomaly map generator with the separable blur, returning ``B x H x W`` maps.

    ``B x H x W`` is the shape anomalib's batches hold the map in. With PatchCore's ``B x 1 x H x W``
    map, OpenVINO's CPU plugin ran the exported post-processing's element-wise ops in a slow
    channels-last layout, so the map is returned without its channel axis (see
    ``docs/design/anomaly-map.md``).

    Args:
        sigma (int): Standard deviation of the Gaussian blur, in pixels. Defaults to ``4``.

    Example:
        >>> import torch
        >>> from anomalib_reconpatch.reconpatch.anomaly_map import AnomalyMapGenerator
        >>> AnomalyMapGenerator()(torch.rand(1, 1, 28, 28), image_size=(224, 224)).shape
        torch.Size([1, 224, 224])
    """

    def __init__(self, sigma: int = 4) -> None:
        super().__init__(sigma=sigma)
        size = self.blur.kernel.shape[-1]
        self.blur = SeparableGaussianBlur2d(sigma=(sigma, sigma), channels=1, kernel_size=(size, size))

    def forward(
        self, patch_scores: torch.Tensor, image_size: tuple[int, int] | torch.Size | None = None
    ) -> torch.Tensor:
        """Upsample patch scores to the image size and blur them.

        Args:
            patch_scores (torch.Tensor): ``B x 1 x h x w`` nearest-neighbour distances of the patches.
            image_size (tuple[int, int] | torch.Size | None): ``(H, W)`` to upsample to; None keeps
                ``h x w``. Defaults to ``None``.

        Returns:
            torch.Tensor: ``B x H x W`` anomaly maps.
        """
        return self.compute_anomaly_map(patch_scores, image_size)[:, 0]
