"""ReConPatch for anomalib: contrastive patch representations for industrial anomaly detection."""

from .lightning_model import ReConPatch
from .torch_model import ReConPatchModel

__all__ = ["ReConPatch", "ReConPatchModel"]
__version__ = "0.1.0"
