"""A small MVTec-layout data set from real texture photographs with realistic synthetic defects.

The normal images are crops of photographs that scikit-image ships inside its wheel (brick,
grass, gravel), so the demo needs no download. Defects are drawn on held-out crops: scratches
(thin bright or dark strokes), patches cut from another texture inside a Perlin-noise blob
(anomalib's generator, as DRAEM uses), and tinted stains; every defect comes with its exact mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

TEXTURES = ("brick", "grass", "gravel")
DEFECTS = ("scratch", "patch", "stain")
MARKER = ".reconpatch-demo"
"""File that marks a category folder as written by ``reconpatch demo-data``, so it may be regenerated."""


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo set; the defaults are small enough to train in seconds.

    Attributes:
        image_size (int): Side of the square images, in pixels.
        n_train (int): Normal training images per category.
        n_test_good (int): Normal test images per category.
        n_test_per_defect (int): Test images of each defect type per category.
        seed (int): Seed of every random choice; the same seed writes the same images.
    """

    image_size: int = 128
    n_train: int = 24
    n_test_good: int = 6
    n_test_per_defect: int = 4
    seed: int = 0


def texture(name: str) -> np.ndarray:
    """Load one of scikit-image's bundled texture photographs.

    Args:
        name (str): One of ``TEXTURES``.

    Returns:
        np.ndarray: The grayscale photograph, ``H x W`` float32 in [0, 1].

    Raises:
        ValueError: If ``name`` is not one of ``TEXTURES``.
    """
    from skimage import data

    if name not in TEXTURES:
        msg = f"Unknown demo texture '{name}': choose from {', '.join(TEXTURES)}."
        raise ValueError(msg)
    return getattr(data, name)().astype(np.float32) / 255.0


def random_crop(photo: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Cut a random ``size x size`` crop, mirrored left-right half of the time.

    Only left-right mirroring, so the texture keeps its orientation.

    Args:
        photo (np.ndarray): ``H x W`` (or ``H x W x C``) image, at least ``size`` on each side.
        size (int): Side of the crop.
        rng (np.random.Generator): Source of the position and the mirroring.

    Returns:
        np.ndarray: The crop, a view of ``photo``.
    """
    top = rng.integers(0, photo.shape[0] - size + 1)
    left = rng.integers(0, photo.shape[1] - size + 1)
    crop = photo[top : top + size, left : left + size]
    return crop[:, ::-1] if rng.random() < 0.5 else crop


def blob_mask(size: int, rng: np.random.Generator, coverage: tuple[float, float] = (0.03, 0.12)) -> np.ndarray:
    """Draw a compact irregular region: thresholded Perlin noise inside a random ellipse.

    Up to 50 draws are tried until one covers a fraction of the image within ``coverage``; if none
    does, the last ellipse is returned whole.

    Args:
        size (int): Side of the square mask.
        rng (np.random.Generator): Source of the noise seed, the ellipse and the threshold.
        coverage (tuple[float, float]): Smallest and largest fraction of the image the region may cover.

    Returns:
        np.ndarray: ``size x size`` boolean mask.
    """
    import torch  # here, not at the top: the CLI reads TEXTURES, and `reconpatch predict` needs no torch
    from anomalib.data.utils.generators.perlin import generate_perlin_noise

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(50):
        with torch.random.fork_rng():
            torch.manual_seed(int(rng.integers(2**31)))
            noise = generate_perlin_noise(size, size, scale=(4, 4), device=torch.device("cpu")).numpy()
        cy, cx = rng.uniform(0.25, 0.75, 2) * size
        ry, rx = rng.uniform(0.1, 0.25, 2) * size
        ellipse = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        mask = ellipse & (noise > rng.uniform(-0.1, 0.1))
        if coverage[0] <= mask.mean() <= coverage[1]:
            return mask
    return ellipse


def add_scratch(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Add a scratch: a thin curved stroke, brighter or darker than the surface.

    Args:
        image (np.ndarray): ``H x W x 3`` image in [0, 1], square.
        rng (np.random.Generator): Source of the curve, its width and its brightness.

    Returns:
        tuple[np.ndarray, np.ndarray]: The scratched image and its boolean defect mask.
    """
    size = image.shape[0]
    canvas = Image.new("L", (size, size), 0)
    p0, p1, p2 = rng.uniform(0.1, 0.9, (3, 2)) * size
    t = np.linspace(0, 1, 64)[:, None]
    curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    ImageDraw.Draw(canvas).line([tuple(p) for p in curve], fill=255, width=int(rng.integers(2, 4)))
    stroke = np.asarray(canvas.filter(ImageFilter.GaussianBlur(0.6)), dtype=np.float32) / 255.0
    shift = rng.choice([-1.0, 1.0]) * rng.uniform(0.35, 0.55)
    out = np.clip(image + shift * stroke[..., None], 0.0, 1.0)
    return out, stroke > 0.25


def add_patch(image: np.ndarray, other: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Add foreign material: a blob of another texture pasted into the surface.

    Args:
        image (np.ndarray): ``H x W x 3`` image in [0, 1], square.
        other (np.ndarray): ``H x W`` photograph of another texture to cut the blob from.
        rng (np.random.Generator): Source of the blob and the crop.

    Returns:
        tuple[np.ndarray, np.ndarray]: The image with the patch and its boolean defect mask.
    """
    mask = blob_mask(image.shape[0], rng)
    foreign = random_crop(other, image.shape[0], rng)[..., None]
    return np.where(mask[..., None], foreign, image), mask


def add_stain(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Add a soft-edged tinted stain (darkened, with a colour cast).

    Args:
        image (np.ndarray): ``H x W x 3`` image in [0, 1], square.
        rng (np.random.Generator): Source of the blob, the tint and the darkening.

    Returns:
        tuple[np.ndarray, np.ndarray]: The stained image and its boolean defect mask (where the soft
        edge is more than half opaque).
    """
    mask = blob_mask(image.shape[0], rng, coverage=(0.04, 0.15))
    alpha = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.GaussianBlur(2)), np.float32)
    alpha = alpha[..., None] / 255.0
    tint = np.array([0.55, 0.42, 0.25], dtype=np.float32) * rng.uniform(0.8, 1.1)
    stained = image * tint / tint.max() * rng.uniform(0.45, 0.65)
    return image * (1 - alpha) + stained * alpha, alpha[..., 0] > 0.5


def _save_rgb(array: np.ndarray, path: Path) -> None:
    """Save an image in [0, 1] as an 8-bit PNG."""
    Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8)).save(path)


def _prepare_category_dir(folder: Path) -> None:
    """Refuse to write into a folder the user made; regenerate our own demo folders."""
    if folder.exists() and any(folder.iterdir()) and not (folder / MARKER).is_file():
        msg = f"{folder} exists and was not written by `reconpatch demo-data`: choose an empty or new folder."
        raise FileExistsError(msg)
    if (folder / MARKER).is_file():
        for png in folder.glob("**/*.png"):
            png.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text("written by `reconpatch demo-data`; safe to delete\n")


def write_category(root: Path, name: str, config: DemoConfig) -> dict[str, int]:
    """Write one texture category in the MVTec layout.

    Training crops come from the top three quarters of the photograph and test crops from the bottom
    quarter, so test images show unseen surface. Every defect image gets its exact mask in
    ``ground_truth/<defect>/<index>_mask.png``.

    Args:
        root (Path): Folder that holds the categories.
        name (str): The category, one of ``TEXTURES``; the next texture in ``TEXTURES`` supplies the
            foreign material of the ``patch`` defect.
        config (DemoConfig): Sizes and seed.

    Returns:
        dict[str, int]: Number of images per split folder (``train/good``, ``test/good``, ``test/<defect>``).

    Raises:
        FileExistsError: If ``root/name`` is a non-empty folder that ``reconpatch demo-data`` did not write.
    """
    folder = root / name
    _prepare_category_dir(folder)
    rng = np.random.default_rng([config.seed, TEXTURES.index(name)])
    photo = texture(name)
    other = texture(TEXTURES[(TEXTURES.index(name) + 1) % len(TEXTURES)])
    size = config.image_size
    # Train on the top 3/4 of the photo, test on the bottom 1/4: test crops are unseen surface.
    split = photo.shape[0] * 3 // 4
    train_photo, test_photo = photo[:split], photo[split - size // 2 :]
    counts: dict[str, int] = {}
    (folder / "train" / "good").mkdir(parents=True, exist_ok=True)
    for i in range(config.n_train):
        _save_rgb(
            np.repeat(random_crop(train_photo, size, rng)[..., None], 3, 2), folder / "train/good" / f"{i:03d}.png"
        )
    counts["train/good"] = config.n_train
    (folder / "test" / "good").mkdir(parents=True, exist_ok=True)
    for i in range(config.n_test_good):
        _save_rgb(np.repeat(random_crop(test_photo, size, rng)[..., None], 3, 2), folder / "test/good" / f"{i:03d}.png")
    counts["test/good"] = config.n_test_good
    for defect in DEFECTS:
        (folder / "test" / defect).mkdir(parents=True, exist_ok=True)
        (folder / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
        for i in range(config.n_test_per_defect):
            clean = np.repeat(random_crop(test_photo, size, rng)[..., None], 3, 2)
            if defect == "scratch":
                image, mask = add_scratch(clean, rng)
            elif defect == "patch":
                image, mask = add_patch(clean, other, rng)
            else:
                image, mask = add_stain(clean, rng)
            _save_rgb(image, folder / "test" / defect / f"{i:03d}.png")
            Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "ground_truth" / defect / f"{i:03d}_mask.png")
        counts[f"test/{defect}"] = config.n_test_per_defect
    return counts


def write_demo_dataset(
    root: str | Path, categories: tuple[str, ...] = TEXTURES, config: DemoConfig | None = None
) -> dict:
    """Write the demo data set under ``root/<category>``, one MVTec-layout folder per texture.

    The images are the same for the same ``config.seed``. A category folder written earlier by this
    command is regenerated; any other non-empty folder is refused.

    Args:
        root (str | Path): Output folder.
        categories (tuple[str, ...]): Textures to write, from ``TEXTURES``.
        config (DemoConfig | None): Sizes and seed; None uses the defaults.

    Returns:
        dict: For each category, the number of images per split folder.

    Raises:
        FileExistsError: If a category folder exists, is not empty and was not written by this command.
        ValueError: If a category is not one of ``TEXTURES``.

    Example:
        >>> counts = write_demo_dataset("datasets/demo", ("brick",))  # doctest: +SKIP
        >>> counts  # doctest: +SKIP
        {'brick': {'train/good': 24, 'test/good': 6, 'test/scratch': 4, 'test/patch': 4, 'test/stain': 4}}
    """
    config = config or DemoConfig()
    root = Path(root)
    return {name: write_category(root, name, config) for name in categories}
