"""Nothing is ever written inside the user's data folder: train, test, export and predict leave it byte-identical."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.deploy import ExportType
from anomalib.engine import Engine

from anomalib_reconpatch import ReConPatch
from anomalib_reconpatch.tools.predict import predict

from .conftest import BACKBONE, LAYERS


def fingerprint(folder: Path) -> dict[str, tuple[int, str] | None]:
    """Every file and folder below ``folder``: size and SHA-256 of files, ``None`` for folders."""
    return {
        str(path.relative_to(folder)): (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
        if path.is_file()
        else None
        for path in sorted(folder.rglob("*"))
    }


@pytest.mark.slow
def test_train_test_export_predict_leave_the_data_folder_unchanged(
    lite_weights: None, demo_root: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(demo_root / "grass", data / "grass")
    before = fingerprint(data)
    assert len([key for key, value in before.items() if value]) > 40  # images, masks and the demo marker

    torch.manual_seed(0)
    datamodule = MVTecAD(root=data, category="grass", num_workers=0)
    model = ReConPatch(backbone=BACKBONE, layers=LAYERS, num_steps=20, coreset_sampling_ratio=0.02)
    engine = Engine(default_root_dir=tmp_path / "results", logger=False)
    engine.fit(model=model, datamodule=datamodule)
    engine.test(model=model, datamodule=datamodule)
    xml = engine.export(model=model, export_type=ExportType.OPENVINO, export_root=tmp_path / "export")
    summary = predict(Path(xml), data / "grass" / "test", tmp_path / "predictions", log=lambda _: None)

    assert summary.images == 18
    assert any((tmp_path / "results").rglob("*.png"))  # the visualiser did write, but elsewhere
    assert fingerprint(data) == before
