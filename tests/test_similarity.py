"""Similarities on small hand-checked examples, and against a literal reading of the definitions."""

from __future__ import annotations

import math

import pytest
import torch

from anomalib_reconpatch.reconpatch.similarity import (
    contextual_similarity,
    knn_bandwidth,
    knn_indicator,
    pairwise_similarity,
    pseudo_labels,
    squared_distances,
)

LINE = torch.tensor([[0.0], [1.0], [3.0], [7.0]], dtype=torch.float64)


def test_squared_distances_by_hand() -> None:
    expected = torch.tensor([[0, 1, 9, 49], [1, 0, 4, 36], [9, 4, 0, 16], [49, 36, 16, 0]], dtype=torch.float64)
    assert torch.equal(squared_distances(LINE), expected)


def test_pairwise_similarity_is_gaussian_kernel() -> None:
    w = pairwise_similarity(squared_distances(LINE), sigma=2.0)
    assert w[0, 1].item() == pytest.approx(math.exp(-0.5))
    assert w[1, 2].item() == pytest.approx(math.exp(-2.0))
    assert torch.equal(w.diagonal(), torch.ones(4, dtype=torch.float64))


def test_knn_bandwidth_by_hand() -> None:
    sq = squared_distances(LINE)
    assert knn_bandwidth(sq, 1).item() == pytest.approx((1 + 1 + 4 + 16) / 4)
    assert knn_bandwidth(sq, 2).item() == pytest.approx((9 + 4 + 9 + 36) / 4)


def test_knn_indicator_keeps_self_among_duplicates() -> None:
    duplicates = torch.zeros(4, 2)
    indicator = knn_indicator(squared_distances(duplicates), 2)
    assert torch.equal(indicator.diagonal(), torch.ones(4))
    assert torch.equal(indicator.sum(1), torch.full((4,), 2.0))


def test_contextual_similarity_by_hand() -> None:
    # k=2: N(0)={0,1}, N(1)={1,0}, N(2)={2,1}, N(3)={3,2}; k//2=1 so R(i)={i} (no expansion).
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0.25, 0], [0, 0.25, 1, 0.25], [0, 0, 0.25, 1]], dtype=torch.float64)
    assert torch.allclose(contextual_similarity(squared_distances(LINE), 2), expected)


def test_contextual_similarity_with_query_expansion_by_hand() -> None:
    # k=4: N(0)=N(1)=N(2)={0,1,2,3}, N(3)=N(4)={1,2,3,4}; k//2=2 gives R(0)={0,1}, R(1)={1,0},
    # R(2)={2}, R(3)={3,4}, R(4)={4,3}. w~ rows 0-2 = [1,1,1,.75,0], rows 3-4 = [0,.75,.75,1,1];
    # averaging over R keeps them; symmetrising gives:
    points = torch.tensor([[0.0], [1.0], [2.2], [10.0], [11.0]], dtype=torch.float64)
    expected = torch.tensor(
        [
            [1, 1, 1, 0.375, 0],
            [1, 1, 1, 0.75, 0.375],
            [1, 1, 1, 0.75, 0.375],
            [0.375, 0.75, 0.75, 1, 1],
            [0, 0.375, 0.375, 1, 1],
        ],
        dtype=torch.float64,
    )
    assert torch.allclose(contextual_similarity(squared_distances(points), 4), expected)


def reference_contextual(points: torch.Tensor, k: int) -> torch.Tensor:
    """The definition read literally, with Python sets."""
    n = points.shape[0]
    sq = squared_distances(points)

    def knn(i: int, kk: int) -> set[int]:
        order = sorted(range(n), key=lambda j: (j != i, sq[i, j].item()))
        return set(order[:kk])

    neighbours = [knn(i, k) for i in range(n)]
    half = [knn(i, max(1, k // 2)) for i in range(n)]
    tilde = [
        [len(neighbours[i] & neighbours[j]) / k if j in neighbours[i] else 0.0 for j in range(n)] for i in range(n)
    ]
    hat = []
    for i in range(n):
        reciprocal = [m for m in half[i] if i in half[m]]
        hat.append([sum(tilde[m][j] for m in reciprocal) / len(reciprocal) for j in range(n)])
    return torch.tensor([[(hat[i][j] + hat[j][i]) / 2 for j in range(n)] for i in range(n)], dtype=points.dtype)


@pytest.mark.parametrize("k", [1, 3, 5, 8])
def test_contextual_matches_literal_definition(k: int) -> None:
    points = torch.randn(24, 6, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    assert torch.allclose(contextual_similarity(squared_distances(points), k), reference_contextual(points, k))


def test_pseudo_labels_mix_and_carry_no_gradient() -> None:
    z = torch.randn(16, 4, requires_grad=True)
    w = pseudo_labels(z, k=3, alpha=1.0, sigma=1.0)
    assert not w.requires_grad
    sq = squared_distances(z.detach())
    assert torch.allclose(w, pairwise_similarity(sq, knn_bandwidth(sq, 3)))
    assert torch.allclose(pseudo_labels(z, k=3, alpha=0.0, sigma=1.0), contextual_similarity(sq, 3))
    mixed = pseudo_labels(z, k=3, alpha=0.25, sigma=1.0)
    assert torch.allclose(
        mixed, 0.25 * pairwise_similarity(sq, knn_bandwidth(sq, 3)) + 0.75 * contextual_similarity(sq, 3)
    )


def test_normalized_sigma_is_absolute_on_unit_length_projections() -> None:
    z = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    w = pseudo_labels(z, k=3, alpha=1.0, sigma=0.5, sigma_unit="normalized")
    unit = z / z.norm(dim=1, keepdim=True)
    assert torch.allclose(w, torch.exp(-torch.cdist(unit, unit).pow(2) / 0.5), atol=1e-5)
    assert torch.allclose(
        pseudo_labels(7.0 * z, k=3, alpha=0.5, sigma=0.5, sigma_unit="normalized"),
        pseudo_labels(z, k=3, alpha=0.5, sigma=0.5, sigma_unit="normalized"),
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="sigma_unit"):
        pseudo_labels(z, k=3, alpha=0.5, sigma=0.5, sigma_unit="pixels")


def matrix_contextual(sq: torch.Tensor, k: int) -> torch.Tensor:
    """The matrix form of the definition: indicator products instead of index lists."""
    neighbours = knn_indicator(sq, k)
    w_tilde = (neighbours @ neighbours.T) / neighbours.sum(dim=1, keepdim=True) * neighbours
    half = knn_indicator(sq, max(1, k // 2))
    reciprocal = half * half.T
    w_hat = (reciprocal @ w_tilde) / reciprocal.sum(dim=1, keepdim=True)
    return 0.5 * (w_hat + w_hat.T)


@pytest.mark.parametrize("k", [1, 2, 5, 9])
def test_contextual_from_index_lists_equals_the_matrix_form(k: int) -> None:
    generator = torch.Generator().manual_seed(k)
    sq = squared_distances(torch.randn(512, 16, generator=generator))  # no ties: one neighbourhood per point
    fast, matrix = contextual_similarity(sq, k), matrix_contextual(sq, k)
    if k // 2 <= 2:  # query expansion over at most two rows: the same sums, so the same bits (the default k is 5)
        assert torch.equal(fast, matrix)
    else:  # longer sums, added in another order
        assert torch.allclose(fast, matrix, atol=1e-6)


def test_contextual_with_k_above_the_batch_treats_every_point_as_a_neighbour() -> None:
    sq = squared_distances(LINE)
    assert torch.equal(contextual_similarity(sq, 10), matrix_contextual(sq, 10))
    assert torch.equal(contextual_similarity(sq, 10), torch.ones(4, 4, dtype=torch.float64))
