"""Coreset speed and quality: our exact greedy k-center against anomalib's KCenterGreedy, one run.

    python benchmarks/coreset.py --data configs/data/bottle.yaml --ratio 0.1

Prints: our selection time on the patch features; anomalib's measured per-selection time over
``--stock-steps`` selections and the full time that implies; and the coverage radius (largest
distance from any training patch to its nearest selected patch, in feature space) of our
selection and of anomalib's selection (computed with our exact algorithm on anomalib's random
projection and start point, which selects the same points: tests/test_coreset.py).
Every 10 s our selection also logs how many of its balls it scanned per step: few on clustered
patches (fast), nearly all on diffuse ones (a full scan per step).

``--trained`` selects on ``f(x)`` after training ``f`` with the model's defaults, as a fit does, instead
of on the backbone features; ``--dims 32 48`` also times our selection with each count of the projected
bound's principal directions (and says whether it selects the same rows); ``--stock-steps 0`` skips
anomalib's loop and the coverage radii, which take minutes on large data. ``--shards N`` times the
selection as a fit makes it (from the row farthest from the mean), N times in turn three ways: one loop
on all of torch's threads; two shards of the rows, each selected by its own thread, to the end (a fit
whose training chose one thread); and the two shards until the balls prune most steps, then one loop on
all threads (a fit whose training chose all threads). For each shard way it says whether it selects one
loop's rows in one loop's order, and how many rows the two share.
"""

from __future__ import annotations

import logging
import statistics
import time

import torch
from anomalib.models.components import KCenterGreedy
from anomalib.models.components.dimensionality_reduction import SparseRandomProjection
from common import cache, data_parser, flat_patches, load_data

from anomalib_reconpatch.components import coreset
from anomalib_reconpatch.components.coreset import greedy_k_center
from anomalib_reconpatch.reconpatch.search import nearest_bank_rows


def coverage_radius(features: torch.Tensor, selected: torch.Tensor) -> float:
    """Largest distance from any point to its nearest selected point."""
    bank = features[selected]
    return max(float(nearest_bank_rows(chunk, bank)[0].max()) for chunk in features.split(65536))


def main() -> None:
    """Run the comparison and print one line per measurement."""
    parser = data_parser(__doc__)
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--stock-steps", type=int, default=300)
    parser.add_argument(
        "--without-bound", action="store_true", help="also time our selection without the projected bound"
    )
    parser.add_argument("--trained", action="store_true", help="select on f(x), f trained with the defaults")
    parser.add_argument("--dims", type=int, nargs="+", default=[], help="also time the bound on these many directions")
    parser.add_argument(
        "--shards", type=int, default=0, help="time the fit's selection N times on all threads and on two shards"
    )
    args = parser.parse_args()
    logging.basicConfig(format="%(message)s")
    logging.getLogger("anomalib_reconpatch.components.coreset").setLevel(logging.INFO)
    datamodule, model = load_data(args)
    features = flat_patches(cache(model, datamodule.train_dataloader(), test=False)["features"])
    if args.trained:
        start = time.perf_counter()
        with torch.enable_grad():
            model.train_representation(features)
        with torch.no_grad():
            features = torch.cat([model.model.embed(chunk) for chunk in features.split(65536)])
        print(f"f trained with the defaults in {time.perf_counter() - start:.1f} s; selecting on f(x)")
    n_select = int(len(features) * args.ratio)
    print(f"{len(features)} patches x {features.shape[1]} dims, selecting {n_select}")

    torch.manual_seed(0)
    start_index = int(torch.randint(high=len(features), size=(1,)))

    def with_directions(dims: int) -> tuple[torch.Tensor, float]:
        """Our selection from the same start with the bound on ``dims`` directions, and its seconds."""
        default, coreset.PROJECTED_DIMS = coreset.PROJECTED_DIMS, dims
        try:
            start = time.perf_counter()
            return greedy_k_center(features, n_select, start_index), time.perf_counter() - start
        finally:
            coreset.PROJECTED_DIMS = default

    ours, ours_s = with_directions(coreset.PROJECTED_DIMS)
    per_selection = 1000 * ours_s / n_select
    print(f"ours: {ours_s:.1f} s ({per_selection:.2f} ms per selection), {coreset.PROJECTED_DIMS} directions")
    for dims in args.dims:
        other, other_s = with_directions(dims)
        same = "the same" if torch.equal(other, ours) else "another"
        print(f"ours with {dims} directions: {other_s:.1f} s ({other_s / ours_s:.2f}x), {same} selection")
    if args.without_bound:
        unbounded, unbounded_s = with_directions(features.shape[1])  # too many: the bound is off
        same = "the same" if torch.equal(unbounded, ours) else "another"
        print(f"ours without the projected bound: {unbounded_s:.1f} s ({unbounded_s / ours_s:.1f}x), {same} selection")

    if args.shards:
        # (threads, fewest rows to shard): all threads with sharding off, then the fit's two verdicts
        ways = {
            "one loop": (coreset.TASKS, len(features) + 1),
            "two shards": (1, coreset.SHARD_MIN_ROWS),
            "shards, then one loop": (coreset.TASKS, coreset.SHARD_MIN_ROWS),
        }
        seconds: dict[str, list[float]] = {name: [] for name in ways}
        chosen: dict[str, torch.Tensor] = {}
        default = coreset.SHARD_MIN_ROWS
        for _ in range(args.shards):
            for name, (count, min_rows) in ways.items():
                coreset.SHARD_MIN_ROWS = min_rows
                start = time.perf_counter()
                try:
                    chosen[name] = greedy_k_center(features, n_select, threads=count)
                finally:
                    coreset.SHARD_MIN_ROWS = default
                seconds[name].append(time.perf_counter() - start)
                print(f"fit's selection, {name}: {seconds[name][-1]:.1f} s", flush=True)
        medians = {name: statistics.median(times) for name, times in seconds.items()}
        whole = medians["one loop"]
        each = ", ".join(f"{name} {median:.1f} s ({whole / median:.2f}x)" for name, median in medians.items())
        print(f"fit's selection, median of {args.shards}: {each} (one loop / each)")
        one_loop = set(chosen["one loop"].tolist())
        for name, rows in chosen.items():
            if name != "one loop":  # float32 rounding can break near-ties either way, and the rest follows
                same = "the same rows in the same order" if torch.equal(rows, chosen["one loop"]) else "another order"
                shared = len(one_loop.intersection(rows.tolist()))
                print(f"{name} against one loop: {same}, {shared} of {n_select} rows in both")
    if args.stock_steps == 0:
        return
    stock = KCenterGreedy(features, sampling_ratio=args.stock_steps / len(features))
    start = time.perf_counter()
    stock.select_coreset_idxs()
    per_step = (time.perf_counter() - start) / args.stock_steps
    print(
        f"anomalib KCenterGreedy: {1000 * per_step:.1f} ms per selection over {args.stock_steps}, "
        f"so about {per_step * n_select:.0f} s for {n_select} ({per_step * n_select / ours_s:.0f}x ours)"
    )

    projected = SparseRandomProjection(eps=0.9).fit(features).transform(features)
    stock_selection = greedy_k_center(projected, n_select, start_index)
    ours_radius, stock_radius = coverage_radius(features, ours), coverage_radius(features, stock_selection)
    print(
        f"coverage radius in feature space: ours {ours_radius:.3f}, anomalib's selection {stock_radius:.3f} "
        f"(ours / anomalib's = {ours_radius / stock_radius:.3f})"
    )


if __name__ == "__main__":
    main()
