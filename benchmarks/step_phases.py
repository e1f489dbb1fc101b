"""Where a representation step's time goes, on one thread and on two: the room for running its parts side by side.

    python benchmarks/step_phases.py --data configs/data/mpdd_metal_plate.yaml \
        --out docs/results/contention/step_phases.md

On the training patches of ``--data`` it runs ``--steps`` steps made of the parts that
``ReConPatch.train_representation`` runs and times each: the draw (``draw_batch``), the target
networks' pseudo-labels (``representation_labels``), the online networks' forward with the loss,
whose closed-form gradient it computes (``representation_loss``), and the backward pass, optimizer
step and EMA update (``representation_update``, ``representation_ema``). Only the labels and the
online forward of one step are independent of each other, and the loss's second half needs both, so
the table also gives the best step that two barrier-free workers (one thread each, one part each)
could make: the longer of the two parts plus everything else. The same steps with the loss's
gradient through autograd on its pairs, the reference that the closed form replaces, show what the
closed form saves. Run it alone: the times are the machine's.
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

from anomalib_reconpatch.reconpatch.loss import relaxed_contrastive_pairs

PARTS = ("draw", "pseudo-labels", "online forward + loss", "backward + optimizer + EMA")


def time_parts(model: object, features: torch.Tensor, steps: int, warmup: int = 20) -> dict[str, float]:
    """Mean milliseconds of each part of a step over ``steps`` steps after ``warmup`` untimed ones."""
    networks = model.representation_networks(steps + warmup)
    totals = dict.fromkeys(PARTS, 0.0)
    for step in range(steps + warmup):
        marks = [time.perf_counter()]
        x = model.draw_batch(features, model.patches_per_step, networks.target_f)
        marks.append(time.perf_counter())
        weights = model.representation_labels(networks, x)
        marks.append(time.perf_counter())
        loss = model.representation_loss(networks, x, weights)
        loss.item()
        marks.append(time.perf_counter())
        model.representation_update(networks, loss)
        model.representation_ema(networks)
        marks.append(time.perf_counter())
        if step >= warmup:
            for part, start, end in zip(PARTS, marks[:-1], marks[1:], strict=True):
                totals[part] += end - start
    return {part: 1000 * total / steps for part, total in totals.items()}


class AutogradLoss(nn.Module):
    """The relaxed contrastive loss through autograd on its pairs, the reference that the closed form replaces."""

    def __init__(self, margin: float) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The loss, with autograd's graph through every pair."""
        pull, push = relaxed_contrastive_pairs(z, weights.detach(), self.margin)
        return (pull + push).sum() / z.shape[0]


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
        for gradient in ("closed form", "autograd"):
            for threads in sorted({1, all_threads}):
                torch.set_num_threads(threads)
                torch.manual_seed(0)
                copied = copy.deepcopy(model)
                if gradient == "autograd":
                    copied.loss = AutogradLoss(model.loss.margin)
                measured[threads, gradient] = time_parts(copied, features, args.steps)
    torch.set_num_threads(all_threads)
    columns = list(measured)
    lines = [
        f"# Where a representation step's time goes: {args.data.stem}",
        "",
        f"`{shlex.join(['python', *sys.argv])}`",
        "",
        f"ms a step, mean of {args.steps} steps after 20 untimed ones, {model.patches_per_step} patches a step; "
        "the loss's gradient in closed form (the model's) and through autograd on its pairs (the reference).",
        "",
        "| part | " + " | ".join(f"{count} thread(s), {gradient}" for count, gradient in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    lines += [f"| {part} | " + " | ".join(f"{measured[c][part]:.2f}" for c in columns) + " |" for part in PARTS]
    lines.append("| whole step | " + " | ".join(f"{sum(measured[c].values()):.2f}" for c in columns) + " |")
    one = measured[1, "closed form"]
    side_by_side = max(one[PARTS[1]], one[PARTS[2]]) + one[PARTS[0]] + one[PARTS[3]]
    many = measured.get((all_threads, "closed form"))
    lines += [
        "",
        f"Labels and online forward side by side on one thread each: at best {side_by_side:.2f} ms a step "
        f"(the longer of {one[PARTS[1]]:.2f} and {one[PARTS[2]]:.2f}, plus {one[PARTS[0]] + one[PARTS[3]]:.2f}), "
        f"against {sum(one.values()):.2f} on one thread"
        + (f" and {sum(many.values()):.2f} on {all_threads}." if all_threads > 1 else "."),
    ]
    write_report("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
