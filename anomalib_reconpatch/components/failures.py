"""Turn the failures that happen before the model's own checks into one message that names the files.

Two kinds of fault stop a run before any hook of the model runs, with anomalib's or torch's words:

- the datamodule's ``setup`` builds its sample table and refuses a broken link with "missing file path(s) in
  samples", or a defect image without its mask (or a mask without its image) with a pandas length error,
  naming no file;
- Lightning reads ``ckpt_path`` and an empty or truncated checkpoint ends in a bare ``EOFError`` or a zip error.

Lightning reports every exception of a run to the callbacks' ``on_exception``. :class:`ExplainFailures`
(which the model hands to the trainer) looks at the files then and, where it finds the cause, adds a note to
the exception (Python prints notes under the message) that lists the files and says what to do. The exception
itself goes on unchanged, so Lightning's own clean-up after a failure still runs.

Example:
    >>> from pathlib import Path
    >>> checkpoint_problem(Path("/no/such/model.ckpt"))
    'does not exist'
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from .images import IMAGE_SUFFIXES
from .preflight import listing, sample_paths

logger = logging.getLogger(__name__)

DATA_DIR_ATTRIBUTES = ("normal_dir", "abnormal_dir", "normal_test_dir", "mask_dir")
"""Folder datamodule settings that name data folders, relative to ``root`` or absolute."""

CHECKPOINT_READ_ERRORS = (EOFError, pickle.UnpicklingError, RuntimeError)
"""What ``torch.load`` raises on an empty, truncated or foreign file."""


def as_list(value: Any) -> list[Any]:
    """A datamodule setting that may be one value, a sequence or unset, as a list."""
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def data_folders(datamodule: Any) -> list[Path]:
    """The folders a datamodule reads: ``root/category`` (MVTec layout) or ``root`` with its named folders.

    Args:
        datamodule (Any): An anomalib datamodule (``MVTecAD``, ``Folder`` or alike).

    Returns:
        list[Path]: Existing folders, without duplicates, in the order found.
    """
    root = getattr(datamodule, "root", None)
    if root is None:
        return []
    root = Path(root)
    category = getattr(datamodule, "category", None)
    base = root / str(category) if category else root
    named = [root / str(name) for attr in DATA_DIR_ATTRIBUTES for name in as_list(getattr(datamodule, attr, None))]
    return list(dict.fromkeys(folder for folder in [base, *named] if folder.is_dir()))


def links_under(folders: Iterable[Path]) -> list[str]:
    """Every link to a file (or to nothing) under ``folders``, sorted, each once; links to folders are not followed.

    Args:
        folders (Iterable[Path]): Folders to walk.

    Returns:
        list[str]: The links' paths.
    """
    found = set()
    for folder in folders:
        for dirpath, _, names in os.walk(folder):
            found.update(path for name in names if os.path.islink(path := os.path.join(dirpath, name)))
    return sorted(found)


def link_reason(path: str) -> str:
    """Where a link points and, when it points at nothing, that it does."""
    state = "which does not exist" if not os.path.exists(path) else "outside the data folder"
    return f"a link to {os.readlink(path)}, {state}"


def broken_links(folders: Iterable[Path]) -> list[tuple[str, str]]:
    """Every file under ``folders`` that is a link to nothing, with the target it points to.

    Args:
        folders (Iterable[Path]): Folders to walk (links to folders are not followed).

    Returns:
        list[tuple[str, str]]: ``(path, reason)`` pairs, sorted by path.
    """
    return [(path, link_reason(path)) for path in links_under(folders) if not os.path.exists(path)]


def link_key(path: str | Path) -> str:
    """A link's path with its folder resolved but not the link itself, so two spellings of it compare equal."""
    path = Path(path)
    return str(Path(os.path.realpath(path.parent)) / path.name)


def skipped_links(datamodule: Any, read: Iterable[str | Path]) -> list[tuple[str, str]]:
    """Image links in the data folders that the datamodule did not read, with where they point.

    anomalib keeps only files that resolve inside the data folder: a link to an image elsewhere is
    dropped without a word, and a training set of links can silently shrink.

    Args:
        datamodule (Any): An anomalib datamodule.
        read (Iterable[str | Path]): The image and mask paths its datasets hold.

    Returns:
        list[tuple[str, str]]: ``(path, reason)`` pairs, sorted by path.
    """
    held = {link_key(path) for path in read}
    return [
        (path, link_reason(path))
        for path in links_under(data_folders(datamodule))
        if Path(path).suffix.lower() in IMAGE_SUFFIXES and link_key(path) not in held
    ]


def warn_skipped_links(datamodule: Any) -> None:
    """Log one warning that lists the image links in the data folders which the datamodule did not read.

    Args:
        datamodule (Any): An anomalib datamodule, after its ``setup``.
    """
    datasets = [getattr(datamodule, name, None) for name in ("train_data", "val_data", "test_data")]
    read = [path for dataset in datasets if dataset is not None for path in sample_paths(dataset)]
    links = skipped_links(datamodule, read)
    if links:
        logger.warning(
            "anomalib skipped %d linked image(s) in the data folder, which it reads only when they resolve inside "
            "it: copy the images in, or point the datamodule at their real folder:\n%s",
            len(links),
            listing(links),
        )


def image_files(folder: Path) -> list[Path]:
    """The files directly in ``folder`` (hidden ones skipped), sorted; none when it does not exist."""
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if path.is_file() and not path.name.startswith("."))


def unpaired(images: Sequence[Path], masks: Sequence[Path], mask_folder: Path) -> list[tuple[str, str]]:
    """Defect images without a mask and masks without an image, by anomalib's naming rule.

    A mask belongs to the image whose name it repeats, with or without ``_mask``: ``003.png`` and
    ``003_mask.png`` (or ``003.png``) in the mask folder.

    Args:
        images (Sequence[Path]): Defect images of one folder.
        masks (Sequence[Path]): Masks of the same defect type.
        mask_folder (Path): Where their masks belong, for the message.

    Returns:
        list[tuple[str, str]]: ``(path, reason)`` pairs, images first.
    """
    mask_stems = {mask.stem for mask in masks}
    image_stems = {image.stem for image in images}
    problems = [
        (str(image), f"no mask: add {mask_folder / (image.stem + '_mask.png')} or move the image out")
        for image in images
        if image.stem not in mask_stems and f"{image.stem}_mask" not in mask_stems
    ]
    problems += [
        (str(mask), f"a mask without an image: {mask.stem.removesuffix('_mask')} is not among the defect images")
        for mask in masks
        if mask.stem not in image_stems and mask.stem.removesuffix("_mask") not in image_stems
    ]
    return problems


def unpaired_masks(datamodule: Any) -> list[tuple[str, str]]:
    """Defect images and masks that do not pair up, in the MVTec layout or a Folder's named folders.

    Args:
        datamodule (Any): An anomalib datamodule.

    Returns:
        list[tuple[str, str]]: ``(path, reason)`` pairs; empty when every defect image has its mask or the
        data set has no masks at all (a classification data set).
    """
    root = getattr(datamodule, "root", None)
    if root is None:
        return []
    root = Path(root)
    category = getattr(datamodule, "category", None)
    if category and (root / str(category) / "test").is_dir():
        base = root / str(category)
        truth = base / "ground_truth"
        if not truth.is_dir():
            return []
        problems = []
        defects = {p.name for p in (base / "test").iterdir() if p.is_dir() and p.name != "good"}
        defects |= {p.name for p in truth.iterdir() if p.is_dir()}
        for defect in sorted(defects):
            problems += unpaired(image_files(base / "test" / defect), image_files(truth / defect), truth / defect)
        return problems
    mask_dirs = as_list(getattr(datamodule, "mask_dir", None))
    if not mask_dirs:
        return []
    images = [path for name in as_list(getattr(datamodule, "abnormal_dir", None)) for path in image_files(root / name)]
    masks = [path for name in mask_dirs for path in image_files(root / name)]
    return unpaired(images, masks, root / str(mask_dirs[0]))


def checkpoint_problem(path: Path) -> str | None:
    """What makes ``path`` unreadable as a checkpoint, judged from the file alone, or ``None``.

    ``torch.save`` writes a zip archive: an empty file, or one that is not a complete archive, was cut short
    (an interrupted save, a full disk, a partial copy) or is another kind of file.

    Args:
        path (Path): The checkpoint file.

    Returns:
        str | None: The reason, or ``None`` where the file looks like a complete archive.
    """
    if not path.exists():
        return "does not exist"
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    if not zipfile.is_zipfile(path):
        return f"is not a complete checkpoint ({size} bytes, not the zip archive that torch.save writes)"
    return None


def checkpoint_message(path: Path, reason: str) -> str:
    """The line for an unreadable checkpoint: the file, what is wrong and what to do."""
    return (
        f"Checkpoint {path} {reason}: it was cut short (an interrupted save, a full disk, a partial copy) or is "
        "another file. Pass a complete checkpoint (weights/lightning/model.ckpt of a finished run) or train again."
    )


class ExplainFailures(Callback):
    """Note on data-setup and checkpoint-reading failures the files that caused them.

    It acts only where the cause is found on disk: a data-setup failure (before the callbacks' ``setup``)
    with broken links or unpaired masks in the data folders, or a read error of ``trainer.ckpt_path`` where
    that file is empty or not an archive. Anything else goes on unchanged.
    """

    def __init__(self) -> None:
        self.data_set_up = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Mark the data as set up: failures after this point are not the sample table's."""
        del trainer, pl_module, stage
        self.data_set_up = True

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Add a note to ``exception`` that lists the files behind it, where they are found.

        The note names broken links in the data folders, defect images without masks (or masks without
        images), or what is wrong with an unreadable checkpoint.
        """
        del pl_module
        if not isinstance(exception, Exception):
            return
        datamodule = getattr(trainer, "datamodule", None)
        if not self.data_set_up and datamodule is not None:
            links = broken_links(data_folders(datamodule))
            if links:
                msg = (
                    f"{len(links)} file(s) in the data folder are links to files that do not exist. Restore their "
                    f"targets or remove the links, and run again:\n{listing(links)}"
                )
                exception.add_note(msg)
                return
            masks = unpaired_masks(datamodule)
            if masks:
                msg = (
                    f"{len(masks)} defect image(s) and mask(s) do not pair up: every defect image needs its mask, "
                    f"named as the image (with or without _mask). Fix them as each line says:\n{listing(masks)}"
                )
                exception.add_note(msg)
                return
        ckpt_path = getattr(trainer, "ckpt_path", None)
        if ckpt_path and isinstance(exception, CHECKPOINT_READ_ERRORS):
            reason = checkpoint_problem(Path(ckpt_path))
            if reason is not None:
                exception.add_note(checkpoint_message(Path(ckpt_path), reason))
