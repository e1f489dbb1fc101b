"""What every run of one ``reconpatch compare`` shares: the settings and the image shape they give."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class CompareSettings:
    """Everything the runs share, plus ReConPatch-only overrides; ``image_size`` is a side or (height, width)."""

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
    """``256`` or ``(640, 256)`` -> (height, width): long, narrow parts keep their aspect ratio with two values."""
    shape = (size,) if isinstance(size, int) else tuple(size)
    shape = shape * 2 if len(shape) == 1 else shape
    if len(shape) != 2 or min(shape) < 32:
        msg = f"--image-size {size} is not a side or a height and width of at least 32 pixels (e.g. 256, or 640 256)."
        raise ValueError(msg)
    return shape
