"""Relaxed contrastive loss on hand-checked examples."""

from __future__ import annotations

import pytest
import torch

from anomalib_reconpatch.reconpatch.loss import RelaxedContrastiveLoss, relaxed_contrastive_loss


def test_two_points_pull_and_push_by_hand() -> None:
    z = torch.tensor([[0.0], [1.0]])
    ones, zeros = torch.ones(2, 2), torch.zeros(2, 2)
    assert relaxed_contrastive_loss(z, ones, margin=1.0).item() == pytest.approx(1.0)  # delta = 1, pulled
    assert relaxed_contrastive_loss(z, zeros, margin=1.0).item() == pytest.approx(0.0)  # at the margin
    assert relaxed_contrastive_loss(z, zeros, margin=2.0).item() == pytest.approx(1.0)  # (2 - 1)^2 per pair


def test_relative_distances_by_hand() -> None:
    # d01=1, d02=3, d12=2; row means over n != i: 2, 1.5, 2.5.
    z = torch.tensor([[0.0], [1.0], [3.0]])
    w = torch.full((3, 3), 0.5)
    deltas = [1 / 2, 3 / 2, 1 / 1.5, 2 / 1.5, 3 / 2.5, 2 / 2.5]
    expected = sum(0.5 * d**2 + 0.5 * max(0.0, 1 - d) ** 2 for d in deltas) / 3
    assert relaxed_contrastive_loss(z, w, margin=1.0).item() == pytest.approx(expected)


def test_loss_is_scale_invariant_and_ignores_diagonal_weights() -> None:
    z = torch.randn(10, 5, generator=torch.Generator().manual_seed(0))
    w = torch.rand(10, 10, generator=torch.Generator().manual_seed(1))
    w = (w + w.T) / 2
    base = relaxed_contrastive_loss(z, w)
    assert relaxed_contrastive_loss(7.0 * z, w).item() == pytest.approx(base.item(), rel=1e-5)
    w_diag = w.clone().fill_diagonal_(0.123)
    assert relaxed_contrastive_loss(z, w_diag).item() == pytest.approx(base.item(), rel=1e-6)


def test_gradient_reaches_z_only_and_is_finite_with_duplicates() -> None:
    z = torch.randn(6, 3, generator=torch.Generator().manual_seed(2))
    z = torch.cat([z, z[:2]]).requires_grad_(True)  # exact duplicates: zero distances
    w = torch.rand(8, 8, requires_grad=True)
    loss = RelaxedContrastiveLoss(margin=1.0)(z, w)
    loss.backward()
    assert torch.isfinite(loss)
    assert z.grad is not None
    assert torch.isfinite(z.grad).all()
    assert z.grad.abs().sum() > 0
    assert w.grad is None


def test_pull_and_push_pairs_by_hand_on_three_points_of_a_line() -> None:
    """Points 0, 1, 3: relative distances 1/2, 3/2 (row 0), 2/3, 4/3 (row 1), 6/5, 4/5 (row 2); w = 1/4, m = 1."""
    from anomalib_reconpatch.reconpatch.loss import relaxed_contrastive_pairs

    z = torch.tensor([[0.0], [1.0], [3.0]])
    pull, push = relaxed_contrastive_pairs(z, torch.full((3, 3), 0.25), margin=1.0)
    rel = torch.tensor([[0.0, 1 / 2, 3 / 2], [2 / 3, 0.0, 4 / 3], [6 / 5, 4 / 5, 0.0]])
    off = ~torch.eye(3, dtype=torch.bool)
    assert torch.allclose(pull, 0.25 * rel**2 * off, atol=1e-6)
    assert torch.allclose(push, 0.75 * (1 - rel).clamp_min(0) ** 2 * off, atol=1e-6)
    assert push[0, 1] == pytest.approx(0.1875)
    assert push[0, 2] == 0
    assert relaxed_contrastive_loss(z, torch.full((3, 3), 0.25)) == pytest.approx(float(pull.sum() + push.sum()) / 3)


@pytest.mark.parametrize(("n", "margin"), [(7, 0.5), (64, 1.0), (200, 2.0)])
def test_closed_form_gradient_is_autograds_through_the_pairs_also_with_duplicate_rows(n: int, margin: float) -> None:
    from anomalib_reconpatch.reconpatch.loss import relaxed_contrastive_pairs
    from anomalib_reconpatch.reconpatch.similarity import pseudo_labels

    z = 3 * torch.randn(n, 5, generator=torch.Generator().manual_seed(n), dtype=torch.float64) + 5
    z[-2:] = z[:2]  # zero distances, where the reference's clamp stops the gradient
    w = pseudo_labels(z, k=3, alpha=0.5, sigma=1.0).double()
    fused, reference = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    loss = relaxed_contrastive_loss(fused, w, margin)
    loss.backward()
    pull, push = relaxed_contrastive_pairs(reference, w, margin)
    expected = (pull + push).sum() / n
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert torch.allclose(fused.grad, reference.grad, rtol=1e-9, atol=1e-12 * float(reference.grad.abs().max()))
    distinct = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x: relaxed_contrastive_loss(x, w[:6, :6], margin), distinct.requires_grad_(True)
    )
