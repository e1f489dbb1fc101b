"""ReConPatch: Contrastive Patch Representation Learning for Industrial Anomaly Detection.

Paper: Hyun et al., WACV 2024, https://arxiv.org/abs/2305.16713

PatchCore's patch features from a frozen ImageNet CNN are mapped by a linear representation ``f``,
trained on the normal images alone with a relaxed contrastive loss whose soft targets mix a pairwise
and a contextual similarity from EMA copies of ``f`` and its projection ``g``. A coreset of
``f(features)`` is the memory bank; a test patch scores its distance to the nearest bank row.

Training, testing and export with anomalib's ``Engine``: the Example of :mod:`.lightning_model`; the
ensemble of several backbones (the paper's headline setting): :mod:`.ensemble`.
See ``README.md`` beside this file for the method, the choices where the paper is silent and benchmarks.
"""

from .ensemble import ReConPatchEnsemble, ReConPatchEnsembleModel
from .lightning_model import ReConPatch
from .torch_model import ReConPatchModel

__all__ = ["ReConPatch", "ReConPatchEnsemble", "ReConPatchEnsembleModel", "ReConPatchModel"]
