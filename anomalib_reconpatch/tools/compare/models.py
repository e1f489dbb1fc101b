"""The models ``reconpatch compare`` builds: any anomalib memory-bank model on the shared settings."""

from __future__ import annotations

import re
from typing import Any

from .settings import CompareSettings, image_shape

OWN_FLAGS = {"backbone": "--backbone", "layers": "--layers", "coreset_sampling_ratio": "--coreset-ratio"}
"""Model settings that ``reconpatch compare`` sets with a flag of its own; the rest go through ``--reconpatch``."""


def compare_flags(message: str) -> str:
    """Rewrite the anomalib CLI flags in a model's error (``--model.k``) as the flags compare takes.

    Args:
        message (str): The model's error message.

    Returns:
        str: The message naming ``--backbone``, ``--layers``, ``--coreset-ratio`` or ``--reconpatch NAME=...``.

    Example:
        >>> compare_flags("k=0 is out of range; expected an integer >= 1 (set --model.k).")
        'k=0 is out of range; expected an integer >= 1 (set --reconpatch k=...).'
        >>> compare_flags("raise --model.coreset_sampling_ratio=0.001")
        'raise --coreset-ratio'
    """

    def flag(match: re.Match) -> str:
        name = match.group(1)
        return OWN_FLAGS.get(name, f"--reconpatch {name}=...")

    return re.sub(r"--model\.(\w+)(=\S*)?", flag, message)


def make_evaluator() -> Any:
    """Build the evaluator that every compared model gets.

    Returns:
        Any: anomalib's ``Evaluator`` with image AUROC and F1 (adaptive threshold), pixel AUROC, and
        ``pixel_PRO`` (AUPRO up to a 30% false-positive rate).
    """
    from anomalib.metrics import AUPRO, AUROC, Evaluator, F1Score

    pro = AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", fpr_limit=0.3, strict=False)
    pro.name = "pixel_PRO"
    return Evaluator(
        test_metrics=[
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            F1Score(fields=["pred_label", "gt_label"], prefix="image_"),
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            pro,
        ]
    )


def takes_reconpatch_args(name: str) -> bool:
    """Whether the model of this class name gets ``settings.reconpatch_args``: ReConPatch and its ensemble.

    Args:
        name (str): An ``anomalib.models`` class name.

    Returns:
        bool: ``True`` for ``ReConPatch``, ``ReConPatchEnsemble`` and their subclasses.
    """
    import anomalib.models

    from ... import reconpatch

    model_class = getattr(anomalib.models, name, None)
    return isinstance(model_class, type) and issubclass(model_class, reconpatch.ReConPatch)


def build_model(name: str, settings: CompareSettings) -> Any:
    """Build ReConPatch, its ensemble or any anomalib memory-bank model by class name, on the shared settings.

    Every model gets the same layers, coreset ratio, image size and evaluator, and no visualizer;
    single-backbone models get ``settings.backbone``, while ``ReConPatchEnsemble`` keeps its own backbones;
    both ReConPatch models also get ``settings.reconpatch_args``.

    Args:
        name (str): An ``anomalib.models`` class name, such as ``ReConPatch``, ``ReConPatchEnsemble`` or ``Patchcore``.
        settings (CompareSettings): The shared settings.

    Returns:
        Any: The unfitted Lightning model.

    Raises:
        ValueError: If ``anomalib.models`` has no class of that name, or a setting is wrong; the message
            names compare's own flags.
    """
    import anomalib.models

    from ... import reconpatch

    model_class = getattr(anomalib.models, name, None)
    if not isinstance(model_class, type):
        msg = f"Unknown model '{name}': use an anomalib model class name such as ReConPatch or Patchcore."
        raise ValueError(msg)
    kwargs: dict[str, Any] = {
        "layers": settings.layers,
        "coreset_sampling_ratio": settings.coreset_ratio,
        "pre_processor": model_class.configure_pre_processor(image_size=image_shape(settings.image_size)),
        "evaluator": make_evaluator(),
        "visualizer": False,
    }
    if not issubclass(model_class, reconpatch.ReConPatchEnsemble):
        kwargs["backbone"] = settings.backbone
    if takes_reconpatch_args(name):
        kwargs.update(settings.reconpatch_args)
    try:
        return model_class(**kwargs)
    except ValueError as error:
        raise ValueError(compare_flags(str(error))) from error
    except TypeError as error:  # an unknown --reconpatch name
        unknown = re.search(r"'(\w+)'", str(error))
        msg = (
            f"{name} has no setting {unknown.group(1) if unknown else 'of a name given'}: check the names given to "
            f"--reconpatch ({', '.join(settings.reconpatch_args) or 'none'}) against the model's README."
        )
        raise ValueError(msg) from error
