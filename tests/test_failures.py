"""Failures before the model's own checks name their files; undefined metrics say why instead of printing 0.0."""

from __future__ import annotations

import logging
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from anomalib.data import Folder, ImageBatch, MVTecAD
from anomalib.engine import Engine

from anomalib_reconpatch import ReConPatch
from anomalib_reconpatch.components.failures import checkpoint_problem, unpaired
from anomalib_reconpatch.components.metrics import UndefinedAwareAUROC, missing_class
from anomalib_reconpatch.tools.cli import main

from .conftest import DEMO_SETTINGS
from .test_bad_input import BatchCounter, brick_copy


def fit_fails(root: Path, results: Path, error: type[Exception], note: str) -> None:
    """Fit on ``root/brick`` expecting ``error`` whose message or notes match ``note``, before any batch."""
    counter = BatchCounter()
    engine = Engine(default_root_dir=results, logger=False, callbacks=[counter])
    with pytest.raises(error, match=note):
        engine.fit(model=ReConPatch(**DEMO_SETTINGS), datamodule=MVTecAD(root=root, category="brick", num_workers=0))
    assert counter.batches == 0


def test_missing_class_names_the_one_class_present() -> None:
    assert missing_class(torch.tensor([0, 0, 0])) == 0
    assert missing_class(torch.tensor([[1.0, 1.0], [1.0, 1.0]])) == 1
    assert missing_class(torch.tensor([0, 1, 0])) is None
    assert missing_class(torch.tensor([])) is None


def test_auroc_is_nan_with_the_reason_on_one_class_targets_and_anomalibs_value_otherwise(
    caplog: pytest.LogCaptureFixture,
) -> None:
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8])
    image = UndefinedAwareAUROC(fields=["pred_score", "gt_label"], prefix="image_")
    image.update(ImageBatch(image=torch.zeros(4, 3, 8, 8), pred_score=scores, gt_label=torch.tensor([0, 0, 1, 1])))
    assert image.name == "image_AUROC"
    assert image.compute().item() == pytest.approx(0.75)  # 3 of the 4 (defect, normal) pairs ranked right

    one_class = UndefinedAwareAUROC(fields=["pred_score", "gt_label"], prefix="image_")
    one_class.update(ImageBatch(image=torch.zeros(4, 3, 8, 8), pred_score=scores, gt_label=torch.zeros(4, dtype=int)))
    with caplog.at_level(logging.WARNING):
        assert math.isnan(one_class.compute().item())
    assert "image_AUROC is undefined (NaN): every test image is labelled normal" in caplog.text

    pixel = UndefinedAwareAUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False)
    pixel.update(
        ImageBatch(
            image=torch.zeros(2, 3, 4, 4), anomaly_map=torch.rand(2, 4, 4), gt_mask=torch.zeros(2, 4, 4, dtype=bool)
        )
    )
    with caplog.at_level(logging.WARNING):
        assert math.isnan(pixel.compute().item())
    assert "pixel_AUROC is undefined (NaN): no test mask marks a defective pixel" in caplog.text


def test_auroc_synced_over_ranks_is_nan_on_one_class_targets_too(caplog: pytest.LogCaptureFixture) -> None:
    # compute syncs the states as under DDP (here over one rank), which turns the list of batches into a tensor
    metric = UndefinedAwareAUROC(
        fields=["pred_score", "gt_label"],
        prefix="image_",
        dist_sync_fn=lambda tensor, group=None: [tensor],
        distributed_available_fn=lambda: True,
    )
    metric.update(
        ImageBatch(image=torch.zeros(3, 3, 8, 8), pred_score=torch.rand(3), gt_label=torch.zeros(3, dtype=int))
    )
    with caplog.at_level(logging.WARNING):
        assert math.isnan(metric.compute().item())
    assert "image_AUROC is undefined (NaN): every test image is labelled normal" in caplog.text


def test_unpaired_lists_images_without_masks_and_masks_without_images(tmp_path: Path) -> None:
    images = [tmp_path / "test" / name for name in ("000.png", "001.png", "002.png")]
    masks = [tmp_path / "gt" / name for name in ("000_mask.png", "002.png", "007_mask.png")]
    problems = unpaired(images, masks, tmp_path / "gt")
    assert problems == [
        (str(images[1]), f"no mask: add {tmp_path / 'gt' / '001_mask.png'} or move the image out"),
        (str(masks[2]), "a mask without an image: 007 is not among the defect images"),
    ]


def test_checkpoint_problem_tells_empty_and_cut_short_files_from_complete_ones(tmp_path: Path) -> None:
    complete = tmp_path / "complete.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3)}}, complete)
    assert checkpoint_problem(complete) is None
    empty = tmp_path / "empty.ckpt"
    empty.touch()
    assert checkpoint_problem(empty) == "is empty (0 bytes)"
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(complete.read_bytes()[:200])
    cut_short = "is not a complete checkpoint (200 bytes, not the zip archive that torch.save writes)"
    assert checkpoint_problem(cut) == cut_short
    assert checkpoint_problem(tmp_path / "absent.ckpt") == "does not exist"


def test_broken_link_in_training_folder_is_named_with_its_target(
    lite_weights: None, demo_root: Path, tmp_path: Path
) -> None:
    root = brick_copy(demo_root, tmp_path)
    link = root / "brick" / "train" / "good" / "zz_moved.png"
    link.symlink_to(root / "brick" / "moved.png")  # inside the data folder: anomalib keeps it, then fails
    named = re.escape(f"{link}: a link to {root / 'brick' / 'moved.png'}, which does not exist")
    note = rf"1 file\(s\) in the data folder are links to files that do not exist(.|\n)*{named}"
    fit_fails(root, tmp_path / "results", FileNotFoundError, note)


def test_links_that_anomalib_skips_are_listed_in_a_warning(
    lite_weights: None, demo_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = brick_copy(demo_root, tmp_path)
    good = root / "brick" / "train" / "good"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copyfile(sorted(good.glob("*.png"))[0], outside / "real.png")
    (good / "zz_elsewhere.png").symlink_to(outside / "real.png")
    (good / "zz_gone.png").symlink_to(outside / "gone.png")
    engine = Engine(default_root_dir=tmp_path / "results", logger=False)
    with caplog.at_level(logging.WARNING):
        engine.fit(model=ReConPatch(**DEMO_SETTINGS), datamodule=MVTecAD(root=root, category="brick", num_workers=0))
    assert "anomalib skipped 2 linked image(s) in the data folder" in caplog.text
    assert f"{good / 'zz_elsewhere.png'}: a link to {outside / 'real.png'}, outside the data folder" in caplog.text
    assert f"{good / 'zz_gone.png'}: a link to {outside / 'gone.png'}, which does not exist" in caplog.text


@pytest.mark.parametrize("remove", ["mask", "image"])
def test_defect_image_without_mask_or_mask_without_image_is_named(
    lite_weights: None, demo_root: Path, tmp_path: Path, remove: str
) -> None:
    root = brick_copy(demo_root, tmp_path)
    defect = next(path for path in sorted((root / "brick" / "test").iterdir()) if path.name != "good")
    image = sorted(defect.glob("*.png"))[0]
    mask = root / "brick" / "ground_truth" / defect.name / f"{image.stem}_mask.png"
    if remove == "mask":
        mask.unlink()
        named = re.escape(f"{image}: no mask: add {mask}")
    else:
        image.unlink()
        named = re.escape(f"{mask}: a mask without an image")
    fit_fails(root, tmp_path / "results", ValueError, rf"do not pair up(.|\n)*{named}")


def test_compare_names_the_broken_link_too(lite_weights: None, demo_root: Path, tmp_path: Path, capsys) -> None:
    root = brick_copy(demo_root, tmp_path)
    link = root / "brick" / "train" / "good" / "zz_moved.png"
    link.symlink_to(root / "brick" / "moved.png")
    config = tmp_path / "data.yaml"
    config.write_text(
        "class_path: anomalib.data.MVTecAD\n"
        f"init_args:\n  root: {root}\n  category: brick\n  num_workers: 0\n  val_split_mode: same_as_test\n"
    )
    code = main(["compare", "--data", str(config), "--out", str(tmp_path / "out"), "--models", "Patchcore"])
    assert code == 2
    assert f"{link}: a link to {root / 'brick' / 'moved.png'}, which does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["empty", "cut"])
def test_unreadable_checkpoint_is_named_through_engine_and_load_from_checkpoint(
    demo_model: dict, demo_root: Path, tmp_path: Path, damage: str
) -> None:
    data = demo_model["ckpt"].read_bytes()
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    note = rf"Checkpoint {re.escape(str(bad))} is (empty \(0 bytes\)|not a complete checkpoint)(.|\n)*train again"
    with pytest.raises(Exception, match=note):
        ReConPatch.load_from_checkpoint(bad)
    engine = Engine(default_root_dir=tmp_path / "results", logger=False)
    datamodule = MVTecAD(root=demo_root, category="brick", num_workers=0)
    with pytest.raises(Exception, match=note):
        engine.test(model=ReConPatch(**DEMO_SETTINGS), datamodule=datamodule, ckpt_path=bad)


def test_defect_free_test_set_reports_nan_auroc_with_the_reason(
    demo_model: dict, demo_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "data"
    shutil.copytree(demo_root / "brick" / "train" / "good", root / "train")
    shutil.copytree(demo_root / "brick" / "test" / "good", root / "test_good")
    datamodule = Folder(name="line", root=root, normal_dir="train", normal_test_dir="test_good", num_workers=0)
    with caplog.at_level(logging.WARNING):
        metrics = demo_model["engine"].test(model=demo_model["model"], datamodule=datamodule)[0]
    assert math.isnan(metrics["image_AUROC"])
    assert "image_AUROC is undefined (NaN): every test image is labelled normal" in caplog.text
