"""ReConPatch for anomalib: contrastive patch representations for industrial anomaly detection.

- ``anomalib_reconpatch.reconpatch``: the model, shaped like one of anomalib's ``models/image/`` folders.
- ``anomalib_reconpatch.components``: reusable pieces the model builds on (backbone, coreset, spill, ...).
- ``anomalib_reconpatch.tools``: the ``reconpatch`` command; the model never imports it.

``ReConPatch``, ``ReConPatchEnsemble`` and ``ReConPatchModel`` are imported on first use, so
``reconpatch predict`` runs on OpenVINO without torch or anomalib.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ReConPatch", "ReConPatchEnsemble", "ReConPatchModel"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Import the model on first use, so ``reconpatch predict`` runs on OpenVINO without torch and anomalib.

    Args:
        name (str): The attribute asked for.

    Returns:
        Any: The ``ReConPatch`` or ``ReConPatchEnsemble`` Lightning model class, or the ``ReConPatchModel``
        torch model class.

    Raises:
        AttributeError: For any other name.
    """
    if name == "ReConPatch":
        from .reconpatch.lightning_model import ReConPatch

        return ReConPatch
    if name == "ReConPatchEnsemble":
        from .reconpatch.ensemble import ReConPatchEnsemble

        return ReConPatchEnsemble
    if name == "ReConPatchModel":
        from .reconpatch.torch_model import ReConPatchModel

        return ReConPatchModel
    msg = f"module 'anomalib_reconpatch' has no attribute '{name}'"
    raise AttributeError(msg)
