"""ReConPatch for anomalib: contrastive patch representations for industrial anomaly detection."""

import anomalib.models as _anomalib_models

from .lightning_model import ReConPatch
from .torch_model import ReConPatchModel

# ``anomalib benchmark`` resolves a bare ``class_path`` as an attribute of anomalib.models.
_anomalib_models.ReConPatch = ReConPatch

__all__ = ["ReConPatch", "ReConPatchModel"]
__version__ = "0.1.0"
