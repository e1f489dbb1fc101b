"""Build the frozen timm backbone, failing early with errors that say what to do.

timm and anomalib report a wrong backbone name, a missing feature layer or unavailable offline weights
late or not at all: an unknown layer is dropped with a warning, and missing weights surface as a
download error. The checks here run before the extractor is built and name the fix.
"""

from __future__ import annotations

import difflib
import socket
from collections.abc import Sequence
from urllib.parse import urlparse

from anomalib.models.components import TimmFeatureExtractor

from .hub_cache import LITE_VARIANTS, repo_cache_dir

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class BackboneError(ValueError):
    """The backbone, its layers or its weights cannot be used as configured.

    A ``ValueError``, so the ``reconpatch`` commands and the stock CLI report it as bad input.
    """


def _hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face hub's host resolves and accepts a connection (fails fast offline).

    Args:
        timeout (float): Seconds to wait for the connection.

    Returns:
        bool: False when ``HF_HUB_OFFLINE`` is set or the host cannot be reached.
    """
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
    """Find the hub repository that timm loads ``backbone``'s default weights from.

    Args:
        backbone (str): timm model name.

    Returns:
        tuple[str | None, bool]: The repository id (None when timm names no hub repository for the
        model) and whether one of its weight files (``WEIGHT_FILES``) is already in the local cache.
    """
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(backbone)
    repo_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo_id:
        return None, False
    cached = any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in WEIGHT_FILES)
    return repo_id, cached


def missing_weights_message(backbone: str, repo_id: str) -> str:
    """Explain where the weights were looked for and the two ways out.

    The ways out: run once online so timm downloads the weights, or install the EfficientNet-Lite
    weights offline with ``reconpatch weights`` and use one of those backbones.

    Args:
        backbone (str): timm model name.
        repo_id (str): Hub repository the weights come from.

    Returns:
        str: The error message, naming the cache folder and the environment variables that set it.
    """
    lite = ", ".join(f"tf_efficientnet_lite{v}" for v in LITE_VARIANTS)
    return (
        f"ImageNet weights for backbone '{backbone}' are not available offline: looked for "
        f"{' or '.join(WEIGHT_FILES)} of '{repo_id}' in {repo_cache_dir(repo_id)} (set by HF_HOME / HF_HUB_CACHE). "
        f"Either run once with internet access so timm can download them into that cache, or run "
        f"`reconpatch weights` and choose an EfficientNet-Lite backbone ({lite}), for example "
        f'--model.backbone tf_efficientnet_lite0 --model.layers "[blocks.2, blocks.4]".'
    )


def check_backbone_name(backbone: str) -> None:
    """Reject names timm does not know, suggesting close ones.

    Args:
        backbone (str): timm model name.

    Raises:
        BackboneError: If timm has no model of that name; the message lists up to six similar names.
    """
    import timm

    if timm.is_model(backbone):
        return
    close = difflib.get_close_matches(backbone, timm.list_models(), n=6, cutoff=0.6)
    hint = f" Similar names: {', '.join(close)}." if close else ""
    msg = f"Unknown backbone '{backbone}': timm has no model of that name.{hint} See timm.list_models()."
    raise BackboneError(msg)


def build_feature_extractor(backbone: str, layers: Sequence[str], pre_trained: bool) -> TimmFeatureExtractor:
    """Build a frozen :class:`TimmFeatureExtractor` with exactly the requested layers and real weights.

    The name is checked first; with ``pre_trained``, weights that are neither cached nor downloadable
    (the hub cannot be reached) fail here instead of inside timm. anomalib's extractor drops a layer
    the backbone does not have with only a warning, so a missing layer is an error here.

    Args:
        backbone (str): timm model name.
        layers (Sequence[str]): Names of the feature layers to return, e.g. ``["blocks.2", "blocks.4"]``.
        pre_trained (bool): Load ImageNet weights.

    Returns:
        TimmFeatureExtractor: The extractor, in eval mode.

    Raises:
        BackboneError: If the name is unknown, the weights are unavailable offline, or a layer is missing
            (the message lists the layers the backbone has).

    Example:
        >>> import torch
        >>> extractor = build_feature_extractor(  # doctest: +SKIP
        ...     "tf_efficientnet_lite0", ["blocks.2", "blocks.4"], pre_trained=True
        ... )
        >>> features = extractor(torch.rand(1, 3, 256, 256))  # doctest: +SKIP
        >>> sorted(features)  # doctest: +SKIP
        ['blocks.2', 'blocks.4']
    """
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
