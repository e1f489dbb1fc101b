"""End to end on real industrial images (MVTec AD bottle); skipped where ../shared/data is absent."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine

from anomalib_reconpatch import ReConPatch

from .conftest import BACKBONE, LAYERS


@pytest.mark.slow
def test_bottle_reaches_the_published_accuracy(bottle_root: Path, lite_weights: None, tmp_path: Path) -> None:
    torch.manual_seed(0)
    datamodule = MVTecAD(root=bottle_root, category="bottle", num_workers=2)
    model = ReConPatch(backbone=BACKBONE, layers=LAYERS, coreset_sampling_ratio=0.01)  # the README table's ratio
    engine = Engine(default_root_dir=tmp_path, logger=False)
    engine.fit(model=model, datamodule=datamodule)
    metrics = engine.test(model=model, datamodule=datamodule)[0]
    assert model.model.memory_bank.shape == (2140, 152)
    assert metrics["image_AUROC"] >= 0.99
    assert metrics["pixel_AUROC"] >= 0.97
