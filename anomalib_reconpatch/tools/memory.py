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


def fix_mmap_threshold(threshold_bytes: int = 4 * 2**20) -> bool:
    """Serve allocations above ``threshold_bytes`` by mmap and return them to the OS on free (glibc only).

    glibc raises its mmap threshold after each large free, after which multi-megabyte temporaries
    come from the heap and fragment it, and a loop of large temporaries such as stock PatchCore's
    coreset selection can grow until it is killed. Fixing the threshold keeps such a loop's memory
    flat; the measurement is in ``docs/design/feature-spill.md``.

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
