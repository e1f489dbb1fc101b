"""Training features beyond the memory budget go to a temporary file: same bank, no file left behind."""

from __future__ import annotations

import os
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


def test_spill_folders_of_dead_processes_are_removed_and_live_ones_kept(spill_root: Path) -> None:
    import subprocess
    import sys

    from anomalib_reconpatch.components.spill import SPILL_PREFIX, remove_orphaned_spills

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = spill_root / f"{SPILL_PREFIX}{finished.stdout.strip()}-abc"
    (dead / "features.f32").parent.mkdir()
    (dead / "features.f32").write_bytes(b"\0" * 64)
    live = FeatureSpill(3)
    unnamed = spill_root / f"{SPILL_PREFIX}xyz"
    unnamed.mkdir()
    assert live.folder.name.startswith(f"{SPILL_PREFIX}{os.getpid()}-")
    assert remove_orphaned_spills() == [dead]
    assert not dead.exists()
    assert live.folder.is_dir()
    assert unnamed.is_dir()
    live.close()


class FillingDisk:
    """A spill file whose disk fills up after ``room`` bytes, as a small tmpfs would."""

    def __init__(self, file: object, room: int) -> None:
        self.file, self.room = file, room

    def write(self, data: bytes) -> int:
        import errno

        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self.file, name)


def test_a_full_disk_stops_the_spill_with_the_folder_and_the_way_out_and_removes_the_file(
    lite_weights: None, spill_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    init = FeatureSpill.__init__

    def on_small_disk(self: FeatureSpill, *args: object, **kwargs: object) -> None:
        init(self, *args, **kwargs)
        self._file = FillingDisk(self._file, room=5 * 2**19)  # room for two batches

    monkeypatch.setattr(FeatureSpill, "__init__", on_small_disk)
    model = ReConPatch(backbone=BACKBONE, layers=LAYERS, feature_memory_mb=1, pre_trained=False)
    model.model.forward = lambda images: torch.ones(2**20 // (152 * 4), 152)  # just under 1 MB a batch
    batches = [SimpleNamespace(image=torch.zeros(1, 3, 8, 8))] * 8
    with pytest.raises(OSError, match="No space left on device") as error:
        list(map(model.training_step, batches))
    message = str(error.value)
    assert f"Writing the feature spill file under {spill_root} failed after 2 MB" in message
    assert "Point TMPDIR at a disk with more room, or raise --model.feature_memory_mb" in message
    assert list(spill_root.iterdir()) == []
