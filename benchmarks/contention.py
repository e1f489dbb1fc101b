"""The fit's phases on a quiet CPU and beside competing CPU-bound processes, ReConPatch and PatchCore in one run.

    python benchmarks/contention.py --data configs/data/mpdd_metal_plate.yaml --competitors 4 \
        --out docs/results/contention/mpdd_metal_plate.md

Each fit runs in a fresh process: stock Patchcore, then ReConPatch, first alone and then beside
``--competitors`` busy-looping Python processes (one core's worth of work each, started before the
fit and killed after it). ReConPatch's phases are its own ``fit_timings`` (features, representation
training, embedding and coreset); PatchCore's are the feature pass and its ``fit`` (the coreset
loop). The table gives each phase's seconds alone and loaded, and the slowdown ratio. The
competitors are plain Python loops, so they compete for cores without touching memory bandwidth.
Loaded times vary widely from run to run: ``--repeats R`` measures alone and loaded R times in turn
and reports the medians, with the loaded range.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

from common import busy_processes, data_parser, fit_in_scratch, write_report


def child(args: argparse.Namespace) -> None:
    """Fit one model once and print its phase timings as one JSON line."""
    from anomalib.models import Patchcore
    from lightning.pytorch import seed_everything

    from anomalib_reconpatch import ReConPatch
    from anomalib_reconpatch.reconpatch import lightning_model
    from anomalib_reconpatch.tools.compare import build_datamodule, load_datamodule_config
    from anomalib_reconpatch.tools.compare.callbacks import PhaseTimer

    if args.representation_threads:
        lightning_model.REPRESENTATION_THREADS = args.representation_threads
    seed_everything(0, workers=True)
    datamodule = build_datamodule(load_datamodule_config(args.data), seed=0)
    common = {"backbone": args.backbone, "layers": args.layers, "coreset_sampling_ratio": args.coreset_ratio}
    if args.child == "ReConPatch":
        model = ReConPatch(**common, num_steps=args.num_steps, visualizer=False)
    else:
        model = Patchcore(**common, visualizer=False)
    timer = PhaseTimer()
    fit_in_scratch(model, datamodule, callbacks=[timer])
    if args.child == "ReConPatch":
        phases = {
            "features": model.fit_timings["features_s"],
            "representation": model.fit_timings["representation_s"],
            "embedding + coreset": model.fit_timings["coreset_s"],
        }
    else:
        phases = {"features": timer.features_s, "coreset": timer.fit_s}
    print(json.dumps(phases))


def run_child(args: argparse.Namespace, model: str) -> dict[str, float]:
    """One fit of ``model`` in a fresh process; its phases in seconds."""
    command = [sys.executable, __file__, "--child", model, *sys.argv[1:]]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure(args: argparse.Namespace, competitors: int) -> dict[str, dict[str, float]]:
    """Both models' phases with ``competitors`` busy processes running beside them."""
    with busy_processes(competitors):
        return {model: run_child(args, model) for model in ("Patchcore", "ReConPatch")}


def main() -> None:
    """Measure alone and loaded, print and write the table."""
    parser = data_parser(__doc__)
    parser.add_argument("--coreset-ratio", type=float, default=0.01)
    parser.add_argument("--num-steps", type=int, help="ReConPatch's representation steps (default: the model's)")
    parser.add_argument("--competitors", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1, help="alone and loaded measurements, in turn")
    parser.add_argument(
        "--representation-threads", type=int, help="fix training's thread count (default: the model's choice)"
    )
    parser.add_argument("--out", type=Path, help="the Markdown report to write")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    runs = [(measure(args, 0), measure(args, args.competitors)) for _ in range(args.repeats)]
    lines = [
        f"# Fit phases alone and beside {args.competitors} busy processes: {args.data.stem}",
        "",
        f"`{shlex.join(['python', *sys.argv])}`",
        "",
        f"tf_efficientnet_lite0 unless set, coreset {args.coreset_ratio}, "
        f"ReConPatch num_steps {'null' if args.num_steps is None else args.num_steps}, "
        f"representation training on {args.representation_threads or 'the faster of all threads and one'} "
        "thread(s) (one: the next batch's labels on a second thread beside each step); "
        f"each fit in a fresh process; medians of {args.repeats} run(s), loaded range in brackets.",
        "",
        f"| model | phase | alone s | beside {args.competitors} s | slowdown |",
        "|---|---|---|---|---|",
    ]
    for model, phases in runs[0][0].items():
        for phase in phases:
            seconds = statistics.median(alone[model][phase] for alone, _ in runs)
            times = [loaded[model][phase] for _, loaded in runs]
            busy = statistics.median(times)
            spread = f" ({min(times):.1f} to {max(times):.1f})" if len(times) > 1 else ""
            lines.append(
                f"| {model} | {phase} | {seconds:.1f} | {busy:.1f}{spread} | {busy / max(seconds, 1e-9):.1f}x |"
            )
    write_report("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
