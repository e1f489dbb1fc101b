"""The models ``reconpatch compare`` builds: any anomalib memory-bank model on the shared settings."""

from __future__ import annotations

from typing import Any

from .settings import CompareSettings, image_shape


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
        ValueError: If ``anomalib.models`` has no class of that name.
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
    if issubclass(model_class, reconpatch.ReConPatch):
        kwargs.update(settings.reconpatch_args)
    return model_class(**kwargs)
