"""Bad input fails early with a message that names the file or setting; odd image modes just work."""

from __future__ import annotations

import csv
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import Folder, MVTecAD
from anomalib.engine import Engine
from lightning.pytorch import Callback
from PIL import Image

from anomalib_reconpatch import ReConPatch
from anomalib_reconpatch.components.images import UnreadableImageError, read_image
from anomalib_reconpatch.tools.predict import predict

from .conftest import BACKBONE, DEMO_SETTINGS, LAYERS, train_demo

SETTINGS = DEMO_SETTINGS


class BatchCounter(Callback):
    """Counts training batches: zero proves an error came before any feature extraction."""

    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_start(self, *args: object) -> None:
        self.batches += 1


def train(root: Path, results: Path, **overrides: object) -> tuple[ReConPatch, Engine, MVTecAD]:
    """A small ReConPatch fitted by anomalib's Engine on ``root/brick``, seeded so runs are comparable."""
    return train_demo(root, results, **overrides)


@pytest.fixture
def reference(demo_model: dict) -> dict:
    """The demo brick model: fitted, checkpointed and exported to OpenVINO."""
    return demo_model


def brick_copy(demo_root: Path, tmp_path: Path) -> Path:
    """A private copy of the demo brick category (the shared demo set is never damaged)."""
    shutil.copytree(demo_root / "brick", tmp_path / "data" / "brick")
    return tmp_path / "data"


def damage(path: Path, kind: str) -> None:
    """Turn a real PNG into a truncated file, an empty file or text with an image extension."""
    data = path.read_bytes()
    contents = {"truncated": data[: len(data) // 2], "empty": b"", "not_an_image": b"serial,score\n1,0.5\n"}
    path.write_bytes(contents[kind])


REASONS = {
    "truncated": "corrupt or truncated image",
    "empty": "the file is empty (0 bytes)",
    "not_an_image": "not an image file",
}


@pytest.mark.parametrize("kind", sorted(REASONS))
def test_unreadable_training_image_stops_fit_before_any_batch(
    lite_weights: None, demo_root: Path, tmp_path: Path, kind: str
) -> None:
    root = brick_copy(demo_root, tmp_path)
    bad = root / "brick" / "train" / "good" / "003.png"
    damage(bad, kind)
    counter = BatchCounter()
    engine = Engine(default_root_dir=tmp_path / "results", logger=False, callbacks=[counter])
    with pytest.raises(UnreadableImageError) as error:
        engine.fit(model=ReConPatch(**SETTINGS), datamodule=MVTecAD(root=root, category="brick", num_workers=0))
    assert f"{bad}: {REASONS[kind]}" in str(error.value)
    assert "Fix, replace or remove" in str(error.value)
    assert counter.batches == 0


def test_every_unreadable_file_is_listed_at_once(lite_weights: None, demo_root: Path, tmp_path: Path) -> None:
    root = brick_copy(demo_root, tmp_path)
    bad = [root / "brick" / "train" / "good" / "000.png", root / "brick" / "test" / "stain" / "001.png"]
    damage(bad[0], "empty")
    damage(bad[1], "truncated")
    engine = Engine(default_root_dir=tmp_path / "results", logger=False)
    with pytest.raises(UnreadableImageError, match=r"^2 data") as error:
        engine.fit(model=ReConPatch(**SETTINGS), datamodule=MVTecAD(root=root, category="brick", num_workers=0))
    assert all(str(path) in str(error.value) for path in bad)


def test_masks_that_would_give_wrong_metrics_stop_fit_before_any_batch_all_named(
    lite_weights: None, demo_root: Path, tmp_path: Path
) -> None:
    root = brick_copy(demo_root, tmp_path)
    grey, stretched = sorted((root / "brick" / "ground_truth").rglob("*.png"))[:2]
    values = np.asarray(Image.open(grey).convert("L"))
    Image.fromarray(np.where(values == 0, 2, values).astype(np.uint8)).save(grey)  # background 2, as re-encoded
    mask = Image.open(stretched)
    mask.resize((mask.width, mask.height // 2)).save(stretched)
    before = {path: path.read_bytes() for path in (root / "brick").rglob("*") if path.is_file()}
    counter = BatchCounter()
    engine = Engine(default_root_dir=tmp_path / "results", logger=False, callbacks=[counter])
    with pytest.raises(ValueError, match=r"^2 mask\(s\) would give wrong pixel metrics") as error:
        engine.fit(model=ReConPatch(**SETTINGS), datamodule=MVTecAD(root=root, category="brick", num_workers=0))
    message = str(error.value)
    assert f"{grey}: " in message
    assert "are dark grey (1 to 127, e.g. 2)" in message
    assert "threshold it at 128" in message
    assert f"{stretched}: it is 128x64 px but its image is 128x128" in message
    assert counter.batches == 0
    assert {path: path.read_bytes() for path in (root / "brick").rglob("*") if path.is_file()} == before


def test_mask_checks_accept_binary_masks_at_any_resolution_and_a_thin_grey_seam(
    demo_root: Path, tmp_path: Path
) -> None:
    from anomalib_reconpatch.components.preflight import mask_problem

    original = sorted((demo_root / "brick" / "ground_truth").rglob("*.png"))[0]
    assert mask_problem(original, (128, 128)) is None
    mask = Image.open(original)
    mask.resize((256, 256), Image.NEAREST).save(tmp_path / "larger.png")
    assert mask_problem(tmp_path / "larger.png", (128, 128)) is None
    mask.resize((300, 300), Image.BILINEAR).save(tmp_path / "smoothed.png")  # grey only along the edges
    assert mask_problem(tmp_path / "smoothed.png", (128, 128)) is None
    ones = (np.asarray(mask.convert("L")) > 0).astype(np.uint8)
    Image.fromarray(ones).save(tmp_path / "zero_one.png")  # 0/1 masks are binary too
    assert mask_problem(tmp_path / "zero_one.png", (128, 128)) is None


@pytest.mark.parametrize(
    ("relative", "kind"),
    [
        ("test/scratch/001.png", "truncated"),
        ("test/good/002.png", "empty"),
        ("test/patch/000.png", "not_an_image"),
        ("ground_truth/stain/002_mask.png", "truncated"),
    ],
)
def test_unreadable_test_image_or_mask_stops_test_naming_it(
    reference: dict, demo_root: Path, tmp_path: Path, relative: str, kind: str
) -> None:
    root = brick_copy(demo_root, tmp_path)
    bad = root / "brick" / relative
    damage(bad, kind)
    engine = Engine(default_root_dir=tmp_path / "results", logger=False)
    with pytest.raises(UnreadableImageError, match="Fix, replace or remove") as error:
        engine.test(model=reference["model"], datamodule=MVTecAD(root=root, category="brick", num_workers=0))
    assert f"{bad}: {REASONS[kind]}" in str(error.value)


def test_predict_skips_unreadable_images_and_lists_them(reference: dict, demo_root: Path, tmp_path: Path) -> None:
    source = tmp_path / "line"
    shutil.copytree(demo_root / "brick" / "test", source)
    broken = {source / "good" / "001.png": "empty", source / "scratch" / "002.png": "truncated"}
    for path, kind in broken.items():
        damage(path, kind)
    (source / "stain" / "notes.jpg").write_text("operator notes, saved with the wrong extension")
    messages: list[str] = []
    summary = predict(reference["xml"], source, tmp_path / "out", log=messages.append)
    total = len(list(source.rglob("*.png"))) + 1
    assert summary.images == total - 3
    assert {path for path, _ in summary.skipped} == {*broken, source / "stain" / "notes.jpg"}
    rows = {Path(r["image"]): r for r in csv.DictReader(summary.csv_path.open())}
    assert len(rows) == total
    for path in summary.skipped:
        assert rows[path[0]]["score"] == ""
        assert str(path[0]) in rows[path[0]]["error"]
        assert "Fix, replace or remove" in rows[path[0]]["error"]
    scored = [float(r["score"]) for r in rows.values() if not r["error"]]
    assert len(scored) == total - 3
    assert all(math.isfinite(s) for s in scored)
    assert any("3 unreadable image(s) skipped" in m for m in messages)
    assert any(str(source / "good" / "001.png") in m and "empty" in m for m in messages)


def convert(path: Path, mode: str) -> None:
    """Rewrite a demo image (gray texture stored as RGB) in place as L, I;16 (full 16-bit range) or RGBA."""
    rgb = np.asarray(Image.open(path).convert("RGB"))
    gray = rgb[..., 0]
    assert mode == "RGBA" or is_gray(path)  # the demo textures are gray, so L and I;16 lose nothing
    if mode == "L":
        Image.fromarray(gray, mode="L").save(path)
    elif mode == "I;16":
        Image.fromarray(gray.astype(np.uint16) * 257).save(path)  # 255 -> 65535: the full 16-bit range
    elif mode == "RGBA":
        Image.fromarray(np.dstack([rgb, np.full_like(gray, 255)]), mode="RGBA").save(path)
    assert Image.open(path).mode == mode


MODES = ("L", "I;16", "RGBA")


def turn_with_exif(path: Path) -> None:
    """Store an image turned a quarter, with the EXIF tag (orientation 6) that shows it upright again."""
    with Image.open(path) as image:
        image.load()
        exif = Image.Exif()
        exif[0x0112] = 6
        image.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif)


def test_an_exif_turned_image_reads_upright_where_anomalib_reads_it_as_stored(demo_root: Path, tmp_path: Path) -> None:
    from anomalib.data.utils import read_image as anomalib_read_image

    from anomalib_reconpatch.components.images import image_problem

    original = demo_root / "brick" / "test" / "scratch" / "000.png"
    path = tmp_path / "camera.png"
    shutil.copy(original, path)
    turn_with_exif(path)
    assert np.array_equal(read_image(path), read_image(original))
    assert not np.allclose(anomalib_read_image(path), read_image(original), atol=0.05)
    assert image_problem(path).turned
    assert not image_problem(original).turned


def is_gray(path: Path) -> bool:
    """Demo images are gray photos stored as RGB, except the tinted stains."""
    rgb = np.asarray(Image.open(path).convert("RGB"))
    return bool((rgb == rgb[..., :1]).all())


@pytest.mark.parametrize("mode", MODES)
def test_image_modes_read_as_the_rgb_original(demo_root: Path, tmp_path: Path, mode: str) -> None:
    from anomalib.data.utils import read_image as anomalib_read_image

    original = demo_root / "brick" / "test" / "scratch" / "000.png"
    path = tmp_path / "image.png"
    shutil.copy(original, path)
    convert(path, mode)
    expected = np.asarray(Image.open(original).convert("RGB"), dtype=np.float32) / 255
    assert np.allclose(read_image(path), expected, atol=1e-6)
    if mode == "I;16":  # why 16-bit needs our reader: anomalib's convert("RGB") clips at 255, i.e. white
        assert (anomalib_read_image(path) == 1.0).mean() > 0.95
    else:
        assert np.allclose(anomalib_read_image(path), expected, atol=1e-6)


def test_unreadable_reasons_say_what_is_wrong_with_the_file(
    demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from anomalib_reconpatch.components import images

    image = tmp_path / "image.png"
    shutil.copy(demo_root / "brick" / "test" / "good" / "000.png", image)
    (tmp_path / "link.png").symlink_to(tmp_path / "moved.png")
    expected = f"it links to {tmp_path / 'moved.png'}, which does not exist"
    assert images.image_problem(tmp_path / "link.png")[0] == expected
    (tmp_path / "empty.png").touch()
    assert images.image_problem(tmp_path / "empty.png")[0] == "the file is empty (0 bytes)"

    def refused(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Image, "open", refused)
    problem = images.image_problem(image)[0]
    assert problem.startswith("no permission to read the file")
    assert "corrupt" not in problem


def mixed_mode_copy(demo_root: Path, tmp_path: Path) -> Path:
    """Brick with its train and test images cycled through L, I;16, RGBA and RGB turned by an EXIF tag.

    Tinted stains are RGBA instead of L or I;16.
    """
    root = brick_copy(demo_root, tmp_path)
    images = sorted(p for p in (root / "brick").glob("t*/*/*.png"))
    for index, path in enumerate(images):
        if index % 4 < len(MODES):
            convert(path, MODES[index % 4] if is_gray(path) else "RGBA")
        else:
            turn_with_exif(path)
    return root


def test_predict_on_gray_16bit_rgba_and_exif_turned_matches_rgb(
    reference: dict, demo_root: Path, tmp_path: Path
) -> None:
    root = mixed_mode_copy(demo_root, tmp_path)
    rgb = predict(reference["xml"], demo_root / "brick" / "test", tmp_path / "rgb", log=lambda _: None)
    mixed = predict(reference["xml"], root / "brick" / "test", tmp_path / "mixed", log=lambda _: None)
    rgb_scores = [float(r["score"]) for r in csv.DictReader(rgb.csv_path.open())]
    mixed_scores = [float(r["score"]) for r in csv.DictReader(mixed.csv_path.open())]
    assert len(mixed_scores) == 18
    assert np.allclose(mixed_scores, rgb_scores, atol=1e-5)
    assert all(0.0 <= s <= 1.0 for s in mixed_scores)


@pytest.mark.slow
def test_training_and_testing_on_gray_16bit_rgba_and_exif_turned_match_rgb(
    reference: dict, demo_root: Path, tmp_path: Path
) -> None:
    root = mixed_mode_copy(demo_root, tmp_path)
    model, engine, datamodule = train(root, tmp_path / "results")
    # Float rounding of the 16-bit scaling (x * 257 / 65535 vs x / 255) moves f a hair ...
    ours_f, theirs_f = model.model.representation, reference["model"].model.representation
    assert torch.allclose(ours_f.weight, theirs_f.weight, atol=1e-4)
    # ... which can break a near-tie of the greedy coreset the other way and pick the same rows in another
    # order. So compare the banks as sets, in a frame the fold leaves unchanged (bank - bias: the
    # fold's centring cancels), by the largest coordinate difference.
    ours_rows, their_rows = model.model.memory_bank - ours_f.bias, reference["model"].model.memory_bank - theirs_f.bias
    gaps = (ours_rows[:, None] - their_rows[None]).abs().amax(dim=-1)
    assert ours_rows.shape == their_rows.shape
    assert gaps.amin(dim=1).max() < 2e-3
    assert gaps.amin(dim=0).max() < 2e-3
    ours = engine.predict(model=model, datamodule=datamodule)
    theirs = reference["engine"].predict(model=reference["model"], datamodule=reference["datamodule"])
    for a, b in zip(ours, theirs, strict=True):
        assert torch.isfinite(a.pred_score).all()
        assert torch.allclose(a.pred_score, b.pred_score, atol=1e-3)
    labels = torch.cat([a.gt_label for a in ours])
    scores = torch.cat([a.pred_score for a in ours])
    assert scores[labels == 1].min() > scores[labels == 0].max()  # sensible: every defect above every good


def test_empty_training_folder_is_named(lite_weights: None, tmp_path: Path) -> None:
    (tmp_path / "data" / "good").mkdir(parents=True)
    datamodule = Folder(name="line", root=tmp_path / "data", normal_dir="good", num_workers=0)
    engine = Engine(default_root_dir=tmp_path / "results", logger=False)
    with pytest.raises(RuntimeError, match=f"Found 0 .* images in {re.escape(str(tmp_path / 'data' / 'good'))}"):
        engine.fit(model=ReConPatch(**SETTINGS), datamodule=datamodule)


def test_empty_training_folder_in_mvtec_layout_is_named(lite_weights: None, demo_root: Path, tmp_path: Path) -> None:
    root = brick_copy(demo_root, tmp_path)
    for path in (root / "brick" / "train" / "good").glob("*.png"):
        path.unlink()
    counter = BatchCounter()
    engine = Engine(default_root_dir=tmp_path / "results", logger=False, callbacks=[counter])
    with pytest.raises(ValueError, match=f"No training images found under {re.escape(str(root / 'brick'))}: add"):
        engine.fit(model=ReConPatch(**SETTINGS), datamodule=MVTecAD(root=root, category="brick", num_workers=0))
    assert counter.batches == 0


def test_too_few_patches_for_k_stops_before_training(lite_weights: None, demo_root: Path, tmp_path: Path) -> None:
    root = brick_copy(demo_root, tmp_path)
    for path in sorted((root / "brick" / "train" / "good").glob("*.png"))[1:]:
        path.unlink()
    counter = BatchCounter()
    engine = Engine(default_root_dir=tmp_path / "results", logger=False, callbacks=[counter])
    model = ReConPatch(**{**SETTINGS, "k": 1024, "patches_per_step": 1025})
    with pytest.raises(ValueError, match=r"more than k=1024 training patches, the 1 training image\(s\) give 1024"):
        engine.fit(model=model, datamodule=MVTecAD(root=root, category="brick", num_workers=0))
    assert counter.batches == 0


def test_coreset_ratio_selecting_nothing_stops_before_training(
    lite_weights: None, demo_root: Path, tmp_path: Path
) -> None:
    counter = BatchCounter()
    engine = Engine(default_root_dir=tmp_path, logger=False, callbacks=[counter])
    model = ReConPatch(**{**SETTINGS, "coreset_sampling_ratio": 1e-9})
    with pytest.raises(ValueError, match=r"--model.coreset_sampling_ratio=1e-09 keeps no memory-bank point") as error:
        engine.fit(model=model, datamodule=MVTecAD(root=demo_root, category="brick", num_workers=0))
    assert "24 image(s) x 32x32 patches" in str(error.value)
    assert counter.batches == 0


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true", "64-true"])
def test_a_precision_other_than_float32_stops_fit_before_any_batch_saying_what_to_set(
    lite_weights: None, demo_root: Path, tmp_path: Path, precision: str
) -> None:
    counter = BatchCounter()
    engine = Engine(default_root_dir=tmp_path, logger=False, callbacks=[counter], precision=precision)
    with pytest.raises(ValueError, match=rf"^--trainer.precision {precision}: .* default, 32\.$"):
        engine.fit(model=ReConPatch(**SETTINGS), datamodule=MVTecAD(root=demo_root, category="brick", num_workers=0))
    assert counter.batches == 0


@pytest.mark.parametrize(
    ("override", "shown"),
    [
        ({"layers": ["blocks.1", "blocks.2"]}, "layers=['blocks.1', 'blocks.2'], embedding_dim=None (feature dim 64)"),
        ({"embedding_dim": 64}, "embedding_dim=64 (feature dim 64)"),
        ({"backbone": "tf_efficientnet_lite1", "pre_trained": False}, "backbone=tf_efficientnet_lite1"),
    ],
)
def test_checkpoint_from_another_architecture_is_refused(reference: dict, override: dict, shown: str) -> None:
    with pytest.raises(ValueError, match="This checkpoint was trained with") as error:
        ReConPatch.load_from_checkpoint(reference["ckpt"], **override)
    message = str(error.value)
    assert "backbone=tf_efficientnet_lite0, layers=['blocks.2', 'blocks.4'], embedding_dim=None (feature dim 152)" in (
        message
    )
    assert shown in message
    advice = "--model.backbone tf_efficientnet_lite0 --model.layers '[blocks.2, blocks.4]' --model.embedding_dim null"
    assert advice in message


def test_checkpoint_without_architecture_record_is_checked_by_its_hyperparameters(reference: dict) -> None:
    from anomalib_reconpatch.reconpatch.validation import ARCHITECTURE_KEY, check_checkpoint_matches

    stored = torch.load(reference["ckpt"], map_location="cpu", weights_only=False)
    assert stored.pop(ARCHITECTURE_KEY)["feature_dim"] == 152
    check_checkpoint_matches(ReConPatch(**SETTINGS), stored)  # the same architecture passes
    with pytest.raises(ValueError, match=r"layers, feature_dim differ"):
        check_checkpoint_matches(ReConPatch(**{**SETTINGS, "layers": ["blocks.1", "blocks.2"]}), stored)


def test_a_stock_patchcore_checkpoint_is_refused_with_the_model_to_use(
    lite_weights: None, demo_root: Path, tmp_path: Path
) -> None:
    from anomalib.models import Patchcore

    torch.manual_seed(0)
    engine = Engine(default_root_dir=tmp_path, logger=False)
    patchcore = Patchcore(backbone=BACKBONE, layers=LAYERS, coreset_sampling_ratio=0.01)
    engine.fit(model=patchcore, datamodule=MVTecAD(root=demo_root, category="brick", num_workers=0))
    engine.trainer.save_checkpoint(tmp_path / "patchcore.ckpt")
    with pytest.raises(ValueError, match="is not a ReConPatch checkpoint") as error:
        ReConPatch.load_from_checkpoint(tmp_path / "patchcore.ckpt", **SETTINGS)
    assert "what Patchcore saves: load it with --model Patchcore" in str(error.value)
    with pytest.raises(ValueError, match="is not a ReConPatch checkpoint"):  # through the stock Engine too
        Engine(default_root_dir=tmp_path, logger=False).test(
            model=ReConPatch(**SETTINGS),
            datamodule=MVTecAD(root=demo_root, category="brick", num_workers=0),
            ckpt_path=tmp_path / "patchcore.ckpt",
        )


def test_engine_refuses_checkpoint_of_other_layers(reference: dict, tmp_path: Path) -> None:
    engine = Engine(default_root_dir=tmp_path, logger=False)
    model = ReConPatch(**{**SETTINGS, "layers": ["blocks.1", "blocks.2"]})
    with pytest.raises(ValueError, match=r"--model.layers '\[blocks.2, blocks.4\]'"):
        engine.test(model=model, datamodule=reference["datamodule"], ckpt_path=reference["ckpt"])


def test_checkpoint_reproduces_scores_without_any_data(reference: dict, demo_root: Path) -> None:
    stored = torch.load(reference["ckpt"], map_location="cpu", weights_only=False)
    assert stored["hyper_parameters"]["backbone"] == BACKBONE
    assert list(stored["hyper_parameters"]["layers"]) == LAYERS
    transforms = stored["anomalib_pre_processor_config"]["transform"]["init_args"]["transforms"]
    assert transforms[0]["init_args"]["size"] == [256, 256]
    assert transforms[1]["init_args"]["mean"] == [0.485, 0.456, 0.406]
    assert torch.equal(stored["state_dict"]["model.memory_bank"], reference["model"].model.memory_bank)
    reloaded = ReConPatch.load_from_checkpoint(reference["ckpt"]).eval()  # no datamodule anywhere
    files = sorted((demo_root / "brick" / "test").glob("*/*.png"))[::3]
    images = torch.stack([torch.from_numpy(read_image(f)).permute(2, 0, 1) for f in files])
    with torch.no_grad():
        expected = reference["model"].eval()(images)
        got = reloaded(images)
    assert torch.equal(got.pred_score, expected.pred_score)
    assert torch.equal(got.anomaly_map, expected.anomaly_map)


def test_exported_model_alone_reproduces_scores(reference: dict, demo_root: Path, tmp_path: Path) -> None:
    alone = tmp_path / "shipped"
    alone.mkdir()
    for suffix in (".xml", ".bin"):
        shutil.copy(reference["xml"].with_suffix(suffix), alone / f"model{suffix}")
    summary = predict(alone / "model.xml", demo_root / "brick" / "test", tmp_path / "out", log=lambda _: None)
    rows = list(csv.DictReader(summary.csv_path.open()))
    images = torch.stack([torch.from_numpy(read_image(r["image"])).permute(2, 0, 1) for r in rows])
    with torch.no_grad():
        expected = reference["model"].eval()(images).pred_score
    assert np.allclose([float(r["score"]) for r in rows], expected.numpy(), atol=1e-4)
