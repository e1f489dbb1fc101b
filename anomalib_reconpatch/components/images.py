"""Reading one image file as training and ``reconpatch predict`` do, without torch or anomalib.

``reconpatch predict`` imports only this, numpy, PIL and OpenVINO, so on a line PC it does not pay
the memory and start-up time of importing torch and anomalib. Keep this module free of both; the
measurements are in ``docs/design/preflight-and-predict.md``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
"""File suffixes (lower case) read as images by ``reconpatch predict`` and looked at by the data checks."""

SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
"""PIL modes of 16-bit grayscale images (PIL opens some as 32-bit ``I``); ``convert("RGB")`` would clip them."""


class UnreadableImageError(ValueError):
    """Some data files cannot be decoded as images; the message lists them and what to do."""


EXIF_ORIENTATION = 0x0112
"""The EXIF tag that says how a camera's image must be turned to show upright; 1 (or none) is as stored."""


class ImageInfo(NamedTuple):
    """What a full decode of a file found (see :func:`image_problem`).

    Attributes:
        problem (str | None): Why the file cannot be used, in words, or None for a readable image.
        mode (str | None): The PIL mode, or None for an unreadable file.
        size (tuple[int, int] | None): ``(height, width)`` as the image is shown (EXIF orientation
            applied), or None for an unreadable file.
        turned (bool): Whether an EXIF orientation tag turns or mirrors the stored pixels.
    """

    problem: str | None
    mode: str | None = None
    size: tuple[int, int] | None = None
    turned: bool = False


def orientation(image: Any) -> int:
    """The EXIF orientation of an open PIL image: 1 (as stored) when it has none or an invalid one."""
    value = image.getexif().get(EXIF_ORIENTATION, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def image_problem(path: str | Path) -> ImageInfo:
    """Decode ``path`` fully and say why it cannot be used, if it cannot.

    Args:
        path (str | Path): Image file.

    Returns:
        ImageInfo: The problem in words (the file is missing or a broken link, empty, unreadable for its
        permissions, not an image, or corrupt or truncated) or None for a readable image; its PIL mode,
        shown size and whether EXIF orientation turns it.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if path.is_symlink() and not path.exists():
        return ImageInfo(f"it links to {os.readlink(path)}, which does not exist")
    if not path.is_file():
        return ImageInfo("the file does not exist")
    if path.stat().st_size == 0:
        return ImageInfo("the file is empty (0 bytes)")
    try:
        with Image.open(path) as image:
            image.load()
            turn = orientation(image)
            size = (image.width, image.height) if turn >= 5 else (image.height, image.width)  # 5-8 swap the sides
            return ImageInfo(None, image.mode, size, turn != 1)
    except PermissionError:
        return ImageInfo("no permission to read the file (check its owner and mode)")
    except UnidentifiedImageError:
        return ImageInfo("not an image file (unknown format despite its extension)")
    except (OSError, SyntaxError, ValueError) as error:  # PIL's errors for truncated or corrupt data
        return ImageInfo(f"corrupt or truncated image ({error})")


def read_image(path: str | Path, channels_first: bool = False) -> np.ndarray:
    """Read an image upright as ``H x W x 3`` float32 in [0, 1], scaling 16-bit grayscale instead of clipping it.

    Other images get anomalib's conversion (``convert("RGB")``, divided by 255), so training, testing and
    ``reconpatch predict`` see the same values; 16-bit grayscale is divided by 65535 and repeated over
    three channels. An EXIF orientation tag is applied, as image viewers do, so a camera's JPEG is
    scored the way the user sees it (anomalib's reader ignores the tag; the pre-flight scan routes such
    images through this reader in training and testing too).

    The float image is written once, in place: a large photo costs its float32 size plus its 8-bit size,
    not several float copies (an 8000 x 6000 image is 576 MB as float32).

    Args:
        path (str | Path): Image file.
        channels_first (bool): Return ``3 x H x W`` (a model's layout) instead of ``H x W x 3``, without an
            extra copy. Defaults to ``False``.

    Returns:
        np.ndarray: ``H x W x 3`` (or ``3 x H x W``) float32 array in [0, 1], contiguous.

    Raises:
        OSError: For a missing, truncated or non-image file; PIL raises other types for some corrupt data.
            :func:`image_problem` names the cause.

    Example:
        >>> image = read_image("datasets/MVTecAD/bottle/train/good/000.png")  # doctest: +SKIP
        >>> image.shape, image.dtype  # doctest: +SKIP
        ((900, 900, 3), dtype('float32'))
    """
    from PIL import Image, ImageOps

    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened) if orientation(opened) != 1 else opened
        if image.mode in SIXTEEN_BIT_MODES:
            raw, scale = np.asarray(image)[..., None], 65535.0
        else:
            raw, scale = np.asarray(image.convert("RGB")), 255.0
    height, width = raw.shape[:2]
    if channels_first:
        array = np.empty((3, height, width), dtype=np.float32)
        array[...] = raw.transpose(2, 0, 1)
    else:
        array = np.empty((height, width, 3), dtype=np.float32)
        array[...] = raw
    array /= scale
    return np.clip(array, 0.0, 1.0, out=array)
