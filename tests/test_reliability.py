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
