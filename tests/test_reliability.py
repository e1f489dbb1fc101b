"""Failing loudly on bad numbers, and giving the same answer twice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anomalib_reconpatch import ReConPatch, ReConPatchModel

from .conftest import BACKBONE, LAYERS
from .test_model import demo_images


@pytest.fixture(scope="module")
def demo_features(lite_weights: None, demo_root: Path) -> torch.Tensor:
    """Raw patch features of eight real demo images."""
    features = ReConPatchModel(BACKBONE, LAYERS).patch_features(demo_images(demo_root, count=8))
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


def small_model(**kwargs: object) -> ReConPatch:
    return ReConPatch(backbone=BACKBONE, layers=LAYERS, num_steps=20, coreset_sampling_ratio=0.02, **kwargs)


def fit_on(model: ReConPatch, features: torch.Tensor) -> None:
    model.feature_store = [features.clone()]
    model.fit()


def test_non_finite_features_stop_before_training(lite_weights: None, demo_features: torch.Tensor) -> None:
    features = demo_features.clone()
    features[5, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or inf patch features"):
        fit_on(small_model(), features)


def test_diverging_loss_names_the_step(lite_weights: None, demo_features: torch.Tensor) -> None:
    model = small_model(learning_rate=1e30)
    with pytest.raises(FloatingPointError, match=r"diverged at step \d+/20"):
        fit_on(model, demo_features)
    assert model.model.memory_bank.numel() == 0  # no bank of NaNs left behind


def test_too_few_patches_for_k(lite_weights: None, demo_features: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="needs more than k=5 training patches"):
        fit_on(small_model(), demo_features[:5])


def test_same_seed_same_bank_and_scores(lite_weights: None, demo_features: torch.Tensor, demo_root: Path) -> None:
    banks, scores = [], []
    images = demo_images(demo_root, "test/stain", 2)
    for _ in range(2):
        torch.manual_seed(123)
        model = small_model()
        fit_on(model, demo_features)
        banks.append(model.model.memory_bank.clone())
        with torch.no_grad():
            scores.append(model.model.eval()(images).pred_score)
    assert torch.equal(banks[0], banks[1])
    assert torch.equal(scores[0], scores[1])


RUN_SCRIPT = """
import logging, sys
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from anomalib_reconpatch import ReConPatch

root, results, out, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
log = logging.getLogger("anomalib_reconpatch")
log.setLevel(logging.INFO)
log.addHandler(logging.StreamHandler(sys.stderr))
torch.manual_seed(0)
datamodule = MVTecAD(root=root, category="brick", num_workers=0)
model = ReConPatch(
    backbone="tf_efficientnet_lite0", layers=["blocks.2", "blocks.4"], num_steps=steps,
    patches_per_step=256, coreset_sampling_ratio=0.02,
)
engine = Engine(default_root_dir=results, logger=False, enable_progress_bar=False)
engine.fit(model=model, datamodule=datamodule)
predictions = engine.predict(model=model, datamodule=datamodule)
scores = torch.cat([p.pred_score for p in predictions])
torch.save({"bank": model.model.memory_bank, "scores": scores}, out)
"""
STEPS = 3000  # long enough that the first progress line (after 10 s) comes mid-training


def run_training(root: Path, results: Path, out: Path, kill_at: str | None = None) -> str:
    """Train in a fresh interpreter; with ``kill_at``, SIGKILL it at the first stderr line containing that text."""
    import os
    import signal
    import subprocess
    import sys

    command = [sys.executable, "-u", "-c", RUN_SCRIPT, str(root), str(results), str(out), str(STEPS)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in process.stderr:
        lines.append(line)
        if kill_at is not None and kill_at in line:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            return line
    assert process.wait() == 0, "".join(lines[-30:])
    return ""


@pytest.mark.slow
def test_training_killed_mid_representation_reruns_to_the_same_result(
    lite_weights: None, demo_root: Path, tmp_path: Path
) -> None:
    results = tmp_path / "results"
    killed_at = run_training(demo_root, results, tmp_path / "killed.pt", kill_at="representation step")
    assert killed_at, "training ended before logging a representation step: raise STEPS"
    step = int(killed_at.split("representation step ")[1].split("/")[0])
    assert 0 < step < STEPS, f"not killed during the representation phase: {killed_at!r}"
    assert not (tmp_path / "killed.pt").exists()
    run_training(demo_root, results, tmp_path / "rerun.pt")  # same results folder, leftovers and all
    run_training(demo_root, tmp_path / "clean", tmp_path / "clean.pt")
    rerun, clean = torch.load(tmp_path / "rerun.pt"), torch.load(tmp_path / "clean.pt")
    assert rerun["bank"].shape[0] > 0
    assert torch.equal(rerun["bank"], clean["bank"])
    assert torch.equal(rerun["scores"], clean["scores"])
