"""Property-based checks of the similarities and the loss for any finite input, duplicates included."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from anomalib_reconpatch.reconpatch.loss import relaxed_contrastive_loss
from anomalib_reconpatch.reconpatch.similarity import SIGMA_UNITS, pseudo_labels

finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def batches(draw: st.DrawFn) -> torch.Tensor:
    """2 to 24 points in 1 to 6 dimensions, often with exact duplicates."""
    n, d = draw(st.integers(2, 24)), draw(st.integers(1, 6))
    points = torch.from_numpy(draw(arrays("float32", (n, d), elements=finite)))
    if draw(st.booleans()):
        points[n // 2 :] = points[: n - n // 2].clone()
    return points


@settings(max_examples=150, deadline=None)
@given(
    z=batches(),
    k=st.integers(1, 8),
    alpha=st.floats(0, 1),
    sigma=st.floats(0.01, 10),
    unit=st.sampled_from(SIGMA_UNITS),
)
def test_pseudo_labels_are_symmetric_weights_in_unit_interval(
    z: torch.Tensor, k: int, alpha: float, sigma: float, unit: str
) -> None:
    w = pseudo_labels(z, k=k, alpha=alpha, sigma=sigma, sigma_unit=unit)
    assert torch.isfinite(w).all()
    assert (w >= 0).all()
    assert (w <= 1 + 1e-6).all()
    assert torch.allclose(w, w.T, atol=1e-6)


@settings(max_examples=150, deadline=None)
@given(z=batches(), k=st.integers(1, 8), margin=st.floats(0.1, 4))
def test_loss_is_finite_and_non_negative_with_finite_gradients(z: torch.Tensor, k: int, margin: float) -> None:
    w = pseudo_labels(z, k=k, alpha=0.5, sigma=1.0)
    z = z.clone().requires_grad_(True)
    loss = relaxed_contrastive_loss(z, w, margin)
    loss.backward()
    assert torch.isfinite(loss)
    assert loss >= 0
    assert torch.isfinite(z.grad).all()


def test_equal_rows_far_from_the_origin_are_fully_similar() -> None:
    """The case hypothesis found: equal rows at 20.6 once gave rounding-noise distances and similarity 0.14."""
    z = torch.full((4, 6), 20.6055)
    w = pseudo_labels(z, k=1, alpha=1.0, sigma=1.0)
    assert torch.equal(w, w.T)
    assert torch.allclose(w, torch.ones(4, 4))
