"""Keep the C heap from growing without bound in long loops of large temporaries."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter number


OWN_MODELS_THRESHOLD = 4 * 2**20
"""ReConPatch's models: their fit's many temporaries of up to a few MB stay on the heap, reused."""

STOCK_MODELS_THRESHOLD = 128 * 2**10
"""Every other model, stock Patchcore among them: glibc's own starting threshold, never raised."""


def compare_mmap_threshold(model_name: str) -> int:
    """The mmap threshold that ``reconpatch compare`` fixes in a model's run, in bytes.

    Stock PatchCore's coreset loop (anomalib's ``KCenterGreedy``) allocates a vector of one float per
    patch at every selection and keeps the selected index, a small tensor. Below the threshold each
    vector comes from the heap, the kept indices land in the freed vectors' space, and about one
    vector a selection stays behind, so at 4 MiB the loop grew to 19 GB on MVTec AD bottle at ratio
    0.1 and was killed at 21.5 GiB on KolektorSDD at 640 x 256; at 128 KiB it stays flat, as fast.
    ReConPatch's representation training makes many temporaries of a few hundred KB a step: mapped
    afresh each time, its fit took 1.4x to 2.3x as long, so it keeps 4 MiB. The measurements are in
    ``docs/design/feature-spill.md``.

    Args:
        model_name (str): The compared model's class name, such as ``ReConPatch`` or ``Patchcore``.

    Returns:
        int: The threshold in bytes.

    Example:
        >>> compare_mmap_threshold("ReConPatchEnsemble"), compare_mmap_threshold("Patchcore")
        (4194304, 131072)
    """
    return OWN_MODELS_THRESHOLD if model_name in {"ReConPatch", "ReConPatchEnsemble"} else STOCK_MODELS_THRESHOLD


def fix_mmap_threshold(threshold_bytes: int) -> bool:
    """Serve allocations above ``threshold_bytes`` by mmap and return them to the OS on free (glibc only).

    glibc raises its mmap threshold after each large free (up to 32 MiB), after which large
    temporaries come from the heap and fragment it, and a loop of large temporaries such as stock
    PatchCore's coreset selection can grow until it is killed. A fixed threshold keeps the
    temporaries above it out of the heap (:func:`compare_mmap_threshold` picks one per model).

    Args:
        threshold_bytes (int): Size in bytes from which allocations are served by mmap.

    Returns:
        bool: Whether the setting was applied; False off glibc or when ``mallopt`` refuses it.
    """
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        applied = bool(libc.mallopt(M_MMAP_THRESHOLD, threshold_bytes))
    except (OSError, AttributeError):
        return False
    logger.debug("mallopt(M_MMAP_THRESHOLD, %d) -> %s", threshold_bytes, applied)
    return applied


@contextmanager
def peak_rss() -> Iterator[dict[str, float]]:
    """Sample this process's resident memory every 20 ms while the block runs.

    Yields:
        dict[str, float]: ``{"peak_rss_mb": ...}``, the largest resident memory seen so far, in MiB;
        final once the block has ended.
    """
    import psutil

    process, result, stop = psutil.Process(), {"peak_rss_mb": 0.0}, threading.Event()

    def sample() -> None:
        while not stop.is_set():
            result["peak_rss_mb"] = max(result["peak_rss_mb"], process.memory_info().rss / 2**20)
            stop.wait(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
