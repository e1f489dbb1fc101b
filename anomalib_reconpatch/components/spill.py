"""Training patch features beyond a memory budget: appended to a file, read back through ``np.memmap``.

The file lives in a fresh directory under the system temporary folder (``TMPDIR``), never next to the
user's data or results. It is removed by :meth:`FeatureSpill.close`, and by a finalizer when the object
is collected or the interpreter exits, so an interrupted fit does not leave it behind.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch


class SpilledFeatures:
    """Read-only ``N x D`` float32 rows of a spill file that index like a tensor: ``x[idx]``, ``x.split(n)``.

    Every read maps the file afresh and unmaps it afterwards, so pages touched by earlier reads do not
    stay in this process's resident memory.
    """

    def __init__(self, path: Path, rows: int, dim: int) -> None:
        self.path = path
        self.shape = torch.Size((rows, dim))

    def __len__(self) -> int:
        return self.shape[0]

    def _map(self) -> np.memmap:
        return np.memmap(self.path, dtype=np.float32, mode="r", shape=tuple(self.shape))

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` (a 1-D integer tensor), copied into a new tensor in that order."""
        return torch.from_numpy(self._map()[index.numpy()])

    def split(self, size: int) -> Iterator[torch.Tensor]:
        """Consecutive chunks of at most ``size`` rows, one in memory at a time."""
        for start in range(0, len(self), size):
            yield torch.from_numpy(np.array(self._map()[start : start + size]))


class FeatureSpill:
    """An append-only float32 row file in its own temporary directory."""

    def __init__(self, dim: int, directory: str | Path | None = None) -> None:
        self.dim = dim
        self.rows = 0
        self.folder = Path(tempfile.mkdtemp(prefix="reconpatch-features-", dir=directory))
        self.path = self.folder / "features.f32"
        self._file = self.path.open("wb")
        self._cleanup = weakref.finalize(self, _remove, self._file, self.folder)

    def append(self, rows: torch.Tensor) -> None:
        """Write ``n x dim`` rows at the end of the file."""
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            msg = f"Spilled feature rows must be n x {self.dim}, got {tuple(rows.shape)}."
            raise ValueError(msg)
        self._file.write(rows.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        self.rows += rows.shape[0]

    def features(self) -> SpilledFeatures:
        """Finish writing and return the rows for reading."""
        self._file.flush()
        return SpilledFeatures(self.path, self.rows, self.dim)

    def close(self) -> None:
        """Delete the file and its directory (idempotent)."""
        self._cleanup()


def _remove(file: BinaryIO, folder: Path) -> None:
    file.close()
    shutil.rmtree(folder, ignore_errors=True)
