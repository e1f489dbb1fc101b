"""What the benchmark scripts share: the data arguments and the backbone pass over a split."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from anomalib_reconpatch import ReConPatch
from anomalib_reconpatch.compare import build_datamodule, load_datamodule_config


def data_parser(description: str | None) -> argparse.ArgumentParser:
    """A parser with ``--data`` (a datamodule YAML), ``--backbone`` and ``--layers``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--layers", nargs="+", default=["blocks.2", "blocks.4"])
    return parser


def load_data(args: argparse.Namespace, **model_args: object) -> tuple:
    """The set-up datamodule of ``--data`` and a ReConPatch on ``--backbone``/``--layers`` to extract with."""
    datamodule = build_datamodule(load_datamodule_config(args.data), seed=0)
    datamodule.setup()
    return datamodule, ReConPatch(backbone=args.backbone, layers=args.layers, **model_args)


@torch.no_grad()
def cache(model: ReConPatch, loader: torch.utils.data.DataLoader, test: bool) -> dict:
    """Raw patch features of a whole split, plus labels and image-size masks for a test split."""
    transform = model.pre_processor.transform
    out: dict[str, list] = {"features": [], "labels": [], "masks": []}
    for batch in loader:
        images = transform(batch.image)
        out["features"].append(model.model.patch_features(images))
        if test:
            out["labels"].append(batch.gt_label)
            masks = batch.gt_mask.float().reshape(len(images), 1, *batch.gt_mask.shape[-2:])
            out["masks"].append(torch.nn.functional.interpolate(masks, size=images.shape[-2:], mode="nearest")[:, 0])
    return {k: torch.cat(v) for k, v in out.items() if v}


def flat_patches(features: torch.Tensor) -> torch.Tensor:
    """``B x D x h x w`` -> ``(B h w) x D`` patch rows."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
