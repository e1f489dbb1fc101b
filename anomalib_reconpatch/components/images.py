"""Reading one image file as training and ``reconpatch predict`` do, without torch or anomalib.

``reconpatch predict`` imports only this, numpy, PIL and OpenVINO: on a line PC it then needs a
fraction of the memory and start-up time that importing torch and anomalib costs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


class UnreadableImageError(ValueError):
    """Some data files cannot be decoded as images; the message lists them and what to do."""


def image_problem(path: str | Path) -> tuple[str | None, str | None, tuple[int, int] | None]:
    """Decode ``path`` fully; return (problem or None, PIL mode, (height, width))."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        return "the file does not exist", None, None
    if path.stat().st_size == 0:
        return "the file is empty (0 bytes)", None, None
    try:
        with Image.open(path) as image:
            image.load()
            return None, image.mode, (image.height, image.width)
    except UnidentifiedImageError:
        return "not an image file (unknown format despite its extension)", None, None
    except (OSError, SyntaxError, ValueError) as error:  # PIL's errors for truncated or corrupt data
        return f"corrupt or truncated image ({error})", None, None


def read_image(path: str | Path) -> np.ndarray:
    """``H x W x 3`` float32 in [0, 1]: anomalib's conversion, except 16-bit grayscale is scaled, not clipped."""
    from PIL import Image

    with Image.open(path) as image:
        if image.mode in SIXTEEN_BIT_MODES:
            gray = np.clip(np.asarray(image, dtype=np.float32) / 65535.0, 0.0, 1.0)
            return np.repeat(gray[..., None], 3, axis=2)
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
