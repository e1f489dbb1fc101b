"""Build the frozen timm backbone, failing early with errors that say what to do."""

from __future__ import annotations

import difflib
import socket
from collections.abc import Sequence
from urllib.parse import urlparse

from anomalib.models.components import TimmFeatureExtractor

from .hub_cache import LITE_VARIANTS, repo_cache_dir

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class BackboneError(ValueError):
    """The backbone, its layers or its weights cannot be used as configured."""


def _hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face hub's host resolves and accepts a connection (fails fast offline)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname or ""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def pretrained_weights_location(backbone: str) -> tuple[str | None, bool]:
    """The hub repository timm loads ``backbone``'s default weights from, and whether they are cached."""
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(backbone)
    repo_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo_id:
        return None, False
    cached = any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in WEIGHT_FILES)
    return repo_id, cached


def missing_weights_message(backbone: str, repo_id: str) -> str:
    """Explain where the weights were looked for and the two ways out."""
    lite = ", ".join(f"tf_efficientnet_lite{v}" for v in LITE_VARIANTS)
    return (
        f"ImageNet weights for backbone '{backbone}' are not available offline: looked for "
        f"{' or '.join(WEIGHT_FILES)} of '{repo_id}' in {repo_cache_dir(repo_id)} (set by HF_HOME / HF_HUB_CACHE). "
        f"Either run once with internet access so timm can download them into that cache, or run "
        f"`reconpatch weights` and choose an EfficientNet-Lite backbone ({lite}), for example "
        f'--model.backbone tf_efficientnet_lite0 --model.layers "[blocks.2, blocks.4]".'
    )


def check_backbone_name(backbone: str) -> None:
    """Reject names timm does not know, suggesting close ones."""
    import timm

    if timm.is_model(backbone):
        return
    close = difflib.get_close_matches(backbone, timm.list_models(), n=6, cutoff=0.6)
    hint = f" Similar names: {', '.join(close)}." if close else ""
    msg = f"Unknown backbone '{backbone}': timm has no model of that name.{hint} See timm.list_models()."
    raise BackboneError(msg)


def build_feature_extractor(backbone: str, layers: Sequence[str], pre_trained: bool) -> TimmFeatureExtractor:
    """A frozen :class:`TimmFeatureExtractor` that has exactly the requested layers and real weights."""
    check_backbone_name(backbone)
    if pre_trained:
        repo_id, cached = pretrained_weights_location(backbone)
        if repo_id is not None and not cached and not _hub_reachable():
            raise BackboneError(missing_weights_message(backbone, repo_id))
    extractor = TimmFeatureExtractor(backbone=backbone, layers=list(layers), pre_trained=pre_trained)
    if len(extractor.layers) != len(layers):
        available = [info["module"] for info in extractor.feature_extractor.feature_info.info]
        missing = [layer for layer in layers if layer not in extractor.layers]
        msg = (
            f"Backbone '{backbone}' has no feature layer(s) {missing}. "
            f"Choose layers from {available} (ReConPatch uses two consecutive middle stages)."
        )
        raise BackboneError(msg)
    return extractor.eval()
