"""Reading one image file as training and ``reconpatch predict`` do, without torch or anomalib.

``reconpatch predict`` imports only this, numpy, PIL and OpenVINO, so on a line PC it does not pay
the memory and start-up time of importing torch and anomalib. Keep this module free of both; the
measurements are in ``docs/design/preflight-and-predict.md``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
"""PIL modes of 16-bit grayscale images (PIL opens some as 32-bit ``I``); ``convert("RGB")`` would clip them."""


class UnreadableImageError(ValueError):
    """Some data files cannot be decoded as images; the message lists them and what to do."""


def image_problem(path: str | Path) -> tuple[str | None, str | None, tuple[int, int] | None]:
    """Decode ``path`` fully and say why it cannot be used, if it cannot.

    Args:
        path (str | Path): Image file.

    Returns:
        tuple[str | None, str | None, tuple[int, int] | None]: The problem in words (the file is missing,
        empty, not an image, or corrupt or truncated) or None for a readable image; the PIL mode; and
        ``(height, width)``. Mode and size are None for an unreadable file.
    """
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
    """Read an image as ``H x W x 3`` float32 in [0, 1], scaling 16-bit grayscale instead of clipping it.

    Other images get anomalib's conversion (``convert("RGB")``, divided by 255), so training, testing and
    ``reconpatch predict`` see the same values; 16-bit grayscale is divided by 65535 and repeated over
    three channels.

    Args:
        path (str | Path): Image file.

    Returns:
        np.ndarray: ``H x W x 3`` float32 array in [0, 1].

    Raises:
        OSError: For a missing, truncated or non-image file; PIL raises other types for some corrupt data.
            :func:`image_problem` names the cause.

    Example:
        >>> image = read_image("datasets/MVTecAD/bottle/train/good/000.png")  # doctest: +SKIP
        >>> image.shape, image.dtype  # doctest: +SKIP
        ((900, 900, 3), dtype('float32'))
    """
    from PIL import Image

    with Image.open(path) as image:
        if image.mode in SIXTEEN_BIT_MODES:
            gray = np.clip(np.asarray(image, dtype=np.float32) / 65535.0, 0.0, 1.0)
            return np.repeat(gray[..., None], 3, axis=2)
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
