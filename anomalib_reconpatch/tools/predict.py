"""``reconpatch predict``: run an exported OpenVINO model over an image or a folder, streaming.

Writes, per image, a heatmap overlay PNG, and one ``scores.csv`` with the score and label of
every image. Images are read one at a time (memory stays flat however large the folder), and
nothing is ever written inside the input folder.

An unreadable image (truncated, empty, not an image) does not stop the run: on a production line
one bad frame must not hold up the rest, nor go unnoticed. It is skipped with a warning that
names it, gets a row in ``scores.csv`` with an empty score and the reason in the ``error``
column, and the closing summary counts it.

The module imports neither torch nor anomalib, so ``reconpatch predict`` runs on OpenVINO, numpy, PIL
and matplotlib alone (see ``docs/design/preflight-and-predict.md``).
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..components.images import IMAGE_SUFFIXES


@dataclass(frozen=True)
class PredictSummary:
    """What a run did: how many images, how fast, and where the results are.

    Attributes:
        images (int): Images scored (skipped ones not included).
        seconds (float): Wall time of the run, reading and writing included.
        csv_path (Path): The ``scores.csv`` written.
        skipped (tuple[tuple[Path, str], ...]): ``(path, error message)`` of every unreadable image.
    """

    images: int
    seconds: float
    csv_path: Path
    skipped: tuple[tuple[Path, str], ...] = ()

    @property
    def images_per_second(self) -> float:
        """Images scored per second over the whole run, reading and writing included (0 for no time)."""
        return self.images / self.seconds if self.seconds > 0 else 0.0


PRECISIONS = ("f32", "auto")
"""Values of ``--precision``: float32 (the default), or OpenVINO's own choice."""


def compile_options(precision: str = "f32") -> dict[str, str]:
    """Build the OpenVINO compile options for ``precision``.

    On CPUs with AVX-512 BF16 or AMX, OpenVINO runs FP32 models in bfloat16 unless told otherwise, and
    the scores then drift from the PyTorch model's, so a threshold calibrated in PyTorch would no longer
    mean the same. Float32 is therefore the default; see ``docs/design/float32-hint.md``.

    Args:
        precision (str): ``f32`` computes in float32; ``auto`` lets the device choose.

    Returns:
        dict[str, str]: ``{"INFERENCE_PRECISION_HINT": "f32"}`` for ``f32``, no option for ``auto``.

    Raises:
        ValueError: If ``precision`` is not one of ``PRECISIONS``.
    """
    if precision not in PRECISIONS:
        msg = f"--precision {precision}: use f32 (scores as in PyTorch) or auto (OpenVINO's choice, bf16 on some CPUs)."
        raise ValueError(msg)
    return {"INFERENCE_PRECISION_HINT": "f32"} if precision == "f32" else {}


def load_compiled_model(model_path: Path, device: str = "CPU", precision: str = "f32") -> object:
    """Compile an exported ``.xml`` (with its ``.bin``) or ``.onnx`` model with OpenVINO.

    Args:
        model_path (Path): The exported ``.xml`` (its ``.bin`` beside it) or ``.onnx`` file.
        device (str): OpenVINO device, e.g. ``CPU``.
        precision (str): One of ``PRECISIONS`` (see :func:`compile_options`).

    Returns:
        object: OpenVINO's compiled model.

    Raises:
        FileNotFoundError: If the model file, or the ``.bin`` beside an ``.xml``, is missing.
        ValueError: If the file is not an ``.xml`` or ``.onnx``, OpenVINO cannot read it, it is not a
            model that takes images of any size (:func:`check_model_io`), or ``precision`` is unknown.
    """
    import openvino as ov

    options = compile_options(precision)

    if not model_path.is_file():
        msg = f"Model file {model_path} does not exist: pass the .xml that `anomalib export` wrote."
        raise FileNotFoundError(msg)
    if model_path.suffix not in {".xml", ".onnx"}:
        msg = f"Model file {model_path} is not an OpenVINO .xml or an .onnx file."
        raise ValueError(msg)
    if model_path.suffix == ".xml" and not model_path.with_suffix(".bin").is_file():
        msg = f"Weights {model_path.with_suffix('.bin')} are missing next to {model_path}: copy the .bin with the .xml."
        raise FileNotFoundError(msg)
    try:
        compiled = ov.Core().compile_model(str(model_path), device, options)
    except RuntimeError as error:
        msg = f"OpenVINO could not read {model_path} (corrupt or not an exported model?): {str(error).splitlines()[0]}"
        raise ValueError(msg) from error
    check_model_io(compiled, model_path)
    return compiled


def check_model_io(compiled: object, model_path: Path) -> None:
    """Refuse a model that cannot score images of any size with the outputs predict reads.

    ``reconpatch predict`` feeds each image at its own size, so the input's height and width must be
    dynamic, as in ReConPatch's exports; a fixed-size export (stock PatchCore's, say) would fail at the
    first image with an OpenVINO shape error.

    Args:
        compiled (object): The compiled OpenVINO model.
        model_path (Path): Its file, for the message.

    Raises:
        ValueError: If the input is not ``N x 3 x H x W`` with dynamic ``H`` and ``W``, or ``pred_score`` or
            ``anomaly_map`` is not an output.
    """
    shape = compiled.inputs[0].get_partial_shape()
    names = {name for output in compiled.outputs for name in output.get_names()}
    missing = sorted({"pred_score", "anomaly_map"} - names)
    fixed = shape.rank.is_static and shape.rank.get_length() == 4 and (shape[2].is_static or shape[3].is_static)
    if fixed or missing:
        problem = f"its input is fixed at {shape}" if fixed else f"it has no output {', '.join(missing)}"
        msg = (
            f"{model_path} cannot score images of any size ({problem}): reconpatch predict takes the models of "
            "`anomalib export --model ReConPatch` (or ReConPatchEnsemble), whose input takes any image size."
        )
        raise ValueError(msg)


def iter_images(source: Path) -> Iterator[Path]:
    """List the images to score: the file itself, or every image below a folder.

    Args:
        source (Path): An image file, or a folder searched recursively.

    Yields:
        Path: ``source`` itself if it is a file (whatever its extension), else every file (or link, even a
        broken one) below it with an ``IMAGE_SUFFIXES`` extension, in sorted order.

    Raises:
        FileNotFoundError: If ``source`` does not exist, or a folder holds no image.
    """
    if source.is_file():
        yield source
        return
    if not source.is_dir():
        msg = f"Input {source} does not exist: pass an image file or a folder of images."
        raise FileNotFoundError(msg)
    found = False
    for path in sorted(source.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES and (path.is_file() or path.is_symlink()):
            found = True
            yield path  # a broken link too: it gets a row that names it, instead of vanishing
    if not found:
        msg = f"No images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {source}."
        raise FileNotFoundError(msg)


def check_output_outside(source: Path, out: Path) -> None:
    """Refuse an output folder inside the input folder: results must never land among the user's images.

    Args:
        source (Path): The input image or folder; for a file, its folder counts.
        out (Path): The output folder.

    Raises:
        ValueError: If ``out`` is that folder or lies below it.
    """
    if not source.exists():  # nothing to protect; the missing input is reported on its own
        return
    source_dir = source.resolve() if source.is_dir() else source.resolve().parent
    if out.resolve() == source_dir or source_dir in out.resolve().parents:
        msg = f"Output folder {out} is inside the input folder {source_dir}: choose a folder elsewhere."
        raise ValueError(msg)


def read_rgb(path: Path) -> np.ndarray:
    """Read an image as the model's input, with the values training read (see :func:`images.read_image`).

    Args:
        path (Path): Image file.

    Returns:
        np.ndarray: ``1 x 3 x H x W`` float32 in [0, 1], contiguous.

    Raises:
        images.UnreadableImageError: If the file is truncated, empty or not an image; the message names it
            and the cause.
    """
    from ..components.images import UnreadableImageError, image_problem, read_image

    try:
        image = read_image(path, channels_first=True)
    except Exception as error:  # PIL raises several types for broken files; the scan names the cause
        reason = image_problem(path)[0] or str(error)
        msg = f"Cannot read image {path}: {reason}. Fix, replace or remove the file."
        raise UnreadableImageError(msg) from error
    return image[None]


MAX_OVERLAY_SIDE = 2048
"""Longest side of an overlay PNG: larger images get a reduced overlay (a full-size one of an 8000 x 6000
photo is a 48-megapixel PNG that takes seconds to write and gigabytes to draw); the score is unaffected."""

OVERLAY_ROWS = 512
"""Image rows converted to 8 bits at a time for the overlay."""


def overlay(image: np.ndarray, anomaly_map: np.ndarray) -> np.ndarray:
    """Blend a jet-coloured anomaly map over the image, at most ``MAX_OVERLAY_SIDE`` pixels on a side.

    Args:
        image (np.ndarray): ``3 x H x W`` image in [0, 1], the model's input.
        anomaly_map (np.ndarray): 2-D anomaly map, clipped to [0, 1] and resized to the overlay's size.

    Returns:
        np.ndarray: ``h x w x 3`` uint8 overlay, 55 % image and 45 % colour; ``h x w`` is ``H x W``, reduced
        with its aspect kept so that the longer side is at most ``MAX_OVERLAY_SIDE``.
    """
    from matplotlib import colormaps
    from PIL import Image

    height, width = image.shape[1:]
    scale = min(1.0, MAX_OVERLAY_SIDE / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    for top in range(0, height, OVERLAY_ROWS):  # in bands: a float copy of a huge image would double its memory
        pixels[top : top + OVERLAY_ROWS] = np.round(image[:, top : top + OVERLAY_ROWS].transpose(1, 2, 0) * 255)
    picture = Image.fromarray(pixels)
    if scale < 1.0:
        picture = picture.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    heat = np.asarray(Image.fromarray(np.clip(anomaly_map, 0, 1).astype(np.float32)).resize(size))
    coloured = colormaps["jet"](heat, bytes=True)[..., :3].astype(np.float32)
    blended = 0.55 * np.asarray(picture, dtype=np.float32) + 0.45 * coloured
    return np.clip(blended, 0, 255).astype(np.uint8)


def overlay_path_for(relative: Path, taken: set[Path]) -> Path:
    """Name an image's overlay under ``overlays/``, so that no two images of a run share one.

    A PNG keeps its name; another image keeps its suffix too (``x.jpg`` gives ``x.jpg.png``), so
    ``x.png`` and ``x.jpg`` in one folder get an overlay each. A name still taken gets ``~2``, ``~3``...

    Args:
        relative (Path): The image's path relative to the input folder.
        taken (set[Path]): Overlay paths already given out in this run; the new one is added.

    Returns:
        Path: The overlay's path relative to ``overlays/``.
    """
    name = relative.with_suffix(".png") if relative.suffix.lower() == ".png" else Path(f"{relative}.png")
    candidate, count = name, 1
    while candidate in taken:
        count += 1
        candidate = name.with_name(f"{name.stem}~{count}.png")
    taken.add(candidate)
    return candidate


STAGING_SUFFIX = ".partial"
"""A run writes ``scores.csv.partial`` and ``overlays.partial/`` and renames them only once it is complete."""


def publish_run(out: Path) -> None:
    """Replace the earlier run's ``scores.csv`` and ``overlays/`` in ``out`` by the completed staged ones.

    Until this runs, an earlier complete run stays as it was, and the ``.partial`` names mark an
    interrupted run as incomplete.

    Args:
        out (Path): The output folder holding ``scores.csv.partial`` and ``overlays.partial/``.
    """
    import shutil

    staged, final = out / f"overlays{STAGING_SUFFIX}", out / "overlays"
    if final.exists():
        previous = out / "overlays.previous"
        shutil.rmtree(previous, ignore_errors=True)
        final.rename(previous)
        staged.rename(final)
        shutil.rmtree(previous)
    else:
        staged.rename(final)
    (out / f"scores.csv{STAGING_SUFFIX}").replace(out / "scores.csv")


class OutputFolderError(ValueError):
    """The output folder cannot be written (permissions, a read-only or full disk, a file in the way)."""


def output_problem(out: Path, error: OSError) -> str:
    """Turn a failed write under ``out`` into one line that says what is wrong and what to do.

    Args:
        out (Path): The output folder.
        error (OSError): The error of the failed write.

    Returns:
        str: The message; it also says that the earlier results in ``out`` are kept.
    """
    import errno

    where = error.filename or out
    kept = f"Earlier results in {out}, if any, are kept."
    if error.errno == errno.ENOSPC:
        return f"The disk is full: writing {where} failed. Free some space or choose another --out. {kept}"
    if error.errno == errno.EROFS:
        return f"{where} is on a read-only file system: choose another --out. {kept}"
    if isinstance(error, PermissionError):
        return f"No permission to write {where}: choose a folder you can write to as --out, or change its permissions."
    if isinstance(error, NotADirectoryError | FileExistsError):
        return f"Cannot create the output folder {out}: a file is in the way at {where}. Choose another --out."
    return f"Cannot write {where}: {error.strerror or error}. Choose another --out. {kept}"


def discard_staged(out: Path) -> None:
    """Remove a failed run's ``.partial`` files (best effort: the disk may be full or read-only)."""
    import contextlib
    import shutil

    shutil.rmtree(out / f"overlays{STAGING_SUFFIX}", ignore_errors=True)
    with contextlib.suppress(OSError):
        (out / f"scores.csv{STAGING_SUFFIX}").unlink(missing_ok=True)


def write_run(
    compiled: object, paths: Iterator[Path], source: Path, out: Path, log: Callable[[str], None]
) -> tuple[int, list[tuple[Path, str]]]:
    """Score every image and write the run under its ``.partial`` names in ``out``.

    Args:
        compiled (object): The compiled OpenVINO model.
        paths (Iterator[Path]): The images to score.
        source (Path): The input image or folder, for the overlays' relative paths.
        out (Path): The output folder.
        log (Callable[[str], None]): Receives a warning per unreadable image.

    Returns:
        tuple[int, list[tuple[Path, str]]]: The number of images scored, and ``(path, error)`` of the skipped ones.
    """
    from PIL import Image

    from ..components.images import UnreadableImageError

    names = {output.get_any_name() for output in compiled.outputs}
    staged_overlays = out / f"overlays{STAGING_SUFFIX}"
    staged_overlays.mkdir()  # even a run without one readable image publishes its (empty) overlays
    count, skipped, taken = 0, [], set()
    with (out / f"scores.csv{STAGING_SUFFIX}").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "score", "label", "overlay", "error"])
        for path in paths:
            try:
                image = read_rgb(path)
            except UnreadableImageError as error:
                log(f"warning: skipped {error}")
                skipped.append((path, str(error)))
                writer.writerow([str(path), "", "", "", str(error)])
                continue
            result = compiled(image)
            score = float(result[compiled.output("pred_score")].reshape(-1)[0])
            label = bool(result[compiled.output("pred_label")].reshape(-1)[0]) if "pred_label" in names else None
            amap = result[compiled.output("anomaly_map")][0]
            relative = overlay_path_for(path.relative_to(source) if source.is_dir() else Path(path.name), taken)
            (staged_overlays / relative).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(overlay(image[0], amap)).save(staged_overlays / relative, format="PNG")
            row = [str(path), f"{score:.6f}", "" if label is None else int(label), str(out / "overlays" / relative), ""]
            writer.writerow(row)
            count += 1
    return count, skipped


def predict(
    model_path: Path,
    source: Path,
    out: Path,
    device: str = "CPU",
    log: Callable[[str], None] = print,
    precision: str = "f32",
) -> PredictSummary:
    """Score every image of ``source`` with the exported model; write overlays and ``scores.csv`` to ``out``.

    Images are read one at a time, so memory stays flat however large the folder. An unreadable image
    is skipped with a warning and gets a row with an empty score and the reason in the ``error``
    column. Overlays keep the input's folder structure under ``out/overlays`` (see :func:`overlay_path_for`).
    The run is written under ``.partial`` names and replaces an earlier run in ``out`` only once it is
    complete, so an error or an interruption never costs the earlier results.

    Args:
        model_path (Path): The exported ``.xml`` (its ``.bin`` beside it) or ``.onnx`` file.
        source (Path): An image file, or a folder searched recursively.
        out (Path): Output folder, outside the input folder; created if needed.
        device (str): OpenVINO device, e.g. ``CPU``.
        log (Callable[[str], None]): Receives the warnings and the closing summary.
        precision (str): One of ``PRECISIONS`` (see :func:`compile_options`).

    Returns:
        PredictSummary: How many images were scored and skipped, how fast, and where ``scores.csv`` is.

    Raises:
        FileNotFoundError: If the model, its ``.bin`` or the input is missing, or the input folder holds no image.
        ValueError: If ``out`` is inside the input folder, or the model or precision is unusable.
        OutputFolderError: If ``out`` cannot be written (permissions, read-only or full disk, a file in the
            way); the run's ``.partial`` files are removed and an earlier run in ``out`` is kept.

    Example:
        >>> from pathlib import Path
        >>> summary = predict(  # doctest: +SKIP
        ...     Path("export/weights/openvino/model.xml"),
        ...     Path("datasets/MVTecAD/bottle/test"),
        ...     Path("predictions/bottle"),
        ... )
        >>> summary.csv_path  # doctest: +SKIP
        PosixPath('predictions/bottle/scores.csv')
    """
    import itertools

    check_output_outside(source, out)
    images = iter_images(source)
    first = next(images)  # a missing or empty input stops here, before anything is written
    compiled = load_compiled_model(model_path, device, precision)
    start = time.perf_counter()
    try:
        out.mkdir(parents=True, exist_ok=True)
        discard_staged(out)  # an interrupted run's leftovers, never a complete run's files
        count, skipped = write_run(compiled, itertools.chain([first], images), source, out, log)
        publish_run(out)
    except OSError as error:
        discard_staged(out)
        raise OutputFolderError(output_problem(out, error)) from error
    csv_path = out / "scores.csv"
    summary = PredictSummary(count, time.perf_counter() - start, csv_path, tuple(skipped))
    log(f"{count} images in {summary.seconds:.1f} s ({summary.images_per_second:.1f} images/s); scores in {csv_path}")
    if skipped:
        log(f"warning: {len(skipped)} unreadable image(s) skipped; see the error column of {csv_path}")
    return summary
