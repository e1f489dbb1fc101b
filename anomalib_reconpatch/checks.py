"""Pre-flight checks on the data, run by the model's Lightning ``setup`` hook before any real work.

Why here: anomalib reads each image inside the dataloader, so a broken file surfaces as a bare
PIL traceback (often from a worker process) after minutes of feature extraction or training. A
full decode of every image up front costs about 2 ms per 320 px PNG (0.4 s for the 209 MVTec AD
bottle training images) and names every bad file at once. The scan also finds 16-bit grayscale
images, which anomalib's ``read_image`` turns almost white (PIL's ``convert("RGB")`` clips values
above 255); those are scaled to [0, 1] instead.
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


@dataclass
class ImageScan:
    """What a scan found: unreadable files (path, reason), 16-bit images and the first image's size."""

    bad: list[tuple[str, str]] = field(default_factory=list)
    sixteen_bit: set[str] = field(default_factory=set)
    first_size: tuple[int, int] | None = None


def scan_images(paths: Iterable[str | Path]) -> ImageScan:
    """Decode every file once (duplicates skipped); collect the unreadable and the 16-bit ones."""
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
    """One error that names every unreadable file (the first ``MAX_LISTED``) and says what to do."""
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
    """

    def __init__(self, dataset: Any, paths: set[str]) -> None:
        self.dataset = dataset
        self.paths = frozenset(paths)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def augmentations(self) -> Any:
        """The wrapped dataset's: anomalib's datamodule sets them on its subsets after set-up."""
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
    """True for no transform, a ``Resize``, or a ``Compose`` of those: deterministic, shape-only transforms."""
    from torchvision.transforms.v2 import Compose, Resize

    if transform is None or isinstance(transform, Resize):
        return True
    return isinstance(transform, Compose) and all(only_resizes(t) for t in transform.transforms)


def sample_paths(dataset: Any) -> list[str]:
    """Image and mask paths that an anomalib dataset will read (its ``samples`` table); empty for other datasets.

    anomalib reads a mask only for an anomalous image of a segmentation data set, so other rows' mask
    paths are left out: BTAD's table, say, names a mask for every normal training image, and none exists.
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
    """Scan the named dataset attributes (``train_data``, ``val_data``, ...) and fix 16-bit reading.

    Raises :class:`UnreadableImageError` naming every unreadable file. Datasets that are not
    anomalib datasets (no ``samples`` table) are left alone.
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


def check_training_size(module: Any, datamodule: Any, scan: ImageScan) -> None:
    """Stop before feature extraction when the training set cannot give ``k + 1`` patches or one coreset point."""
    train = getattr(datamodule, "train_data", None)
    if train is None or not hasattr(train, "__len__"):
        return
    n_images = len(train)
    if n_images == 0:
        root = Path(getattr(datamodule, "root", None) or ".") / str(getattr(datamodule, "category", None) or "")
        msg = (
            f"No training images found under {root}: add normal images to its training folder "
            "(train/good in the MVTec layout) or point the datamodule at the right folder."
        )
        raise ValueError(msg)
    height, width = module.input_size or scan.first_size or (256, 256)
    with torch.no_grad():
        grid = module.model.patch_features(torch.zeros(1, 3, int(height), int(width), device=module.device)).shape[-2:]
    n_patches = n_images * grid[0] * grid[1]
    k, ratio = module.hparams["k"], module.hparams["coreset_sampling_ratio"]
    if n_patches <= k:
        msg = (
            f"ReConPatch needs more than k={k} training patches, the {n_images} training image(s) give "
            f"{n_patches}: add images or lower --model.k."
        )
        raise ValueError(msg)
    if int(n_patches * ratio) == 0:
        msg = (
            f"--model.coreset_sampling_ratio={ratio} keeps no memory-bank point of the {n_patches} training patches "
            f"({n_images} image(s) x {grid[0]}x{grid[1]} patches): set it to at least 1/{n_patches} "
            "or add training images."
        )
        raise ValueError(msg)


def preflight(module: Any, stage: str) -> None:
    """Run by the model's ``setup`` hook: unreadable files and impossible settings fail here, early.

    Only anomalib datamodules are scanned; with bare dataloaders (no datamodule) there is nothing to list.
    """
    trainer = getattr(module, "_trainer", None)
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    if datamodule is None:
        return
    scan = check_datamodule(datamodule, STAGE_SPLITS.get(stage, ()))
    if stage == "fit":
        check_training_size(module, datamodule, scan)


ARCHITECTURE_KEY = "reconpatch_architecture"


def architecture(module: Any) -> dict[str, Any]:
    """What a checkpoint must match to load: backbone, layers, embedding_dim and the resulting feature size."""
    weight = module.state_dict().get("model.representation.weight")
    return {
        "backbone": module.hparams.get("backbone"),
        "layers": _normalise(module.hparams.get("layers")),
        "embedding_dim": module.hparams.get("embedding_dim"),
        "feature_dim": int(weight.shape[1]) if weight is not None else None,
    }


def _describe(arch: dict[str, Any]) -> str:
    return (
        f"backbone={arch.get('backbone')}, layers={arch.get('layers')}, embedding_dim={arch.get('embedding_dim')} "
        f"(feature dim {arch.get('feature_dim')})"
    )


def check_checkpoint_matches(module: Any, checkpoint: dict[str, Any]) -> None:
    """Refuse a checkpoint whose backbone, layers or feature size differ from the model it is loaded into.

    Without this, a different feature size fails deep in ``load_state_dict`` with bare tensor
    shapes, and a different backbone fails with hundreds of missing keys (or, with the same size
    and keys, loads silently and scores nonsense). The checkpoint's own record (written by
    ``on_save_checkpoint``) is used because ``load_from_checkpoint(path, layers=...)`` overwrites
    the checkpoint's ``hyper_parameters`` with the overrides before this hook runs.
    """
    saved = checkpoint.get(ARCHITECTURE_KEY)
    if saved is None:  # written before the record existed: hyper-parameters and the weight shape
        params = checkpoint.get("hyper_parameters") or {}
        weight = (checkpoint.get("state_dict") or {}).get("model.representation.weight")
        saved = {name: _normalise(params.get(name)) for name in ("backbone", "layers", "embedding_dim")}
        saved["feature_dim"] = int(weight.shape[1]) if weight is not None else None
    own = architecture(module)
    unknown = {name for name in ("feature_dim",) if saved.get(name) is None or own.get(name) is None}
    differs = [name for name in own if name not in unknown and _normalise(saved.get(name)) != own[name]]
    if not differs:
        return
    layers = ", ".join(str(layer) for layer in saved.get("layers") or [])
    msg = (
        f"This checkpoint was trained with {_describe(saved)}, but the model it is loaded into has "
        f"{_describe(own)} ({', '.join(differs)} differ). Build the model as it was trained: "
        f"pass --model.backbone {saved.get('backbone')} --model.layers '[{layers}]' "
        f"--model.embedding_dim {saved.get('embedding_dim')} "
        "(or call ReConPatch.load_from_checkpoint(path) without overriding them)."
    )
    raise ValueError(msg)


def _normalise(value: Any) -> Any:
    """Lists and tuples compare equal (a checkpoint stores ``layers`` as either)."""
    return list(value) if isinstance(value, list | tuple) else value
