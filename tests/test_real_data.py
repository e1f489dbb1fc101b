"""End to end on real industrial images (MVTec AD bottle); skipped where ../shared/data is absent."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.deploy import ExportType, OpenVINOInferencer
from anomalib.engine import Engine

from anomalib_reconpatch import ReConPatch
from anomalib_reconpatch.tools.predict import compile_options, load_compiled_model, predict, read_rgb

from .conftest import BACKBONE, LAYERS

KOLEKTOR_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "kolektorsdd" / "kolektor" / "test"


@pytest.fixture(scope="module")
def bottle_fit(bottle_root: Path, lite_weights: None, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """ReConPatch fitted by the Engine on MVTec AD bottle at the README table's coreset ratio 0.01."""
    torch.manual_seed(0)
    datamodule = MVTecAD(root=bottle_root, category="bottle", num_workers=2)
    model = ReConPatch(backbone=BACKBONE, layers=LAYERS, coreset_sampling_ratio=0.01)
    engine = Engine(default_root_dir=tmp_path_factory.mktemp("bottle"), logger=False)
    engine.fit(model=model, datamodule=datamodule)
    return model, engine, datamodule


@pytest.mark.slow
def test_bottle_reaches_the_published_accuracy(bottle_fit: tuple) -> None:
    model, engine, datamodule = bottle_fit
    metrics = engine.test(model=model, datamodule=datamodule)[0]
    assert model.model.memory_bank.shape == (2140, 152)
    assert metrics["image_AUROC"] >= 0.99
    assert metrics["pixel_AUROC"] >= 0.97


def real_size_files(bottle_root: Path, folder: Path) -> dict[str, Path]:
    """Links in ``folder`` to every bottle test image (320 px) and to KolektorSDD test images at their own
    aspect, and a 333x517 image made from a bottle image; each file's name mapped to its source."""
    from PIL import Image

    folder.mkdir()
    sources = sorted((bottle_root / "bottle" / "test").glob("*/*.png"))
    if KOLEKTOR_TEST.is_dir():
        sources += sorted(KOLEKTOR_TEST.glob("*/*.jpg"))[::6]
    files = {}
    for index, source in enumerate(sources):
        (folder / f"{index:03d}_{source.name}").symlink_to(source)
        files[f"{index:03d}_{source.name}"] = source
    Image.open(sources[0]).convert("RGB").resize((517, 333)).save(folder / "odd_333x517.png")
    files["odd_333x517.png"] = sources[0]
    return files


@pytest.mark.slow
def test_exported_model_scores_real_size_files_as_engine_predict_does(
    bottle_fit: tuple, bottle_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from anomalib.metrics import AUROC

    model, engine, _ = bottle_fit
    monkeypatch.chdir(tmp_path)  # the inferencer writes openvino_cache/ into the working directory
    xml = engine.export(model=model, export_type=ExportType.OPENVINO, export_root=tmp_path / "export")
    sources = real_size_files(bottle_root, tmp_path / "images")
    files = sorted(tmp_path / "images" / name for name in sources)
    assert {read_rgb(f).shape[-2:] for f in files} >= {(320, 320), (333, 517)}

    batches = engine.predict(model=model, data_path=tmp_path / "images")
    reference = {
        Path(b.image_path[0]).name: (float(b.pred_score), b.anomaly_map.reshape(256, 256).numpy()) for b in batches
    }
    assert sorted(reference) == [f.name for f in files]
    scores = np.array([reference[f.name][0] for f in files])
    maps = np.stack([reference[f.name][1] for f in files])
    score_range, map_range = np.ptp(scores), np.ptp(maps)

    inferencer = OpenVINOInferencer(path=xml, device="CPU", config=compile_options())
    results = [inferencer.predict(f) for f in files]
    ov_scores = np.array([float(np.asarray(r.pred_score).reshape(-1)[0]) for r in results])
    ov_maps = np.stack([np.asarray(r.anomaly_map).reshape(256, 256) for r in results])
    assert np.abs(ov_scores - scores).max() <= 1e-3 * score_range
    assert np.abs(ov_maps - maps).max() <= 1e-2 * map_range

    predict(xml, tmp_path / "images", tmp_path / "predictions", log=lambda _: None)
    with (tmp_path / "predictions" / "scores.csv").open() as handle:
        tool_scores = {Path(row["image"]).name: float(row["score"]) for row in csv.DictReader(handle)}
    assert np.abs(np.array([tool_scores[f.name] for f in files]) - scores).max() <= 1e-3 * score_range
    compiled = load_compiled_model(xml)
    tool_maps = np.stack([compiled(read_rgb(f))[compiled.output("anomaly_map")].reshape(256, 256) for f in files])
    assert np.abs(tool_maps - maps).max() <= 1e-2 * map_range

    bottle = [i for i, f in enumerate(files) if f.suffix == ".png" and f.name != "odd_333x517.png"]
    labels = torch.tensor([int(sources[files[i].name].parent.name != "good") for i in bottle])
    aurocs = []
    for values in (scores, ov_scores):
        metric = AUROC(fields=["pred_score", "gt_label"])
        metric.update(SimpleNamespace(pred_score=torch.from_numpy(values[bottle]), gt_label=labels))
        aurocs.append(round(float(metric.compute()), 3))
    assert aurocs[0] == aurocs[1]
