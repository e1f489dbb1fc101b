"""An antialiased bilinear resize that exports to ONNX and OpenVINO exactly, and the pre-processor that uses it.

anomalib trains and tests with torchvision's ``Resize(antialias=True)``, but exports the graph with
antialiasing switched off (``get_exportable_transform``), because ONNX has no antialiased resize. For
any image larger than the model's input (nearly every real image) the exported model then sees other
pixels than the PyTorch model did, and its scores drift: up to 2.5e-2 of the score range on MVTec AD
bottle at 320 px. Here the same antialiased resize is written as two matrix products, whose weights
are computed in the graph from the input's own size, so one exported graph serves every image size
and gives torch's pixels to float rounding. Training and testing keep torchvision's resize untouched.

Example:
    >>> import torch
    >>> from torch.nn import functional as F
    >>> images = torch.rand(1, 3, 320, 333)
    >>> exact = F.interpolate(images, size=(256, 256), mode="bilinear", antialias=True)
    >>> torch.allclose(antialiased_resize(images, (256, 256)), exact, atol=1e-5)
    True
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from anomalib.data.transforms import ExportableCenterCrop
from anomalib.pre_processing import PreProcessor
from torchvision.transforms.v2 import CenterCrop, Compose, InterpolationMode, Resize, Transform


def resize_weights(source: torch.Tensor, out_size: int) -> torch.Tensor:
    """The ``(out_size, len(source))`` matrix of antialiased bilinear weights along one axis.

    Output pixel ``i`` is centred at ``(i + 0.5) * scale`` in input pixels, ``scale = in / out``. Input
    pixel ``j`` (centre ``j + 0.5``) weighs ``max(0, 1 - |j + 0.5 - centre| / max(scale, 1))``, and each
    row is normalised to sum to 1: PyTorch's ``interpolate(..., antialias=True)`` (bilinear, half-pixel
    centres), whose triangle widens with the shrink factor so that every input pixel counts. When
    enlarging, this is plain bilinear interpolation with the border clamped.

    Args:
        source (torch.Tensor): ``arange(in_size)`` as floats; the input size is read from it rather than
            from a Python number, so that an exported graph computes the weights for each input.
        out_size (int): Number of output pixels.

    Returns:
        torch.Tensor: Row-normalised weights, shape ``(out_size, in_size)``.
    """
    in_size = source[-1:] + 1
    scale = in_size / out_size
    centres = (torch.arange(out_size, dtype=source.dtype, device=source.device) + 0.5) * scale
    width = torch.clamp(scale, min=1.0)
    weights = torch.clamp(1 - torch.abs(source[None, :] + 0.5 - centres[:, None]) / width, min=0.0)
    return weights / weights.sum(dim=1, keepdim=True)


def antialiased_resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize ``(..., height, width)`` images to ``size`` as torchvision's antialiased bilinear ``Resize`` does.

    Args:
        images (torch.Tensor): Float images, the last two dimensions height and width.
        size (tuple[int, int]): ``(height, width)`` of the result.

    Returns:
        torch.Tensor: The resized images, same dtype.
    """
    rows = torch.arange(images.shape[-2], dtype=images.dtype, device=images.device)
    columns = torch.arange(images.shape[-1], dtype=images.dtype, device=images.device)
    resized = torch.matmul(images, resize_weights(columns, size[1]).transpose(0, 1))
    return torch.matmul(resize_weights(rows, size[0]), resized)


class ExportableResize(Transform):
    """torchvision's antialiased bilinear ``Resize`` to a fixed ``(height, width)``, in operations ONNX exports.

    Args:
        size (tuple[int, int] | list[int]): ``(height, width)`` of the result.
    """

    def __init__(self, size: tuple[int, int] | list[int]) -> None:
        super().__init__()
        self.size = (int(size[0]), int(size[1]))

    def forward(self, *inputs: Any) -> Any:
        """Resize one batch of float images (the exported pre-processor's only input).

        Args:
            *inputs (Any): A single ``(..., height, width)`` float tensor.

        Returns:
            Any: The resized tensor.
        """
        return antialiased_resize(inputs[0], self.size)


def exact_resize(resize: Resize) -> bool:
    """Whether ``resize`` is one that :class:`ExportableResize` reproduces: bilinear, antialiased, fixed size.

    Args:
        resize (Resize): A torchvision resize.

    Returns:
        bool: True for an antialiased bilinear resize to ``(height, width)`` with no ``max_size``.
    """
    fixed = isinstance(resize.size, list | tuple) and len(resize.size) == 2 and resize.max_size is None
    bilinear = InterpolationMode(resize.interpolation) == InterpolationMode.BILINEAR
    return fixed and bilinear and resize.antialias is not False


def exportable_transform(transform: Transform | None) -> Transform | None:
    """A copy of ``transform`` for export: antialiased bilinear resizes kept exact, centre crops made exportable.

    anomalib's ``get_exportable_transform`` switches antialiasing off instead, which changes the pixels
    of every shrunk image. Other resizes are left as anomalib leaves them.

    Args:
        transform (Transform | None): The pre-processor's training and test transform.

    Returns:
        Transform | None: The transform for the exported graph.
    """
    if transform is None:
        return None
    if isinstance(transform, Resize):
        if exact_resize(transform):
            return ExportableResize(transform.size)
        exported = copy.deepcopy(transform)
        exported.antialias = False
        return exported
    if isinstance(transform, CenterCrop):
        return ExportableCenterCrop(size=transform.size)
    if isinstance(transform, Compose):
        return Compose([exportable_transform(step) for step in transform.transforms])
    return copy.deepcopy(transform)


class ExactExportPreProcessor(PreProcessor):
    """anomalib's ``PreProcessor`` whose exported graph resizes as training did (see :func:`exportable_transform`).

    The transform itself, and so every PyTorch result and the checkpoint, is anomalib's.

    Args:
        transform (Transform | None): Transform applied in training, test and prediction. Defaults to ``None``.
    """

    def __init__(self, transform: Transform | None = None) -> None:
        super().__init__(transform)
        self.export_transform = exportable_transform(transform)

    def load_checkpoint_config(self, config: dict[str, Any]) -> None:
        """Restore the checkpoint's transform and derive the exported one from it.

        Args:
            config (dict[str, Any]): What :meth:`checkpoint_config` wrote.
        """
        super().load_checkpoint_config(config)
        self.export_transform = exportable_transform(self.transform)
