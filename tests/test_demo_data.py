"""The demo data set: MVTec layout, exact masks, determinism, and respect for user folders."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalib_reconpatch.tools.demo_data import DEFECTS, DemoConfig, write_demo_dataset


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.png")):
        h.update(str(f.relative_to(root)).encode() + f.read_bytes())
    return h.hexdigest()


def test_layout_and_masks(demo_root: Path) -> None:
    brick = demo_root / "brick"
    assert len(list((brick / "train/good").glob("*.png"))) == DemoConfig().n_train
    for defect in DEFECTS:
        images = sorted((brick / "test" / defect).glob("*.png"))
        masks = sorted((brick / "ground_truth" / defect).glob("*_mask.png"))
        assert [m.name for m in masks] == [i.stem + "_mask.png" for i in images]
        for image, mask in zip(images, masks, strict=True):
            m = np.asarray(Image.open(mask))
            assert set(np.unique(m)) == {0, 255}
            assert 0.002 < (m > 0).mean() < 0.3  # a visible defect, not the whole image
            clean_far_from_defect = np.asarray(Image.open(image).convert("L"), dtype=float)
            assert clean_far_from_defect.std() > 5  # real texture, not a flat fill


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    config = DemoConfig(n_train=3, n_test_good=1, n_test_per_defect=1)
    write_demo_dataset(tmp_path / "a", ("gravel",), config)
    write_demo_dataset(tmp_path / "b", ("gravel",), config)
    write_demo_dataset(tmp_path / "c", ("gravel",), DemoConfig(n_train=3, n_test_good=1, n_test_per_defect=1, seed=1))
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")


def test_never_writes_into_a_user_folder(tmp_path: Path) -> None:
    user = tmp_path / "brick"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not written by `reconpatch demo-data`"):
        write_demo_dataset(tmp_path, ("brick",))
    assert [p.name for p in user.iterdir()] == ["notes.txt"]
