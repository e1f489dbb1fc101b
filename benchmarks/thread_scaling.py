"""What one and two threads buy each fit loop, alone and beside busy processes: the floor of a busy-CPU slowdown.

    python benchmarks/thread_scaling.py --data configs/data/mpdd_metal_plate.yaml --competitors 4 \
        --out docs/results/contention/thread_scaling.md

On the training images and patches of ``--data`` it times four loops on one thread and on two, first
alone and then beside ``--competitors`` busy-looping Python processes: ReConPatch's representation
training (ms a step), this project's greedy k-center and anomalib's ``KCenterGreedy`` (ms a
selection, over ``--selections`` selections), and the backbone pass (ms a training batch).
Training runs twice: in a process of one thread, and with the next step's pseudo-labels on a second
thread beside the step's own work (one thread each, what the model does on a busy CPU); on two
threads both are the same all-thread step. So does our greedy k-center:
on one thread, and on two threads of one torch thread each that hold half the rows and meet once a
selection (``threads=1``, what the model does on a busy CPU). The backbone pass over one training
batch runs on all threads, and, in the last row's one-thread columns, as one-thread tasks on two
halves of the batch (what the model's fit does where torch has two threads). A loop whose steps are many
small products gains from two threads alone but, under load, runs best on one (``ThreadChooser``
picks it), where it gets a fair share of a core; so its slowdown against its best quiet time cannot
fall below its two-thread speedup times the one-thread slowdown. A loop of a few large products,
like ``KCenterGreedy``'s, keeps gaining from two threads under load. For the two training loops on one
thread the report also gives the CPU time a step of the thread that runs the step itself, alone and
loaded, and the share of a core it got: the loaded step is that CPU time over that share.
Each measurement runs in a fresh process, which inherits the environment:
``OMP_WAIT_POLICY=PASSIVE python benchmarks/thread_scaling.py ...`` measures GNU OpenMP's sleeping
barriers instead of its spinning ones, and the report's command line shows it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import busy_processes, data_parser, write_report

LOOPS = (
    "representation training",
    "representation training, next labels beside",
    "greedy k-center (ours)",
    "greedy k-center (ours), two shards",
    "KCenterGreedy (anomalib)",
    "backbone pass",
    "backbone pass, a part of the batch per thread",
)


def child(args: argparse.Namespace) -> None:
    """Time one loop on ``--threads`` threads; print ms per step (and, for training, its thread's CPU ms) as JSON."""
    import torch
    from anomalib.models.components import KCenterGreedy
    from common import load_data

    from anomalib_reconpatch.components import coreset
    from anomalib_reconpatch.components.threads import ThreadChooser, split_over_threads
    from anomalib_reconpatch.reconpatch import lightning_model

    class Fixed(ThreadChooser):
        """A chooser that never probes: every step on all of torch's threads."""

        def __init__(self, all_threads: int, start: int | None = None) -> None:
            del start
            super().__init__(all_threads, period=sys.maxsize, start=all_threads)

    coreset.ThreadChooser = Fixed
    features = torch.load(args.features)
    # the model computes the next step's labels, selects on a second shard or passes half the batch through
    # the backbone on a second thread only when torch has two threads
    beside = (LOOPS[1], LOOPS[3], LOOPS[6])
    torch.set_num_threads(max(args.threads, 2) if args.child in beside else args.threads)
    torch.manual_seed(0)
    if args.child in LOOPS[5:]:
        _, model = load_data(args)
        images = torch.load(args.features.with_name("images.pt"))
        backbone = model.model.patch_features
        split = args.child == LOOPS[6] and args.threads == 1
        passes = []
        with torch.no_grad():
            for _ in range(args.passes + 1):
                start = time.perf_counter()
                split_over_threads(backbone, images) if split else backbone(images)
                passes.append(time.perf_counter() - start)
        per_step = statistics.median(passes[1:])  # after a warm-up pass
    elif args.child in LOOPS[:2]:
        lightning_model.REPRESENTATION_THREADS = args.threads
        _, model = load_data(args, num_steps=args.steps)
        start, cpu_start = time.perf_counter(), time.thread_time()
        with torch.enable_grad():
            model.train_representation(features)
        per_step = (time.perf_counter() - start) / args.steps
        step_cpu = (time.thread_time() - cpu_start) / args.steps
    elif args.child in LOOPS[2:4]:
        if args.child == LOOPS[3] and len(features) < coreset.SHARD_MIN_ROWS:
            raise SystemExit(f"{len(features)} patches: the model would not split fewer than {coreset.SHARD_MIN_ROWS}")
        start = time.perf_counter()
        coreset.greedy_k_center(features, args.selections, threads=1 if args.child == LOOPS[3] else None)
        per_step = (time.perf_counter() - start) / args.selections
    else:
        sampler = KCenterGreedy(features, sampling_ratio=args.selections / len(features))
        start = time.perf_counter()
        sampler.select_coreset_idxs()
        per_step = (time.perf_counter() - start) / args.selections
    print(json.dumps({"ms": 1000 * per_step, "cpu_ms": 1000 * step_cpu if args.child in LOOPS[:2] else None}))


def run_child(args: argparse.Namespace, loop: str, threads: int) -> dict[str, float | None]:
    """Milliseconds a step of ``loop`` on ``threads`` threads (``ms``), in a fresh process.

    For training also the CPU milliseconds a step of the thread that runs the step itself (``cpu_ms``).
    """
    command = [sys.executable, __file__, "--child", loop, "--threads", str(threads), *sys.argv[1:]]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure(args: argparse.Namespace, competitors: int) -> dict[tuple[str, int], dict[str, float | None]]:
    """Every loop on one and on two threads, with ``competitors`` busy processes beside them."""
    with busy_processes(competitors):
        return {(loop, threads): run_child(args, loop, threads) for loop in LOOPS for threads in (1, 2)}


def main() -> None:
    """Cache the patches, measure alone and loaded, print and write the table."""
    parser = data_parser(__doc__)
    parser.add_argument("--competitors", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100, help="representation steps timed")
    parser.add_argument("--selections", type=int, default=200, help="coreset selections timed")
    parser.add_argument("--passes", type=int, default=5, help="backbone passes over one training batch timed")
    parser.add_argument("--features", type=Path, default=Path("results/thread_scaling/features.pt"))
    parser.add_argument("--out", type=Path, help="the Markdown report to write")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    import torch
    from common import cache, flat_patches, load_data

    datamodule, model = load_data(args)
    args.features.parent.mkdir(parents=True, exist_ok=True)
    torch.save(flat_patches(cache(model, datamodule.train_dataloader(), test=False)["features"]), args.features)
    torch.manual_seed(0)
    # a plain tensor: torch.load reads no torchvision subclass
    images = model.pre_processor.transform(next(iter(datamodule.train_dataloader())).image).as_subclass(torch.Tensor)
    torch.save(images, args.features.with_name("images.pt"))
    alone, loaded = measure(args, 0), measure(args, args.competitors)
    policy = f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} " if "OMP_WAIT_POLICY" in os.environ else ""
    lines = [
        f"# One and two threads, alone and beside {args.competitors} busy processes: {args.data.stem}",
        "",
        f"`{policy}{shlex.join(['python', *sys.argv])}`",
        "",
        f"ms a step (training, {args.steps} steps), a selection ({args.selections} selections) or a backbone "
        f"pass over one training batch of {len(images)} images (median of {args.passes}, after one more); "
        "each in a fresh process. Slowdown: the loaded time on the better count against the quiet time on "
        "the better count.",
        "",
        "| loop | alone, 1 | alone, 2 | two-thread speedup | loaded, 1 | loaded, 2 | slowdown |",
        "|---|---|---|---|---|---|---|",
    ]
    for loop in LOOPS:
        one, two = alone[loop, 1]["ms"], alone[loop, 2]["ms"]
        busy_one, busy_two = loaded[loop, 1]["ms"], loaded[loop, 2]["ms"]
        lines.append(
            f"| {loop} | {one:.1f} | {two:.1f} | {one / two:.2f}x | {busy_one:.1f} | {busy_two:.1f} | "
            f"{min(busy_one, busy_two) / min(one, two):.1f}x |"
        )
    lines += [
        "",
        "Training on one thread (the second row with the next labels on a second thread beside it): the CPU "
        "time a step of the thread that runs the step itself, and the share of a core it got (CPU time over "
        "wall time).",
        "",
        "| loop | CPU ms alone | share alone | CPU ms loaded | share loaded | CPU time loaded / alone |",
        "|---|---|---|---|---|---|",
    ]
    for loop in LOOPS[:2]:
        quiet, busy = alone[loop, 1], loaded[loop, 1]
        lines.append(
            f"| {loop} | {quiet['cpu_ms']:.1f} | {quiet['cpu_ms'] / quiet['ms']:.2f} | {busy['cpu_ms']:.1f} | "
            f"{busy['cpu_ms'] / busy['ms']:.2f} | {busy['cpu_ms'] / quiet['cpu_ms']:.2f}x |"
        )
    write_report("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
