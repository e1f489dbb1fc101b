"""Pre-flight checks on the data, run by the model's Lightning ``setup`` hook before any real work.

Why here: anomalib reads each image inside the dataloader, so a broken file surfaces as a bare
PIL traceback (often from a worker process) after minutes of feature extraction or training. A
full decode of every image up front is cheap next to that work and names every bad file at once
(the cost per image is measured in ``docs/design/preflight-and-predict.md``). The scan also finds
16-bit grayscale images, which anomalib's ``read_image`` turns almost white (PIL's
``convert("RGB")`` clips values above 255), and images with an EXIF orientation tag, which anomalib
reads as stored instead of as shown; both are re-read with our reader. Masks are checked for values
and shape that would make the pixel metrics silently wrong.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from anomalib import TaskType
from anomalib.data.utils import LabelName

from .images import SIXTEEN_BIT_MODES, UnreadableImageError, image_problem, read_image

logger = logging.getLogger(__name__)

MAX_LISTED = 10
"""Unreadable files named in the error; the rest are counted."""


@dataclass
class ImageScan:
    """What a scan found: unreadable files, 16-bit and EXIF-turned images, and the images' sizes.

    Attributes:
        bad (list[tuple[str, str]]): ``(path, reason)`` of every unreadable file, in scan order.
        sixteen_bit (set[str]): Paths of the 16-bit grayscale images.
        turned (set[str]): Paths of the images that an EXIF orientation tag turns or mirrors.
        sizes (dict[str, tuple[int, int]]): ``(height, width)`` of every readable file, by path.
    """

    bad: list[tuple[str, str]] = field(default_factory=list)
    sixteen_bit: set[str] = field(default_factory=set)
    turned: set[str] = field(default_factory=set)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def first_size(self) -> tuple[int, int] | None:
        """``(height, width)`` of the first readable file (an image: images are scanned before masks), or None."""
        return next(iter(self.sizes.values()), None)


def scan_images(paths: Iterable[str | Path]) -> ImageScan:
    """Decode every file once and collect the unreadable, 16-bit and EXIF-turned ones, and every size.

    Args:
        paths (Iterable[str | Path]): Image and mask files; a path seen before is skipped.

    Returns:
        ImageScan: What the scan found.
    """
    scan, seen = ImageScan(), set()
    for path in paths:
        key = str(path)
        if key in seen:
            continue
        seen.add(key)
        problem, mode, size, turned = image_problem(path)
        if problem is not None:
            scan.bad.append((key, problem))
        elif mode in SIXTEEN_BIT_MODES:
            scan.sixteen_bit.add(key)
        if turned:
            scan.turned.add(key)
        if size is not None:
            scan.sizes[key] = size
    return scan


GREY_MASK_LIMIT = 0.01
"""Largest share of a mask's pixels that may be dark grey (1 to 127) before the mask is refused."""


def mask_problem(path: str | Path, image_size: tuple[int, int] | None) -> str | None:
    """Say what makes a readable mask give wrong pixel metrics, if anything does.

    anomalib counts every non-zero mask pixel as defective, so a mask whose background is not 0 (as
    after re-encoding or scanning) marks the whole image defective, and a mask of another aspect ratio
    than its image is stretched onto it. Any two-level mask with a 0 background is binary (0/255 or
    0/1); a thin grey seam from resizing is tolerated (up to ``GREY_MASK_LIMIT`` of the pixels), and so
    is another resolution at the same aspect ratio.

    Args:
        path (str | Path): The mask file (already known to be readable).
        image_size (tuple[int, int] | None): ``(height, width)`` of its image, or None if unknown.

    Returns:
        str | None: The problem and what to do, or None for a usable mask.
    """
    import numpy as np
    from PIL import Image

    with Image.open(path) as mask:
        height, width = mask.height, mask.width
        values = np.asarray(mask.convert("L"))
    if image_size is not None and abs(height / width - image_size[0] / image_size[1]) > 0.01:
        return (
            f"it is {width}x{height} px but its image is {image_size[1]}x{image_size[0]}, another aspect ratio, so "
            "it would be stretched onto the image: use the mask made for this image"
        )
    levels = np.unique(values)
    if len(levels) <= 2 and levels[0] == 0:  # binary: 0 and one defect value (255, or 1 in some data sets)
        return None
    grey = float(((values > 0) & (values < 128)).mean())
    if grey > GREY_MASK_LIMIT:
        return (
            f"{grey:.0%} of its pixels are dark grey (1 to 127, e.g. {int(values[(values > 0) & (values < 128)][0])}), "
            "which anomalib counts as defective: save it with 0 for good and 255 for defect pixels "
            "(threshold it at 128)"
        )
    return None


def raise_if_bad_masks(datasets: Iterable[Any], scan: ImageScan) -> None:
    """Check every mask that the datasets will read against :func:`mask_problem`; raise one error naming all.

    Args:
        datasets (Iterable[Any]): anomalib datasets (their ``samples`` tables give image and mask pairs).
        scan (ImageScan): The scan of their files, for the images' sizes.

    Raises:
        ValueError: If any mask would give wrong metrics; the first ``MAX_LISTED`` are named with the problem.
    """
    problems, seen = [], set()
    for dataset in datasets:
        for image, mask in mask_pairs(dataset):
            if mask in seen:
                continue
            seen.add(mask)
            problem = mask_problem(mask, scan.sizes.get(image))
            if problem is not None:
                problems.append((mask, problem))
    if not problems:
        return
    msg = f"{len(problems)} mask(s) would give wrong pixel metrics. Fix them as each reason says:\n{listing(problems)}"
    raise ValueError(msg)


def listing(problems: Sequence[tuple[str, str]]) -> str:
    """One indented ``path: reason`` line for each of the first ``MAX_LISTED`` problems, then a count of the rest."""
    lines = [f"  {path}: {reason}" for path, reason in problems[:MAX_LISTED]]
    if len(problems) > MAX_LISTED:
        lines.append(f"  ... and {len(problems) - MAX_LISTED} more")
    return "\n".join(lines)


def raise_if_unreadable(scan: ImageScan, what: str) -> None:
    """Raise one error that names the unreadable files and says what to do; return if there are none.

    Args:
        scan (ImageScan): The scan to report.
        what (str): What the files are, for the message (e.g. ``"data (train_data, val_data)"``).

    Raises:
        UnreadableImageError: If the scan found unreadable files; the first ``MAX_LISTED`` are listed
            with their reasons and the rest counted.
    """
    if not scan.bad:
        return
    msg = (
        f"{len(scan.bad)} {what} file(s) cannot be read as images. Fix, replace or remove them "
        f"(or move them out of the data folder) as each reason says, and run again:\n{listing(scan.bad)}"
    )
    raise UnreadableImageError(msg)


class RereadImages(torch.utils.data.Dataset):
    """An anomalib dataset whose 16-bit or EXIF-turned images are re-read with :func:`read_image`.

    anomalib's reader clips 16-bit grayscale to white and ignores EXIF orientation; these images are
    read again, scaled to [0, 1] and upright. Everything else (other images, masks, labels,
    ``collate_fn``, ``samples``) comes from the wrapped dataset unchanged, so only data sets that
    contain such images are ever wrapped. The dataset's augmentations must be resizes only (anomalib's
    default: the model's ``Resize``), so that applying them to the re-read image alone keeps it aligned
    with the already resized mask.

    Args:
        dataset (Any): The anomalib dataset to wrap.
        paths (set[str]): Paths of the images to re-read.
    """

    def __init__(self, dataset: Any, paths: set[str]) -> None:
        self.dataset = dataset
        self.paths = frozenset(paths)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def augmentations(self) -> Any:
        """The wrapped dataset's augmentations: anomalib's datamodule sets them on its subsets after set-up."""
        return getattr(self.dataset, "augmentations", None)

    @augmentations.setter
    def augmentations(self, value: Any) -> None:
        self.dataset.augmentations = value

    def __getitem__(self, index: int) -> Any:
        from torchvision.tv_tensors import Image

        item = self.dataset[index]
        if str(item.image_path) in self.paths:
            image = Image(torch.from_numpy(read_image(item.image_path)).permute(2, 0, 1))
            item.image = self.augmentations(image) if self.augmentations else image
        return item

    def __getattr__(self, name: str) -> Any:
        if name in {"dataset", "paths"}:  # not set yet (unpickling): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


def only_resizes(transform: Any) -> bool:
    """Whether a transform only resizes: deterministic and shape-only, so it can be re-applied to one image.

    Args:
        transform (Any): A torchvision v2 transform, or None.

    Returns:
        bool: True for None, a ``Resize``, or a ``Compose`` of those (nested ones included).
    """
    from torchvision.transforms.v2 import Compose, Resize

    if transform is None or isinstance(transform, Resize):
        return True
    return isinstance(transform, Compose) and all(only_resizes(t) for t in transform.transforms)


def sample_paths(dataset: Any) -> list[str]:
    """List the image and mask paths that an anomalib dataset will read, from its ``samples`` table.

    anomalib reads a mask only for an anomalous image of a segmentation data set, so other rows' mask
    paths are left out: BTAD's table, say, names a mask for every normal training image, and none exists.

    Args:
        dataset (Any): An anomalib dataset, or any other dataset.

    Returns:
        list[str]: Every image path, then the mask paths of the anomalous images; empty for a dataset
        without a ``samples`` table holding ``image_path``.
    """
    samples = getattr(dataset, "samples", None)
    if samples is None or "image_path" not in samples:
        return []
    return [str(p) for p in samples["image_path"]] + [mask for _, mask in mask_pairs(dataset)]


def mask_pairs(dataset: Any) -> list[tuple[str, str]]:
    """List ``(image path, mask path)`` of the anomalous images whose masks anomalib will read.

    Args:
        dataset (Any): An anomalib dataset, or any other dataset.

    Returns:
        list[tuple[str, str]]: The pairs; empty without a ``samples`` table, masks, or a segmentation task.
    """
    samples = getattr(dataset, "samples", None)
    if samples is None or "image_path" not in samples or "mask_path" not in samples:
        return []
    if getattr(dataset, "task", TaskType.SEGMENTATION) != TaskType.SEGMENTATION:
        return []
    abnormal = samples.loc[samples["label_index"] == LabelName.ABNORMAL]
    return [
        (str(image), str(mask))
        for image, mask in zip(abnormal["image_path"], abnormal["mask_path"], strict=True)
        if isinstance(mask, str | Path) and str(mask)
    ]


def check_datamodule(datamodule: Any, splits: Sequence[str]) -> ImageScan:
    """Scan the named datasets of a datamodule and fix the reading of their 16-bit and EXIF-turned images.

    Every dataset that holds such images is replaced on the datamodule by a :class:`RereadImages`
    wrapper (one already wrapped is left as it is). Datasets that are not anomalib datasets (no
    ``samples`` table) are left alone.

    Args:
        datamodule (Any): The anomalib datamodule.
        splits (Sequence[str]): Names of its dataset attributes (``train_data``, ``val_data``, ...);
            missing or None ones are skipped.

    Returns:
        ImageScan: What the scan found over all the named datasets.

    Raises:
        UnreadableImageError: If any image or mask cannot be read; every unreadable file is named.
        ValueError: If a mask would give wrong pixel metrics (:func:`mask_problem`; every such mask is
            named), or a dataset with 16-bit or EXIF-turned images has augmentations other than resizes.
    """
    present = [(name, getattr(datamodule, name)) for name in splits if getattr(datamodule, name, None) is not None]
    scan = scan_images(path for _, dataset in present for path in sample_paths(dataset))
    where = ", ".join(name for name, _ in present)
    raise_if_unreadable(scan, f"data ({where})")
    raise_if_bad_masks((dataset for _, dataset in present), scan)
    for name, dataset in present:
        if isinstance(dataset, RereadImages):
            continue
        images = {str(p) for p in getattr(dataset, "samples", {}).get("image_path", [])}
        sixteen_bit, turned = images & scan.sixteen_bit, images & scan.turned
        if not sixteen_bit | turned:
            continue
        if not only_resizes(getattr(dataset, "augmentations", None)):
            msg = (
                f"{len(sixteen_bit | turned)} image(s) in {name} (e.g. {min(sixteen_bit | turned)}) are 16-bit or "
                "turned by an EXIF orientation tag, which anomalib alone reads wrong (clipped to white, or as "
                "stored), and cannot be combined with the random augmentations of the datamodule: convert them to "
                "8-bit upright images first or drop the augmentations."
            )
            raise ValueError(msg)
        if sixteen_bit:
            logger.info("ReConPatch: %d 16-bit image(s) in %s are scaled to [0, 1]", len(sixteen_bit), name)
        if turned:
            logger.info("ReConPatch: %d image(s) in %s are turned upright by their EXIF tag", len(turned), name)
        setattr(datamodule, name, RereadImages(dataset, sixteen_bit | turned))
    return scan


STAGE_SPLITS = {
    "fit": ("train_data", "val_data", "test_data"),
    "validate": ("val_data",),
    "test": ("test_data",),
    "predict": ("test_data",),
}
"""The datamodule's datasets that each Lightning stage checks; fit checks the test files too, so that one
run names every bad file of the data set instead of one stage's at a time."""


def preflight(module: Any, stage: str) -> ImageScan | None:
    """Scan the images of ``stage``'s splits from a model's ``setup`` hook, so unreadable files fail early.

    Only anomalib datamodules are scanned; with bare dataloaders (no datamodule) there is nothing to list.
    16-bit images found are scaled from then on (see :func:`check_datamodule`); ``setup`` runs before
    Lightning builds the dataloaders, so the wrapped datasets are the ones read.

    Args:
        module (Any): The Lightning module whose trainer holds the datamodule.
        stage (str): Lightning's stage (``fit``, ``validate``, ``test`` or ``predict``).

    Returns:
        ImageScan | None: What the scan found, or None when the trainer has no datamodule.

    Raises:
        UnreadableImageError: If any image or mask of the stage cannot be read; every such file is named.
        ValueError: If 16-bit images meet augmentations other than resizes.

    Example:
        >>> from anomalib.models import AnomalibModule
        >>> class MyModel(AnomalibModule):  # doctest: +SKIP
        ...     def setup(self, stage: str) -> None:
        ...         super().setup(stage)
        ...         preflight(self, stage)
    """
    trainer = getattr(module, "_trainer", None)
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    if datamodule is None:
        return None
    return check_datamodule(datamodule, STAGE_SPLITS.get(stage, ()))
