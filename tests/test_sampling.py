"""Training batches: neighbour groups are distinct rows, and on real patches their neighbourhoods agree."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anomalib_reconpatch.reconpatch.sampling import neighbor_groups
from anomalib_reconpatch.reconpatch.similarity import (
    contextual_similarity,
    knn_indicator,
    squared_cross_distances,
    squared_distances,
)
from anomalib_reconpatch.reconpatch.torch_model import ReConPatchModel

from .conftest import BACKBONE, LAYERS
from .test_model import demo_images


@pytest.mark.parametrize(("size", "batch", "group"), [(100, 20, 5), (100, 23, 5), (50, 10, 1), (30, 12, 12)])
def test_neighbor_groups_are_distinct_rows_holding_each_anchors_nearest(size: int, batch: int, group: int) -> None:
    pool = torch.randn(size, 3, generator=torch.Generator().manual_seed(size))
    chosen = neighbor_groups(pool, batch, group, generator=torch.Generator().manual_seed(1))
    assert len(chosen) == batch
    assert len(set(chosen.tolist())) == batch
    assert chosen.min() >= 0
    assert chosen.max() < size
    nearest = squared_cross_distances(pool, pool).topk(group, dim=1, largest=False).indices
    members = set(chosen.tolist())
    heads = [i for i in members if set(nearest[i].tolist()) <= members]
    assert len(heads) >= batch // group  # every anchor came with its whole group


def test_a_batch_larger_than_the_pool_is_the_whole_pool() -> None:
    chosen = neighbor_groups(torch.randn(8, 2), batch_size=20, group=3)
    assert sorted(chosen.tolist()) == list(range(8))


def test_on_real_patches_neighbor_batches_share_neighbourhoods_and_uniform_ones_do_not(
    lite_weights: None, demo_root: Path
) -> None:
    features = ReConPatchModel(BACKBONE, LAYERS).patch_features(demo_images(demo_root))
    patches = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    generator = torch.Generator().manual_seed(0)
    uniform = patches[torch.randperm(len(patches), generator=generator)[:512]]
    grouped = patches[neighbor_groups(patches, 512, 5, generator=generator)]

    def agreement_of_neighbours(batch: torch.Tensor) -> float:
        """Mean contextual similarity of each patch to its own k nearest batch neighbours."""
        sq = squared_distances(batch)
        neighbours = knn_indicator(sq, 5).fill_diagonal_(0).bool()
        return float(contextual_similarity(sq, 5)[neighbours].mean())

    assert agreement_of_neighbours(grouped) > 1.5 * agreement_of_neighbours(uniform)
