"""What every run of one ``reconpatch compare`` shares: the settings and the image shape they give."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class CompareSettings:
    """Everything the runs share, plus ReConPatch-only overrides.

    Attributes:
        data (Path): Datamodule YAML (``class_path`` + ``init_args``).
        out (Path): Output folder of the reports and figures.
        models (list[str]): anomalib model class names, compared in this order.
        backbone (str): timm backbone of every model.
        layers (list[str]): Feature layers of every model.
        coreset_ratio (float): Coreset sampling ratio of every model.
        image_size (int | tuple[int, int]): A side, or (height, width).
        seeds (list[int]): Seeds; every model runs once per seed.
        reconpatch_args (dict[str, Any]): Extra ``ReConPatch`` arguments, e.g. ``{"num_steps": 300}``.
        latency_images (int): Test images that the latency is measured on.
    """

    data: Path
    out: Path
    models: list[str] = field(default_factory=lambda: ["ReConPatch", "Patchcore"])
    backbone: str = "tf_efficientnet_lite0"
    layers: list[str] = field(default_factory=lambda: ["blocks.2", "blocks.4"])
    coreset_ratio: float = 0.1
    image_size: int | tuple[int, int] = 256
    seeds: list[int] = field(default_factory=lambda: [0])
    reconpatch_args: dict[str, Any] = field(default_factory=dict)
    latency_images: int = 16


def image_shape(size: int | Sequence[int]) -> tuple[int, int]:
    """Turn an image size into (height, width): ``256`` or ``(640, 256)``.

    Two values let long, narrow parts keep their aspect ratio.

    Args:
        size (int | Sequence[int]): A side, or a height and a width.

    Returns:
        tuple[int, int]: ``(height, width)``.

    Raises:
        ValueError: If ``size`` is not one or two values, or a side is under 32 pixels.

    Example:
        >>> image_shape(256)
        (256, 256)
        >>> image_shape([640, 256])
        (640, 256)
    """
    shape = (size,) if isinstance(size, int) else tuple(size)
    shape = shape * 2 if len(shape) == 1 else shape
    if len(shape) != 2 or min(shape) < 32:
        msg = f"--image-size {size} is not a side or a height and width of at least 32 pixels (e.g. 256, or 640 256)."
        raise ValueError(msg)
    return shape
