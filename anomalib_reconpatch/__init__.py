"""ReConPatch for anomalib: contrastive patch representations for industrial anomaly detection."""

from __future__ import annotations

from typing import Any

__all__ = ["ReConPatch", "ReConPatchModel"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Import the model on first use, so ``reconpatch predict`` runs on OpenVINO without torch and anomalib."""
    if name == "ReConPatch":
        from .lightning_model import ReConPatch

        return ReConPatch
    if name == "ReConPatchModel":
        from .torch_model import ReConPatchModel

        return ReConPatchModel
    msg = f"module 'anomalib_reconpatch' has no attribute '{name}'"
    raise AttributeError(msg)
