"""glibc's mmap threshold against stock PatchCore's coreset loop and against ReConPatch's fit.

    python benchmarks/mmap_threshold.py --data configs/data/bottle.yaml --rows 214016 --selections 1500 \
        --threshold-kib 4096 128 --out docs/results/mmap_threshold/bottle.md

For each threshold (in KiB; ``0`` leaves glibc's own, self-raising one), three fresh processes, one
after the other:
- anomalib's ``KCenterGreedy``, PatchCore's coreset, makes ``--selections`` selections among ``--rows``
  rows of ``--width`` columns, and reports its resident memory once its projection is made and after
  the last selection. The rows are random normal: the loop's allocations depend only on the matrix's
  shape (the projection's width too depends only on the row count), and 214,016 x 152 is MVTec AD
  bottle's at 256 px with ``tf_efficientnet_lite0``. Each selection allocates a distance vector of
  ``rows`` floats; growth per selection near that size means each one stays behind in the heap.
  ``--drop-indices`` runs the loop without keeping the selected indices, small tensors that anomalib's
  loop keeps in a list until the end.
- stock Patchcore, then ReConPatch, fit ``--data`` through anomalib's Engine (seed 0, coreset ratio
  ``--ratio``, no validation pass) and report the fit's time and peak resident memory: what a
  threshold costs each model's many smaller temporaries, which a low threshold maps and unmaps afresh.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import data_parser, fit_in_scratch, write_report


def resident_mb() -> float:
    """This process's resident memory now, in MiB."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def apply_threshold(kib: int) -> None:
    """Fix glibc's mmap threshold at ``kib`` KiB, or leave glibc's own where ``kib`` is 0."""
    from anomalib_reconpatch.tools.memory import fix_mmap_threshold

    if kib and not fix_mmap_threshold(kib * 1024):
        sys.exit("mallopt refused the threshold: this benchmark needs glibc")


def kcenter_child(args: argparse.Namespace) -> dict:
    """Run anomalib's ``KCenterGreedy`` for ``--selections`` selections; resident memory before and after."""
    import torch
    from anomalib.models.components.sampling import KCenterGreedy

    torch.manual_seed(0)
    sampler = KCenterGreedy(torch.randn(args.rows, args.width), sampling_ratio=(args.selections + 1) / args.rows)
    sampler.model.fit(sampler.embedding)
    sampler.features = sampler.model.transform(sampler.embedding)
    start_mb = resident_mb()
    index = torch.randint(high=args.rows, size=(1,)).squeeze()
    chosen = [index]
    start = time.perf_counter()
    # anomalib's own loop body (select_coreset_idxs without its progress bar), so the allocations are its own
    for _ in range(args.selections):
        sampler.update_distances(cluster_center=index)
        index = sampler.get_new_idx()
        sampler.min_distances.scatter_(0, index.unsqueeze(0).unsqueeze(1), 0.0)
        if not args.drop_indices:
            chosen.append(index)
    seconds = time.perf_counter() - start
    return {"start_mb": start_mb, "end_mb": resident_mb(), "loop_s": seconds, "width": sampler.features.shape[1]}


def fit_child(args: argparse.Namespace, name: str) -> dict:
    """Fit ``ReConPatch`` or stock ``Patchcore`` on ``--data`` once; its time and peak resident memory."""
    import anomalib.models
    from lightning.pytorch import seed_everything

    import anomalib_reconpatch  # noqa: F401  (registers ReConPatch in anomalib.models)
    from anomalib_reconpatch.tools.compare import build_datamodule, load_datamodule_config

    seed_everything(0, workers=True)
    datamodule = build_datamodule(load_datamodule_config(args.data), seed=0)
    model_class = getattr(anomalib.models, name)
    model = model_class(backbone=args.backbone, layers=args.layers, coreset_sampling_ratio=args.ratio, visualizer=False)
    fit_s = fit_in_scratch(model, datamodule)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"fit_s": fit_s, "peak_mb": peak_mb}


def run_child(args: argparse.Namespace, part: str, kib: int) -> dict:
    """Run one part under one threshold in a fresh process and return its JSON line."""
    command = [sys.executable, str(Path(__file__)), "--data", str(args.data), "--backbone", args.backbone]
    command += ["--layers", *args.layers, "--ratio", str(args.ratio), "--rows", str(args.rows)]
    command += ["--width", str(args.width), "--selections", str(args.selections), "--child", f"{part}:{kib}"]
    command += ["--drop-indices"] if args.drop_indices else []
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{part} under {kib} KiB failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    """Run both parts under every threshold and write a Markdown report."""
    parser = data_parser(__doc__)
    parser.add_argument("--ratio", type=float, default=0.1, help="ReConPatch's coreset ratio")
    parser.add_argument("--rows", type=int, default=214016)
    parser.add_argument("--width", type=int, default=152)
    parser.add_argument("--selections", type=int, default=1500)
    parser.add_argument(
        "--drop-indices", action="store_true", help="the loop does not keep its selections' indices (anomalib's does)"
    )
    parser.add_argument("--threshold-kib", type=int, nargs="+", default=[4096, 128])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        part, kib = args.child.split(":")
        apply_threshold(int(kib))
        print(json.dumps(kcenter_child(args) if part == "kcenter" else fit_child(args, part)))
        return
    vector_kb = args.rows * 4 / 1024
    lines = [
        f"`python benchmarks/mmap_threshold.py {' '.join(sys.argv[1:])}`",
        "",
        f"anomalib's `KCenterGreedy`: {args.selections:,} selections among {args.rows:,} x {args.width} random rows "
        f"(a distance vector is {vector_kb:,.0f} KB); stock Patchcore and ReConPatch: a fit of {args.data} at coreset "
        f"ratio {args.ratio}, seed 0. "
        "One fresh process per cell, one after the other.",
        "",
        "| mmap threshold | KCenterGreedy MB after projection | after the selections | growth KB per selection "
        "| s per selection | Patchcore fit s | Patchcore peak MB | ReConPatch fit s | ReConPatch peak MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kib in args.threshold_kib:
        loop, stock, ours = (run_child(args, part, kib) for part in ("kcenter", "Patchcore", "ReConPatch"))
        growth_kb = (loop["end_mb"] - loop["start_mb"]) * 1024 / args.selections
        lines.append(
            f"| {f'{kib:,} KiB' if kib else 'glibc default'} | {loop['start_mb']:,.0f} | {loop['end_mb']:,.0f} | "
            f"{growth_kb:,.0f} | {loop['loop_s'] / args.selections:.3f} | {stock['fit_s']:.1f} | "
            f"{stock['peak_mb']:,.0f} | {ours['fit_s']:.1f} | {ours['peak_mb']:,.0f} |"
        )
    write_report("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
