"""Training features beyond the memory budget go to a temporary file: same bank, no file left behind."""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from anomalib_reconpatch import ReConPatch
from anomalib_reconpatch.components.spill import FeatureSpill

from .conftest import BACKBONE, LAYERS
from .test_model import demo_images


@pytest.fixture
def spill_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private system temporary folder, so leftovers are visible."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_spilled_rows_read_back_like_the_tensor(spill_root: Path) -> None:
    rows = torch.randn(1000, 7, generator=torch.Generator().manual_seed(0))
    spill = FeatureSpill(7)
    for part in rows.split(300):
        spill.append(part)
    features = spill.features()
    assert spill.path.parent.parent == spill_root
    assert features.shape == rows.shape
    index = torch.randint(1000, (64,))
    assert torch.equal(features[index], rows[index])
    assert torch.equal(torch.cat(list(features.split(256))), rows)
    with pytest.raises(ValueError, match="n x 7"):
        spill.append(torch.zeros(3, 6))
    spill.close()
    assert list(spill_root.iterdir()) == []


def fitted(images: torch.Tensor, budget: int | None) -> ReConPatch:
    """Feature pass in batches of four real images, then ``fit``, seeded identically."""
    torch.manual_seed(7)
    model = ReConPatch(
        backbone=BACKBONE, layers=LAYERS, num_steps=20, coreset_sampling_ratio=0.02, feature_memory_mb=budget
    )
    model.on_train_epoch_start()
    for batch in images.split(4):
        model.training_step(SimpleNamespace(image=batch))
    if budget is not None:
        assert model.feature_spill is not None
        assert model.feature_spill.path.stat().st_size == images.shape[0] * 32 * 32 * 152 * 4
        assert model.feature_store == []
    model.fit()
    return model


def test_tiny_budget_gives_the_in_memory_bank_and_removes_the_file(
    lite_weights: None, demo_root: Path, spill_root: Path
) -> None:
    images = demo_images(demo_root, "train/good", 8)
    in_memory = fitted(images, None)
    spilled = fitted(images, 1)  # 1 MB: the first batch of four images (2.4 MB) already spills
    assert in_memory.spilled_rows == 0
    assert spilled.spilled_rows == 8 * 32 * 32
    assert spilled.feature_spill is None
    assert torch.equal(spilled.model.representation.weight, in_memory.model.representation.weight)
    assert torch.equal(spilled.model.memory_bank, in_memory.model.memory_bank)
    assert list(spill_root.iterdir()) == []


def test_spill_file_is_removed_when_fit_fails(
    lite_weights: None, demo_root: Path, spill_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(self: ReConPatch, features: object) -> None:
        msg = "interrupted"
        raise RuntimeError(msg)

    monkeypatch.setattr(ReConPatch, "train_representation", interrupted)
    with pytest.raises(RuntimeError, match="interrupted"):
        fitted(demo_images(demo_root, "train/good", 4), 0)
    assert list(spill_root.iterdir()) == []


def test_non_finite_features_are_refused_before_they_are_spilled(lite_weights: None, spill_root: Path) -> None:
    model = ReConPatch(backbone=BACKBONE, layers=LAYERS, feature_memory_mb=0)
    model.model.forward = lambda images: torch.full((8, 152), float("nan"))
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        model.training_step(SimpleNamespace(image=torch.zeros(1, 3, 8, 8)))
    model.on_train_epoch_start()
    assert list(spill_root.iterdir()) == []


@pytest.mark.parametrize("budget", [-1, -0.5])
def test_negative_budget_is_rejected(budget: float) -> None:
    with pytest.raises(ValueError, match=r"feature_memory_mb=.*--model.feature_memory_mb"):
        ReConPatch(backbone="not_built", feature_memory_mb=budget)
