"""Pre-flight checks on the data, run by the model's Lightning ``setup`` hook before any real work.

Why here: anomalib reads each image inside the dataloader, so a broken file surfaces as a bare
PIL traceback (often from a worker process) after minutes of feature extraction or training. A
full decode of every image up front is cheap next to that work and names every bad file at once
(the cost per image is measured in ``docs/design/preflight-and-predict.md``). The scan also finds
16-bit grayscale images, which anomalib's ``read_image`` turns almost white (PIL's
``convert("RGB")`` clips values above 255); those are scaled to [0, 1] instead.
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
    """What a scan found: unreadable files, 16-bit images and the first image's size.

    Attributes:
        bad (list[tuple[str, str]]): ``(path, reason)`` of every unreadable file, in scan order.
        sixteen_bit (set[str]): Paths of the 16-bit grayscale images.
        first_size (tuple[int, int] | None): ``(height, width)`` of the first readable image, or None.
    """

    bad: list[tuple[str, str]] = field(default_factory=list)
    sixteen_bit: set[str] = field(default_factory=set)
    first_size: tuple[int, int] | None = None


def scan_images(paths: Iterable[str | Path]) -> ImageScan:
    """Decode every file once and collect the unreadable and the 16-bit ones.

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
        problem, mode, size = image_problem(path)
        if problem is not None:
            scan.bad.append((key, problem))
        elif mode in SIXTEEN_BIT_MODES:
            scan.sixteen_bit.add(key)
        if scan.first_size is None and size is not None:
            scan.first_size = size
    return scan


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
    listed = "\n".join(f"  {path}: {reason}" for path, reason in scan.bad[:MAX_LISTED])
    more = f"\n  ... and {len(scan.bad) - MAX_LISTED} more" if len(scan.bad) > MAX_LISTED else ""
    msg = (
        f"{len(scan.bad)} {what} file(s) cannot be read as images. Remove or replace them "
        f"(or move them out of the data folder) and run again:\n{listed}{more}"
    )
    raise UnreadableImageError(msg)


class SixteenBitScaled(torch.utils.data.Dataset):
    """An anomalib dataset whose 16-bit grayscale images are scaled to [0, 1] instead of clipped.

    Everything else (other images, masks, labels, ``collate_fn``, ``samples``) comes from the
    wrapped dataset unchanged, so only data sets that contain 16-bit images are ever wrapped. The
    dataset's augmentations must be resizes only (anomalib's default: the model's ``Resize``), so
    that applying them to the re-read image alone keeps it aligned with the already resized mask.

    Args:
        dataset (Any): The anomalib dataset to wrap.
        paths (set[str]): Paths of its 16-bit images, re-read with :func:`read_image`.
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
    paths = [str(p) for p in samples["image_path"]]
    if "mask_path" in samples and getattr(dataset, "task", TaskType.SEGMENTATION) == TaskType.SEGMENTATION:
        abnormal = samples["label_index"] == LabelName.ABNORMAL
        paths += [str(p) for p in samples.loc[abnormal, "mask_path"] if isinstance(p, str | Path) and str(p)]
    return paths


def check_datamodule(datamodule: Any, splits: Sequence[str]) -> ImageScan:
    """Scan the named datasets of a datamodule and fix the reading of their 16-bit images.

    Every dataset that holds 16-bit images is replaced on the datamodule by a :class:`SixteenBitScaled`
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
        ValueError: If a dataset with 16-bit images has augmentations other than resizes.
    """
    present = [(name, getattr(datamodule, name)) for name in splits if getattr(datamodule, name, None) is not None]
    scan = scan_images(path for _, dataset in present for path in sample_paths(dataset))
    where = ", ".join(name for name, _ in present)
    raise_if_unreadable(scan, f"data ({where})")
    for name, dataset in present:
        if isinstance(dataset, SixteenBitScaled):
            continue
        images = {str(p) for p in getattr(dataset, "samples", {}).get("image_path", [])} & scan.sixteen_bit
        if not images:
            continue
        if not only_resizes(getattr(dataset, "augmentations", None)):
            msg = (
                f"{len(images)} 16-bit image(s) in {name} (e.g. {min(images)}) cannot be combined with the random "
                "augmentations of the datamodule, and anomalib alone would clip them to white: convert the images "
                "to 8-bit first or drop the augmentations."
            )
            raise ValueError(msg)
        logger.info(
            "ReConPatch: %d 16-bit image(s) in %s are scaled to [0, 1] (anomalib would clip them)", len(images), name
        )
        setattr(datamodule, name, SixteenBitScaled(dataset, images))
    return scan


STAGE_SPLITS = {
    "fit": ("train_data", "val_data"),
    "validate": ("val_data",),
    "test": ("test_data",),
    "predict": ("test_data",),
}
"""The datamodule's datasets that each Lightning stage reads."""


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
