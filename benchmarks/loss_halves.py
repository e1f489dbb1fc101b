"""Whether a third thread for half the loss's rows shortens a representation step on a busy CPU.

    python benchmarks/loss_halves.py --data configs/data/mpdd_metal_plate.yaml --competitors 4 \
        --out docs/results/contention/loss_halves_xeon.md

On a busy CPU the model runs a step as two one-thread tasks: the step itself and, beside it, the next
batch's pseudo-labels. Each task gets a fair share of the cores, so a third task, half of the loss's
rows, would take a larger share. ``BlockLoss`` computes the model's loss and gradient in two blocks of
rows, the second on a third thread whenever the step runs on one torch thread (``loss_terms``: each row's part up to
``H`` is its own; the blocks then add their products to ``S C = H C + H^T C``); on all threads it computes
every row at once. In one process, training runs ``--rounds`` times with the model's loss and with
``BlockLoss`` in turn, each time for ``--steps`` steps, on all threads in turn and as one-thread tasks
alone, and as one-thread tasks beside ``--competitors`` busy processes; the table gives each loss's
median ms a step and the median of the paired ratios, which the machine's drift during the run does
not move.
"""

from __future__ import annotations

import shlex
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from common import busy_processes, cache, data_parser, flat_patches, load_data, write_report
from torch import nn

from anomalib_reconpatch import ReConPatch
from anomalib_reconpatch.components.threads import single_threaded
from anomalib_reconpatch.reconpatch import lightning_model
from anomalib_reconpatch.reconpatch.loss import loss_terms
from anomalib_reconpatch.reconpatch.similarity import squared_distances


def block_products(h: torch.Tensor, centred: torch.Tensor, rows: slice) -> tuple[torch.Tensor, ...]:
    """A block's rows of ``H C`` and ``H 1``, and its shares of ``H^T C`` and ``H^T 1``."""
    return h @ centred, h.T @ centred[rows], h.sum(dim=1), h.sum(dim=0)


class _BlockLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: object, z: torch.Tensor, w: torch.Tensor, margin: float, pool: ThreadPoolExecutor | None
    ) -> torch.Tensor:
        n = z.shape[0]
        sq, centred = squared_distances(z), z - z.mean(dim=0, keepdim=True)
        halves = [slice(0, n // 2), slice(n // 2, n)]

        def block(rows: slice) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
            with torch.no_grad():
                terms, h = loss_terms(sq, w, rows, margin, with_grad=True)  # each block overwrites only its rows of sq
                return terms.sum(dim=1), block_products(h, centred, rows)

        if pool is not None and torch.get_num_threads() == 1:
            second = pool.submit(single_threaded, block, halves[1])
            parts = [block(halves[0]), second.result()]
        else:
            terms, h = loss_terms(sq, w, slice(0, n), margin, with_grad=True)
            losses = terms.sum(dim=1)
            parts = [(losses[rows], block_products(h[rows], centred, rows)) for rows in halves]
        s_ones = torch.cat([p[1][2] for p in parts]) + parts[0][1][3] + parts[1][1][3]
        s_c = torch.cat([p[1][0] for p in parts]) + parts[0][1][1] + parts[1][1][1]
        grad = 2.0 * (s_ones[:, None] * centred - s_c)
        ctx.save_for_backward(grad - grad.mean(dim=0, keepdim=True))
        return torch.cat([p[0] for p in parts]).sum() / n

    @staticmethod
    def backward(ctx: object, grad_loss: torch.Tensor) -> tuple:
        (grad,) = ctx.saved_tensors
        return grad_loss * grad, None, None, None


class BlockLoss(nn.Module):
    """The model's relaxed contrastive loss in two blocks of rows, the second on ``pool``'s thread on one thread."""

    def __init__(self, margin: float, pool: ThreadPoolExecutor) -> None:
        super().__init__()
        self.margin, self.pool = margin, pool

    def forward(self, z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The loss of ``z`` against ``weights``, with its gradient saved for the backward pass."""
        return _BlockLoss.apply(z, weights.detach(), self.margin, self.pool)


WAYS = ((None, "all threads in turn"), (1, "one-thread tasks"))
"""How training runs its steps (``REPRESENTATION_THREADS``; None: all of torch's); beside busy processes only
as one-thread tasks, which the model chooses there (all threads in turn collapse, ``docs/design/busy-cpu.md``)."""


def ms_a_step(model: object, features: torch.Tensor, steps: int) -> float:
    """Milliseconds a step of the model's representation training over ``steps`` steps."""
    start = time.perf_counter()
    with torch.enable_grad():
        model.train_representation(features)
    return 1000 * (time.perf_counter() - start) / steps


def main() -> None:
    """Time both losses in turn on all threads and as one-thread tasks, alone and loaded; write the table."""
    parser = data_parser(__doc__)
    parser.add_argument("--competitors", type=int, default=4)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    datamodule, model = load_data(args)
    features = flat_patches(cache(model, datamodule.train_dataloader(), test=False)["features"])
    rows = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="loss-half") as pool:
        for competitors, ways in ((0, WAYS), (args.competitors, WAYS[1:])):
            with busy_processes(competitors):
                for threads, way in ways:
                    lightning_model.REPRESENTATION_THREADS = threads or torch.get_num_threads()
                    times: dict[str, list[float]] = {"model": [], "blocks": []}
                    for round_ in range(args.rounds + 1):  # the first round warms up
                        for name in times:
                            trainee = ReConPatch(
                                backbone=args.backbone, layers=args.layers, pre_trained=False, num_steps=args.steps
                            )
                            if name == "blocks":
                                trainee.loss = BlockLoss(trainee.loss.margin, pool)
                            ms = ms_a_step(trainee, features, args.steps)
                            if round_:
                                times[name].append(ms)
                    ratio = statistics.median(b / m for b, m in zip(times["blocks"], times["model"], strict=True))
                    rows.append(
                        f"| {competitors} | {way} | {statistics.median(times['model']):.1f} | "
                        f"{statistics.median(times['blocks']):.1f} | {ratio:.3f} |"
                    )
                    print(rows[-1], flush=True)
    lines = [
        f"# Half the loss's rows on a third thread: {args.data.stem}",
        "",
        f"`{shlex.join(['python', *sys.argv])}`",
        "",
        f"ms a representation step, medians of {args.rounds} rounds of {args.steps} steps, the two losses in turn "
        "in one process; one-thread tasks: the step and the next labels beside it (the model), and with the "
        "blocks also the second half of the loss's rows on a third thread.",
        "",
        "| busy processes | training on | model's loss | two blocks | blocks / model, paired median |",
        "|---|---|---|---|---|",
        *rows,
    ]
    write_report("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
