"""The ensemble: members standardised by their own training images, one exported graph, by name in the CLI."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine

from anomalib_reconpatch import ReConPatch, ReConPatchEnsemble
from anomalib_reconpatch.reconpatch.anomaly_map import largest_pixel
from anomalib_reconpatch.reconpatch.ensemble import (
    DEFAULT_BACKBONES,
    ReConPatchEnsembleModel,
    TrainingStatistics,
    standardise,
)
from anomalib_reconpatch.tools.compare.models import build_model
from anomalib_reconpatch.tools.compare.settings import CompareSettings
from anomalib_reconpatch.tools.predict import load_compiled_model
from anomalib_reconpatch.tools.weights import write_lite_weights

from .conftest import BACKBONE, LAYERS

BACKBONES = ["tf_efficientnet_lite0", "tf_efficientnet_lite1"]
CATEGORY = "brick"


def raw_images(root: Path, split: str, count: int) -> torch.Tensor:
    """Real demo brick images in [0, 1], as the exported graph expects them (it pre-processes itself)."""
    from torchvision.io import read_image

    files = sorted((root / CATEGORY / split).glob("*.png"))[:count]
    return torch.stack([read_image(str(f)).float() / 255 for f in files])


@pytest.fixture(scope="module")
def lite_weights_all(lite_weights: None) -> None:
    """The offline weights of the members' backbones."""
    write_lite_weights(1)


@pytest.fixture(scope="module")
def ensemble(lite_weights_all: None, demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """A two-backbone ensemble trained by the Engine on the demo brick category, and its test metrics."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("ensemble")
    datamodule = MVTecAD(root=demo_root, category=CATEGORY, num_workers=0)
    model = ReConPatchEnsemble(backbones=BACKBONES, layers=LAYERS, num_steps=30, coreset_sampling_ratio=0.05)
    engine = Engine(default_root_dir=root, logger=False)
    engine.fit(model=model, datamodule=datamodule)
    metrics = engine.test(model=model, datamodule=datamodule)[0]
    return model.eval(), engine, datamodule, metrics, root


def test_training_statistics_are_the_mean_and_deviation_of_everything_added() -> None:
    stream = TrainingStatistics()
    values = torch.tensor([[1.0, 2.0], [4.0, 9.0]])
    stream.add(values[0])
    stream.add(values[1])
    mean, std = stream.mean_std()
    assert mean == pytest.approx(4.0)
    assert std == pytest.approx(float(values.std(unbiased=False)))
    with pytest.raises(ValueError, match="no training scores"):
        TrainingStatistics().mean_std()


def test_each_member_is_standardised_by_its_own_training_images(ensemble: tuple, demo_root: Path) -> None:
    model = ensemble[0]
    train = model.pre_processor.transform(
        torch.cat([raw_images(demo_root, "train/good", 64)])  # every training image of the demo category
    )
    assert len(train) == len(list((demo_root / CATEGORY / "train" / "good").glob("*.png")))
    ensemble_model = model.model
    with torch.no_grad():
        for index, member in enumerate(ensemble_model.members):
            output = member(train)
            scores = standardise(output.pred_score, ensemble_model.score_mean[index], ensemble_model.score_std[index])
            maps = standardise(output.anomaly_map, ensemble_model.map_mean[index], ensemble_model.map_std[index])
            peak = largest_pixel(output.anomaly_map)
            peaks = standardise(peak, ensemble_model.peak_mean[index], ensemble_model.peak_std[index])
            assert abs(float(peaks.mean())) < 1e-3
            assert float(peaks.std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)
            assert abs(float(scores.mean())) < 1e-3
            assert float(scores.std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)
            assert abs(float(maps.mean())) < 1e-3
            assert float(maps.std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)
    assert not torch.allclose(ensemble_model.score_std[0], ensemble_model.score_std[1])


def scratched_images(ensemble: tuple, demo_root: Path) -> tuple[ReConPatchEnsembleModel, torch.Tensor]:
    """The fitted ensemble's torch model and three pre-processed demo images with scratches."""
    model = ensemble[0]
    return model.model, model.pre_processor.transform(raw_images(demo_root, "test/scratch", 3))


def test_the_ensemble_averages_its_standardised_members(ensemble: tuple, demo_root: Path) -> None:
    ensemble_model, images = scratched_images(ensemble, demo_root)
    with torch.no_grad():
        combined = ensemble_model(images)
        by_hand = [
            standardise(member(images).pred_score, ensemble_model.score_mean[i], ensemble_model.score_std[i])
            for i, member in enumerate(ensemble_model.members)
        ]
    assert torch.allclose(combined.pred_score, torch.stack(by_hand).mean(0))
    assert combined.anomaly_map.shape == (3, 256, 256)


def test_the_map_image_score_is_the_largest_pixel_of_the_same_map(ensemble: tuple, demo_root: Path) -> None:
    ensemble_model, images = scratched_images(ensemble, demo_root)
    with torch.no_grad():
        by_members = ensemble_model(images)
        with scoring_by(ensemble_model, "map"):
            by_map = ensemble_model(images)
    assert torch.equal(by_map.anomaly_map, by_members.anomaly_map)
    assert torch.equal(by_map.pred_score, by_members.anomaly_map.flatten(1).amax(1))
    assert not torch.allclose(by_map.pred_score, by_members.pred_score)


@contextmanager
def scoring_by(ensemble_model: ReConPatchEnsembleModel, image_score: str) -> Iterator[None]:
    """Score with another ``image_score`` while active (the fixture's model is shared by every test)."""
    ensemble_model.image_score = image_score
    try:
        yield
    finally:
        ensemble_model.image_score = "members"


def test_member_peaks_average_each_members_largest_pixel_standardised(ensemble: tuple, demo_root: Path) -> None:
    ensemble_model, images = scratched_images(ensemble, demo_root)
    with torch.no_grad(), scoring_by(ensemble_model, "member_peaks"):
        by_peaks = ensemble_model(images)
        by_hand = [
            standardise(
                largest_pixel(member(images).anomaly_map), ensemble_model.peak_mean[i], ensemble_model.peak_std[i]
            )
            for i, member in enumerate(ensemble_model.members)
        ]
    with torch.no_grad():
        by_members = ensemble_model(images)
    assert torch.allclose(by_peaks.pred_score, torch.stack(by_hand).mean(0))
    assert torch.equal(by_peaks.anomaly_map, by_members.anomaly_map)
    assert not torch.allclose(by_peaks.pred_score, by_members.pred_score)


def test_the_ensemble_detects_the_demo_defects(ensemble: tuple) -> None:
    metrics = ensemble[3]
    assert metrics["image_AUROC"] >= 0.9
    assert metrics["pixel_AUROC"] >= 0.9


@pytest.mark.parametrize("batch", [1, 3])
def test_one_openvino_graph_matches_torch_at_any_batch(ensemble: tuple, demo_root: Path, batch: int) -> None:
    model, _, _, _, root = ensemble
    xml = root / "openvino" / "weights" / "openvino" / "model.xml"
    if not xml.exists():
        xml = model.to_openvino(root / "openvino")
    compiled = load_compiled_model(xml)
    images = torch.cat([raw_images(demo_root, "test/good", 2), raw_images(demo_root, "test/scratch", 2)])[:batch]
    with torch.no_grad():
        reference = model(images)
    result = compiled(images.numpy())
    score, amap = result[compiled.output("pred_score")], result[compiled.output("anomaly_map")]
    ref_map = reference.anomaly_map.numpy()
    assert score.shape == (batch,)
    assert amap.shape == ref_map.shape == (batch, 256, 256)
    assert np.abs(score - reference.pred_score.numpy()).max() <= 1e-3
    assert np.abs(amap - ref_map).max() <= 1e-2 * max(float(ref_map.max() - ref_map.min()), 1e-6)


def test_member_peaks_export_to_one_openvino_graph(ensemble: tuple, demo_root: Path, tmp_path: Path) -> None:
    model = ensemble[0]
    images = torch.cat([raw_images(demo_root, "test/good", 1), raw_images(demo_root, "test/scratch", 1)])
    with scoring_by(model.model, "member_peaks"):
        compiled = load_compiled_model(model.to_openvino(tmp_path))
        with torch.no_grad():
            reference = model(images)
    score = compiled(images.numpy())[compiled.output("pred_score")]
    assert np.abs(score - reference.pred_score.numpy()).max() <= 1e-3


def test_checkpoint_round_trip_and_a_single_models_checkpoint_is_refused(ensemble: tuple, tmp_path: Path) -> None:
    model, engine, _, _, _ = ensemble
    path = tmp_path / "ensemble.ckpt"
    engine.trainer.save_checkpoint(path)
    reloaded = ReConPatchEnsemble.load_from_checkpoint(path)
    for a, b in zip(reloaded.model.state_dict().values(), model.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    single = ReConPatch(backbone=BACKBONE, layers=LAYERS, num_steps=0)
    single_path = tmp_path / "single.ckpt"
    single_checkpoint = {
        "state_dict": single.state_dict(),
        "hyper_parameters": dict(single.hparams),
        "pytorch-lightning_version": lightning.__version__,
    }
    torch.save(single_checkpoint, single_path)
    with pytest.raises(ValueError, match="not a ReConPatchEnsemble's"):
        ReConPatchEnsemble.load_from_checkpoint(single_path, backbones=BACKBONES)
    with pytest.raises(ValueError, match="backbones="):
        ReConPatchEnsemble.load_from_checkpoint(path, backbones=BACKBONES[:1])
    with pytest.raises(ValueError, match="but a ReConPatchEnsemble's: load it with --model ReConPatchEnsemble"):
        ReConPatch.load_from_checkpoint(path, backbone=BACKBONE, layers=LAYERS)
    checkpoint = torch.load(path, weights_only=False)
    rebuilt = ReConPatchEnsemble(backbones=BACKBONES, layers=LAYERS, image_score="map")
    with pytest.raises(ValueError, match=r"image_score='members'.*--model\.image_score members"):
        rebuilt.on_load_checkpoint(checkpoint)
    del checkpoint["hyper_parameters"]["image_score"]
    rebuilt.on_load_checkpoint(checkpoint)
    assert rebuilt.model.image_score == rebuilt.hparams["image_score"] == "members"
    # a checkpoint written before the member_peaks score lacks its statistics, and still loads
    for name in ("peak_mean", "peak_std"):
        del checkpoint["state_dict"][f"model.{name}"]
    older = tmp_path / "older.ckpt"
    torch.save(checkpoint, older)
    reloaded = ReConPatchEnsemble.load_from_checkpoint(older)
    assert torch.equal(reloaded.model.score_mean, model.model.score_mean)
    assert torch.equal(reloaded.model.peak_std, torch.ones(len(BACKBONES)))


def test_compare_builds_the_ensemble_on_its_own_backbones(lite_weights_all: None) -> None:
    settings = CompareSettings(
        data=Path("unused.yaml"), out=Path("unused"), models=["ReConPatchEnsemble"], reconpatch_args={"num_steps": 7}
    )
    model = build_model("ReConPatchEnsemble", settings)
    assert isinstance(model, ReConPatchEnsemble)
    assert list(model.hparams["backbones"]) == [
        "tf_efficientnet_lite0",
        "tf_efficientnet_lite1",
        "tf_efficientnet_lite2",
    ]
    assert all(member.num_steps == 7 for member in model.members)


def test_compares_report_names_the_ensembles_own_backbones_only_when_it_runs() -> None:
    from anomalib_reconpatch.tools.compare.report import ensemble_note

    assert ensemble_note(["ReConPatch", "Patchcore"]) == ""
    note = ensemble_note(["ReConPatchEnsemble", "Patchcore"])
    assert all(f"`{name}`" in note for name in DEFAULT_BACKBONES)


def test_an_empty_or_repeated_backbone_list_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"backbones=\[\] is out of range"):
        ReConPatchEnsemble(backbones=[])
    with pytest.raises(ValueError, match=r"--model\.backbones"):
        ReConPatchEnsemble(backbones=[BACKBONE, BACKBONE])
    with pytest.raises(ValueError, match=r"image_score='max' is out of range.*members, map"):
        ReConPatchEnsemble(image_score="max")


@pytest.mark.slow
def test_stock_cli_trains_the_ensemble_by_short_name(lite_weights_all: None, demo_root: Path, tmp_path: Path) -> None:
    anomalib = str(Path(sys.executable).parent / "anomalib")
    command = [
        anomalib, "train", "--model", "ReConPatchEnsemble", "--model.backbones", f"[{', '.join(BACKBONES)}]",
        "--model.num_steps", "20", "--model.coreset_sampling_ratio", "0.05",
        "--data", "anomalib.data.MVTecAD", "--data.root", str(demo_root), "--data.category", "brick",
        "--data.num_workers", "0", "--default_root_dir", str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "image_AUROC" in result.stdout
    assert list(tmp_path.rglob("*.ckpt"))


def test_stock_cli_reads_the_shipped_ensemble_config(tmp_path: Path) -> None:
    anomalib = str(Path(sys.executable).parent / "anomalib")
    config = Path(__file__).resolve().parents[1] / "configs" / "reconpatch_ensemble.yaml"
    command = [anomalib, "train", "--config", str(config), "--print_config"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "class_path: anomalib_reconpatch.ReConPatchEnsemble" in result.stdout
    assert "- tf_efficientnet_lite2" in result.stdout


def test_compare_reports_the_ensembles_banks_and_times_every_members_phases(ensemble: tuple, demo_root: Path) -> None:
    from anomalib_reconpatch.tools.compare.runner import bank_shape
    from anomalib_reconpatch.tools.latency import split_latency_ms

    model = ensemble[0]
    rows = [int(member.memory_bank.shape[0]) for member in model.model.members]
    assert bank_shape(model.model) == [f"{rows[0]} x 152 + {rows[1]} x 152"]
    images = list(raw_images(demo_root, "test/good", 4))
    phases = split_latency_ms(model, model.model, images, warmup=1)
    assert 0 < phases["backbone_ms"] < phases["latency_ms"]
    assert 0 < phases["search_ms"] < phases["latency_ms"]
