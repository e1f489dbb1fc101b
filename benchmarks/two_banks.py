"""Two memory banks of one backbone, the trained ``f``'s and the untrained one's, against one bank twice as large.

A cheap ensemble without a second backbone: fit the trained and the untrained (``num_steps=0``) member on
the same cached features, standardise each one's anomaly maps by its own training images (as
``ReConPatchEnsemble`` does) and average the maps; images score by the largest pixel of the averaged map,
the single model's default. Two banks cost two searches, as one bank of twice the coreset ratio does, so
the table also has each ``f`` alone at twice the ratio, and two trained seeds averaged the same way: if
those gain as much, the gain is the bank's size, not the trained and untrained metrics complementing each
other. Ends with a mean ± sd table over the seeds; ``--out`` writes it as Markdown.

    python benchmarks/two_banks.py --data configs/data/mpdd_metal_plate.yaml --seeds 0 1 2 \
        --out docs/results/two_banks/mpdd_metal_plate.md
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch
from common import data_parser, evaluate, load_data, mean_sd_table, score, write_report
from ensemble import cached_features, fitted_member

from anomalib_reconpatch.reconpatch.anomaly_map import largest_pixel
from anomalib_reconpatch.reconpatch.ensemble import EnsembleMember, standardise


def standardised_map(member: EnsembleMember, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The member's anomaly maps of the test features, standardised by its training images' map statistics."""
    _, maps = score(member, features, size)
    return standardise(maps, *map(torch.tensor, member.map_statistics))


def main() -> None:
    """Score each bank alone, each at twice the ratio, and the averaged pairs, for every seed."""
    parser = data_parser(__doc__)
    parser.add_argument("--coreset-ratio", type=float, default=0.01)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    datamodule, base = load_data(args, coreset_sampling_ratio=args.coreset_ratio)
    features, test = cached_features(args.backbone, args, base, datamodule)
    size = tuple(test["masks"].shape[-2:])
    ratio = args.coreset_ratio
    rows: dict[str, list[dict[str, float]]] = {}

    def fitted(steps: int | None, seed: int, coreset_ratio: float) -> EnsembleMember:
        torch.manual_seed(seed)
        at_ratio = argparse.Namespace(**{**vars(args), "coreset_ratio": coreset_ratio})
        return fitted_member(args.backbone, at_ratio, steps, features, size)

    def record(name: str, maps: torch.Tensor, seed: int) -> None:
        metrics = evaluate(largest_pixel(maps), maps, test)
        rows.setdefault(name, []).append(metrics)
        print(f"seed {seed} {name}: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)

    # the untrained fit draws nothing at random: one per ratio serves every seed
    untrained = {r: standardised_map(fitted(0, 0, r), features["test"], size) for r in (ratio, 2 * ratio)}
    for seed in args.seeds:
        trained = standardised_map(fitted(None, seed, ratio), features["test"], size)
        other_seed = standardised_map(fitted(None, seed + 100, ratio), features["test"], size)
        twice = standardised_map(fitted(None, seed, 2 * ratio), features["test"], size)
        record(f"untrained `f`, ratio {ratio}", untrained[ratio], seed)
        record(f"trained `f` (the defaults), ratio {ratio}", trained, seed)
        record(f"untrained `f`, ratio {2 * ratio}", untrained[2 * ratio], seed)
        record(f"trained `f`, ratio {2 * ratio}", twice, seed)
        record(f"trained + untrained banks, ratio {ratio} each", (trained + untrained[ratio]) / 2, seed)
        record(f"two trained seeds' banks, ratio {ratio} each", (trained + other_seed) / 2, seed)
    command = f"`python {shlex.join(sys.argv)}`"
    header = f"{args.data.stem}, {args.backbone}, {'x'.join(map(str, args.image_size))} px, seeds {args.seeds}"
    write_report(f"{command}\n\n{header}\n\n{mean_sd_table('banks', rows)}", args.out)


if __name__ == "__main__":
    main()
