"""Eager torch exact search time per bank chunk size, at bottle's shapes (coreset ratio 0.1, batch 1).

    python benchmarks/search_chunk.py --chunks 1024 2048 4096

``nearest_bank_distances`` scans the bank in chunks; its time depends only on the shapes (1,024
query patches of a 256 px image, a 21,401 x 152 bank), so random rows stand in for features. Every
chunk size is timed in turn in each round; the median over rounds is printed. Then the exports'
support table (every bank row's 9 nearest rows, ``nearest_rows``) is built once and timed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from anomalib_reconpatch.reconpatch.search import nearest_bank_distances, nearest_rows


def main() -> None:
    """Print the median ms of one image's search per chunk size."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--bank-rows", type=int, default=21401)
    parser.add_argument("--dim", type=int, default=152)
    parser.add_argument("--queries", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(args.bank_rows, args.dim, generator=generator)
    queries = torch.randn(args.queries, args.dim, generator=generator)
    times: dict[int, list[float]] = {chunk: [] for chunk in args.chunks}
    for chunk in args.chunks:
        nearest_bank_distances(queries, bank, chunk)
    for _ in range(args.rounds):
        for chunk in args.chunks:
            start = time.perf_counter()
            nearest_bank_distances(queries, bank, chunk)
            times[chunk].append((time.perf_counter() - start) * 1000)
    print("| chunk | ms |\n|---|---|")
    for chunk, values in times.items():
        print(f"| {chunk} | {statistics.median(values):.1f} |")
    start = time.perf_counter()
    nearest_rows(bank, bank, 9)
    print(f"support table of {args.bank_rows} rows: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
