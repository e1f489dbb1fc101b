"""What the pseudo-labels see in a training batch: uniform batches against nearest-neighbour groups.

    python benchmarks/batch_neighbourhoods.py --data configs/data/bottle.yaml

The backbone runs over the training images once; then, for several batches of each kind
(``batch_sampling`` ``uniform`` and ``neighbors``, on the raw features, which are the targets'
space at step 0), it prints:

- the mean contextual similarity ``w^C`` over all pairs, beside its ceiling ``(k - 1) / (B - 1)``:
  ``w^C`` is non-zero only among each patch's k nearest batch neighbours, so this mean is small
  whatever the batch, and says little by itself;
- the mean ``w^C`` and ``w^P`` over each patch's k nearest batch neighbours: how far the
  neighbourhoods agree, and how similar the kernel finds the nearest patches;
- the bandwidth ``s`` (mean squared distance to the k-th batch neighbour) in which ``sigma`` is measured.
"""

from __future__ import annotations

import statistics

import torch
from common import cache, data_parser, flat_patches, load_data

from anomalib_reconpatch.reconpatch.sampling import NEIGHBOR_POOL, neighbor_groups
from anomalib_reconpatch.reconpatch.similarity import (
    contextual_similarity,
    knn_bandwidth,
    knn_indicator,
    pairwise_similarity,
    squared_distances,
)


def batch_statistics(batch: torch.Tensor, k: int) -> dict[str, float]:
    """The contextual and pairwise similarities of one batch, over all pairs and over nearest-neighbour pairs."""
    sq = squared_distances(batch)
    contextual = contextual_similarity(sq, k)
    bandwidth = knn_bandwidth(sq, k)
    pairwise = pairwise_similarity(sq, bandwidth)
    off = ~torch.eye(len(batch), dtype=torch.bool)
    neighbours = knn_indicator(sq, k).bool() & off
    return {
        "w^C, all pairs": float(contextual[off].mean()),
        "ceiling (k-1)/(B-1)": (k - 1) / (len(batch) - 1),
        "w^C, k-NN pairs": float(contextual[neighbours].mean()),
        "w^P, k-NN pairs": float(pairwise[neighbours].mean()),
        "bandwidth s": float(bandwidth),
    }


def main() -> None:
    """Print the mean of each statistic over ``--batches`` batches of each kind."""
    parser = data_parser(__doc__)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--k", type=int, default=5)
    args = parser.parse_args()
    datamodule, model = load_data(args)
    patches = flat_patches(cache(model, datamodule.train_dataloader(), test=False)["features"])
    generator = torch.Generator().manual_seed(0)
    print(f"{args.data.stem}: {len(patches)} training patches, batches of {args.batch_size}, k={args.k}")
    for kind in ("uniform", "neighbors"):
        records = []
        for _ in range(args.batches):
            if kind == "uniform":
                batch = patches[torch.randint(len(patches), (args.batch_size,), generator=generator)]
            else:
                pool = patches[torch.randperm(len(patches), generator=generator)[:NEIGHBOR_POOL]]
                batch = pool[neighbor_groups(pool, args.batch_size, args.k, generator=generator)]
            records.append(batch_statistics(batch, args.k))
        means = {name: statistics.fmean(r[name] for r in records) for name in records[0]}
        print(f"{kind:9s} " + ", ".join(f"{name} {value:.4f}" for name, value in means.items()), flush=True)


if __name__ == "__main__":
    main()
