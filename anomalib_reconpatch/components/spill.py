"""Training patch features beyond a memory budget: appended to a file, read back through ``np.memmap``.

The file lives in a fresh directory under the system temporary folder (``TMPDIR``), never next to the
user's data or results. It is removed by :meth:`FeatureSpill.close`, and by a finalizer when the object
is collected or the interpreter exits, so an interrupted fit does not leave it behind. A killed process
(SIGKILL) runs no finalizer: its directory names its process id, and the next fit removes the
directories of processes that no longer run (:func:`remove_orphaned_spills`). Why and when features
spill: ``docs/design/feature-spill.md``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

logger = logging.getLogger(__name__)

SPILL_PREFIX = "reconpatch-features-"
"""Spill directories are ``<TMPDIR>/reconpatch-features-<pid>-<random>``."""


class SpilledFeatures:
    """Read-only ``N x D`` float32 rows of a spill file that index like a tensor: ``x[idx]``, ``x.split(n)``.

    Every read maps the file afresh and unmaps it afterwards, so pages touched by earlier reads do not
    stay in this process's resident memory.

    Args:
        path (Path): The spill file.
        rows (int): Number of rows ``N`` in the file.
        dim (int): Row length ``D``.

    Attributes:
        path (Path): The spill file.
        shape (torch.Size): ``(N, D)``, as a tensor's.
    """

    def __init__(self, path: Path, rows: int, dim: int) -> None:
        self.path = path
        self.shape = torch.Size((rows, dim))

    def __len__(self) -> int:
        return self.shape[0]

    def _map(self) -> np.memmap:
        """Map the whole file read-only; the map is released when the returned array is."""
        return np.memmap(self.path, dtype=np.float32, mode="r", shape=tuple(self.shape))

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        """Read rows ``index``, copied into a new tensor in that order.

        Args:
            index (torch.Tensor): 1-D integer tensor of row indices.

        Returns:
            torch.Tensor: ``len(index) x D`` float32 rows.
        """
        return torch.from_numpy(self._map()[index.numpy()])

    def split(self, size: int) -> Iterator[torch.Tensor]:
        """Read the rows in consecutive chunks, one chunk in memory at a time.

        Args:
            size (int): Largest number of rows in a chunk.

        Yields:
            torch.Tensor: The next chunk of at most ``size x D`` float32 rows.
        """
        for start in range(0, len(self), size):
            yield torch.from_numpy(np.array(self._map()[start : start + size]))


class FeatureSpill:
    """An append-only float32 row file in its own temporary directory.

    Holds training patch features beyond the memory budget: rows are appended as they come, then read
    back through :class:`SpilledFeatures` without loading the whole file.

    Args:
        dim (int): Row length ``D``; every appended row must have it.
        directory (str | Path | None): Where to create the temporary directory; None uses ``TMPDIR``.

    Attributes:
        dim (int): Row length.
        rows (int): Rows written so far.
        folder (Path): The temporary directory (``reconpatch-features-<pid>-*``).
        path (Path): The row file, ``features.f32`` in ``folder``.

    Example:
        >>> import torch
        >>> spill = FeatureSpill(dim=4)
        >>> spill.append(torch.ones(3, 4))
        >>> spill.append(torch.zeros(2, 4))
        >>> features = spill.features()
        >>> features.shape
        torch.Size([5, 4])
        >>> features[torch.tensor([4, 0])]
        tensor([[0., 0., 0., 0.],
                [1., 1., 1., 1.]])
        >>> spill.close()
    """

    def __init__(self, dim: int, directory: str | Path | None = None) -> None:
        self.dim = dim
        self.rows = 0
        self.folder = Path(tempfile.mkdtemp(prefix=f"{SPILL_PREFIX}{os.getpid()}-", dir=directory))
        self.path = self.folder / "features.f32"
        self._file = self.path.open("wb")
        self._cleanup = weakref.finalize(self, _remove, self._file, self.folder)

    def append(self, rows: torch.Tensor) -> None:
        """Write rows at the end of the file, as float32.

        Args:
            rows (torch.Tensor): ``n x dim`` rows, on any device and of any float dtype.

        Raises:
            ValueError: If ``rows`` is not ``n x dim``.
            OSError: If the write fails (a full disk); the spill file is removed first, and the message
                says where and what to do.
        """
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            msg = f"Spilled feature rows must be n x {self.dim}, got {tuple(rows.shape)}."
            raise ValueError(msg)
        try:
            self._file.write(rows.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        except OSError as error:  # a full disk, most likely: free it at once and say where it filled up
            written = self.rows * self.dim * 4 / 2**20
            self.close()
            msg = (
                f"Writing the feature spill file under {self.folder.parent} failed after {written:.0f} MB "
                f"({error.strerror or error}); the file is removed. Point TMPDIR at a disk with more room, or raise "
                "--model.feature_memory_mb to keep more features in RAM."
            )
            raise OSError(error.errno, msg) from error
        self.rows += rows.shape[0]

    def features(self) -> SpilledFeatures:
        """Flush what was written and return the rows for reading.

        Returns:
            SpilledFeatures: The ``rows x dim`` rows written so far.
        """
        self._file.flush()
        return SpilledFeatures(self.path, self.rows, self.dim)

    def close(self) -> None:
        """Delete the file and its directory; calling it again does nothing."""
        self._cleanup()


def _remove(file: BinaryIO, folder: Path) -> None:
    """Close the row file and delete its directory (the finalizer of :class:`FeatureSpill`)."""
    file.close()
    shutil.rmtree(folder, ignore_errors=True)


def remove_orphaned_spills(directory: str | Path | None = None) -> list[Path]:
    """Delete the spill directories that killed processes left behind: this user's, of processes gone.

    A directory whose process still runs (another fit, maybe) is kept, and so is one that another user
    owns or whose name does not carry a process id.

    Args:
        directory (str | Path | None): The temporary folder to search; None uses ``TMPDIR``.

    Returns:
        list[Path]: The directories removed.
    """
    removed = []
    for folder in Path(directory or tempfile.gettempdir()).glob(f"{SPILL_PREFIX}*"):
        pid = folder.name[len(SPILL_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or folder.stat().st_uid != os.getuid() or _running(int(pid)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
        logger.info("ReConPatch: removed %s, left by a killed run (process %s)", folder, pid)
    return removed


def _running(pid: int) -> bool:
    """Whether a process with this id exists (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
