"""Peak resident memory of ReConPatch's fit with and without a feature memory budget, one process each.

    python benchmarks/fit_memory.py --data configs/data/bottle.yaml --budget none --budget 64

Each budget runs in a fresh Python process (so one run's peak cannot hide another's): anomalib's Engine
fits ReConPatch (seed 0, coreset ratio ``--ratio``, no validation pass) and the child reports its peak
resident set (``ru_maxrss``, the kernel's own maximum, and a 20 ms sampler over ``engine.fit``), the fit
timings, how many patch rows went to the spill file, and a hash of the memory bank, so that equal
hashes show the spilled fit built the very same bank.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
from pathlib import Path

from common import data_parser, fit_in_scratch


def child(args: argparse.Namespace) -> None:
    """Fit once with ``--child-budget`` and print one JSON line."""
    from lightning.pytorch import seed_everything

    from anomalib_reconpatch import ReConPatch
    from anomalib_reconpatch.tools.compare import build_datamodule, load_datamodule_config
    from anomalib_reconpatch.tools.memory import compare_mmap_threshold, fix_mmap_threshold, peak_rss

    fix_mmap_threshold(compare_mmap_threshold("ReConPatch"))  # as reconpatch compare does
    budget = None if args.child_budget == "none" else int(args.child_budget)
    seed_everything(0, workers=True)
    datamodule = build_datamodule(load_datamodule_config(args.data), seed=0)
    model = ReConPatch(
        backbone=args.backbone,
        layers=args.layers,
        coreset_sampling_ratio=args.ratio,
        feature_memory_mb=budget,
        visualizer=False,
    )
    with peak_rss() as sampled:
        fit_s = fit_in_scratch(model, datamodule)
    bank = model.model.memory_bank.contiguous().numpy()
    print(
        json.dumps(
            {
                "budget_mb": budget,
                "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "sampled_peak_mb": sampled["peak_rss_mb"],
                "engine_fit_s": fit_s,
                **model.fit_timings,
                "spilled_rows": model.spilled_rows,
                "bank_shape": list(bank.shape),
                "bank_sha256": hashlib.sha256(bank.tobytes()).hexdigest()[:16],
            }
        )
    )


def main() -> None:
    """Run one child per budget and print a table."""
    parser = data_parser(__doc__)
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--budget", action="append", default=[], help="megabytes, or 'none' for no limit")
    parser.add_argument("--child-budget", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_budget is not None:
        child(args)
        return
    rows = []
    for budget in args.budget or ["none", "64"]:
        command = [sys.executable, str(Path(__file__)), "--data", str(args.data), "--backbone", args.backbone]
        command += ["--layers", *args.layers, "--ratio", str(args.ratio), "--child-budget", budget]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"budget {budget} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"{args.data}, coreset ratio {args.ratio}: ReConPatch fit through anomalib's Engine, one process per row")
    print("| feature_memory_mb | peak RSS MB (ru_maxrss) | sampled peak MB | fit s | spilled rows | bank | bank sha256")
    print("|---|---|---|---|---|---|---")
    for row in rows:
        print(
            f"| {row['budget_mb'] if row['budget_mb'] is not None else 'none'} | {row['ru_maxrss_mb']:.0f} | "
            f"{row['sampled_peak_mb']:.0f} | {row['engine_fit_s']:.0f} | {row['spilled_rows']:,} | "
            f"{' x '.join(map(str, row['bank_shape']))} | {row['bank_sha256']}"
        )


if __name__ == "__main__":
    main()
