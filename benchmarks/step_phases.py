"""Where a representation step's time goes, on one thread and on two: the room for running its parts side by side.

    python benchmarks/step_phases.py --data configs/data/mpdd_metal_plate.yaml \
        --out docs/results/contention/step_phases.md

On the training patches of ``--data`` it runs ``--steps`` steps exactly as
``ReConPatch.train_representation`` does (the model's own batch draw, pseudo-labels, loss, optimizer
and EMA update) and times four parts of each: the draw, the target networks' pseudo-labels, the
online networks' forward with the loss (whose closed-form gradient it computes), and the backward
pass, optimizer step and EMA update. Only the labels and the online forward are independent of each
other, and the loss's second half needs both, so the table also gives the best step that two
barrier-free workers (one thread each, one part each) could make: the longer of the two parts plus
everything else. Run it alone: the times are the machine's.
"""

from __future__ import annotations

import copy
import shlex
import sys
import time
from pathlib import Path

import torch
from common import cache, data_parser, flat_patches, load_data, write_report
from torch import nn

from anomalib_reconpatch.reconpatch.similarity import pseudo_labels
from anomalib_reconpatch.reconpatch.torch_model import ema_update

PARTS = ("draw", "pseudo-labels", "online forward + loss", "backward + optimizer + EMA")


def time_parts(model: object, features: torch.Tensor, steps: int, warmup: int = 20) -> dict[str, float]:
    """Mean milliseconds of each part of a step over ``steps`` steps after ``warmup`` untimed ones."""
    online_f = model.model.representation
    online_g = nn.Linear(online_f.out_features, model.projection_dim)
    parameters = [*online_f.parameters(), *online_g.parameters()]
    target_f = copy.deepcopy(online_f).requires_grad_(False)
    target_g = copy.deepcopy(online_g).requires_grad_(False)
    optimizer, scheduler = model.configure_representation_optimizer(parameters, steps + warmup)
    totals = dict.fromkeys(PARTS, 0.0)
    for step in range(steps + warmup):
        marks = [time.perf_counter()]
        x = model.draw_batch(features, model.patches_per_step, target_f)
        marks.append(time.perf_counter())
        with torch.no_grad():
            weights = pseudo_labels(target_g(target_f(x)), model.k, model.alpha, model.sigma, model.sigma_unit)
        marks.append(time.perf_counter())
        loss = model.loss(online_g(online_f(x)), weights)
        loss.item()
        marks.append(time.perf_counter())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        ema_update(target_f, online_f, model.momentum)
        ema_update(target_g, online_g, model.momentum)
        marks.append(time.perf_counter())
        if step >= warmup:
            for part, start, end in zip(PARTS, marks[:-1], marks[1:], strict=True):
                totals[part] += end - start
    return {part: 1000 * total / steps for part, total in totals.items()}


def main() -> None:
    """Cache the training patches, time the parts on one thread and on two, print and write the table."""
    parser = data_parser(__doc__)
    parser.add_argument("--steps", type=int, default=200, help="steps timed on each thread count")
    parser.add_argument("--out", type=Path, help="the Markdown report to write")
    args = parser.parse_args()
    datamodule, model = load_data(args)
    features = flat_patches(cache(model, datamodule.train_dataloader(), test=False)["features"])
    all_threads = torch.get_num_threads()
    measured = {}
    with torch.enable_grad():
        for threads in sorted({1, all_threads}):
            torch.set_num_threads(threads)
            torch.manual_seed(0)
            measured[threads] = time_parts(copy.deepcopy(model), features, args.steps)
    torch.set_num_threads(all_threads)
    counts = sorted(measured)
    lines = [
        f"# Where a representation step's time goes: {args.data.stem}",
        "",
        f"`{shlex.join(['python', *sys.argv])}`",
        "",
        f"ms a step, mean of {args.steps} steps after 20 untimed ones, {model.patches_per_step} patches a step.",
        "",
        "| part | " + " | ".join(f"{count} thread(s)" for count in counts) + " |",
        "|---|" + "---|" * len(counts),
    ]
    lines += [f"| {part} | " + " | ".join(f"{measured[c][part]:.2f}" for c in counts) + " |" for part in PARTS]
    lines.append("| whole step | " + " | ".join(f"{sum(measured[c].values()):.2f}" for c in counts) + " |")
    one = measured[1]
    side_by_side = max(one[PARTS[1]], one[PARTS[2]]) + one[PARTS[0]] + one[PARTS[3]]
    lines += [
        "",
        f"Labels and online forward side by side on one thread each: at best {side_by_side:.2f} ms a step "
        f"(the longer of {one[PARTS[1]]:.2f} and {one[PARTS[2]]:.2f}, plus {one[PARTS[0]] + one[PARTS[3]]:.2f}), "
        f"against {sum(one.values()):.2f} on one thread"
        + (f" and {sum(measured[counts[-1]].values()):.2f} on {counts[-1]}." if len(counts) > 1 else "."),
    ]
    write_report("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
