"""Greedy k-center coreset selection, exact and fast.

Same selections as anomalib's :class:`KCenterGreedy` (start point, then repeatedly the point
farthest from all chosen centres), but points are grouped into small balls first, and a ball
whose lower bound ``||c - centre_b|| - radius_b`` already exceeds its largest current distance
cannot change when a new centre ``c`` is added (triangle inequality), so it is skipped. On
clustered patch features most balls are skipped once a few hundred centres are chosen, which turns
the memory-bound full scan of every step into a scan of a few balls. Inside those, the same bound
per point (its own distance to the ball's centre) leaves only a few rows to read. How much is
skipped depends on how clustered the patches are; the measurements, on clustered and on diffuse
data, are in ``docs/design/coreset-pruning.md`` (``benchmarks/coreset.py`` prints the time and the
coverage radius on any machine).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from .threads import TASKS, ThreadChooser, torch_threads

logger = logging.getLogger(__name__)

PROGRESS_EVERY = 64  # selections between progress reports: a report costs far less than 64 selections
SHARD_MIN_ROWS = 8192  # fewer rows are selected in well under a second: not worth a second thread
POLL_S = 0.05  # how often the calling thread forwards the shards' progress while they select
HANDOVER_EVERY = 256  # picks between two checks of whether the shards should hand over to one loop
HANDOVER_WEAK = 0.1  # share of a window's steps that scan every row, below which the shards hand over
HANDOVER_LEFT = 1024  # picks that must be left for a handover to pay for the one loop's set-up


def _balls(features: torch.Tensor, ball_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Group rows into balls of at most ``ball_size`` nearby points.

    Two k-means passes with ``N // ball_size`` centres; clusters larger than ``ball_size`` are split.
    Their cost grows with the square of ``N``, so callers with many columns pass the rows' projection on
    their principal directions (:class:`ProjectedBound`): nearly the same balls for a fraction of the
    products. Any grouping keeps the selection exact; only how much the balls prune depends on it.

    Args:
        features (torch.Tensor): ``N x D`` rows, or their coordinates in any space where nearby rows stay near.
        ball_size (int): Largest number of rows in one ball.
        generator (torch.Generator): Draws the first centres.

    Returns:
        tuple[torch.Tensor, torch.Tensor]: A ``balls x ball_size`` row index (padding slots hold row 0) and the
        mask of its valid slots.
    """
    n = features.shape[0]
    n_clusters = max(1, n // ball_size)
    centres = features[torch.randperm(n, generator=generator)[:n_clusters]]
    for _ in range(2):
        # nearest centre by ||c||^2 - 2 x.c: the row's own norm is the same for every centre
        centre_sq = centres.pow(2).sum(1).expand(8192, -1)
        assign = torch.cat(
            [
                torch.addmm(centre_sq[: len(chunk)], chunk, centres.T, alpha=-2.0).argmin(1)
                for chunk in features.split(8192)
            ]
        )
        sums = torch.zeros_like(centres).index_add_(0, assign, features)
        counts = torch.bincount(assign, minlength=n_clusters).clamp_min(1)[:, None]
        centres = sums / counts
    order = torch.argsort(assign, stable=True)
    counts = torch.bincount(assign, minlength=n_clusters).tolist()
    rows, start = [], 0
    for count in counts:
        members = order[start : start + count]
        start += count
        rows.extend(members[i : i + ball_size] for i in range(0, count, ball_size))
    index = torch.zeros(len(rows), ball_size, dtype=torch.long)
    valid = torch.zeros(len(rows), ball_size, dtype=torch.bool)
    for b, members in enumerate(rows):
        index[b, : len(members)] = members
        valid[b, : len(members)] = True
    return index, valid


PROJECTED_DIMS = 48  # principal directions of the projected lower bound; measured in docs/design/coreset-pruning.md
ROUNDING = 1e-4  # relative slack of the bound's terms, some 1,000 float32 roundings
PCA_SAMPLE = 16384  # rows whose covariance gives the directions: any orthonormal basis keeps the bound exact


class ProjectedBound:
    """A cheap lower bound on distances: a projection on a few principal directions plus the residual's length.

    With ``V`` orthonormal (``D x d``), ``y = (x - m) V`` and ``r = ||x - m - y V^T||``, Pythagoras gives
    ``||x - c||^2 = ||y_x - y_c||^2 + ||res_x - res_c||^2 >= ||y_x - y_c||^2 + (r_x - r_c)^2``. Reading
    ``d`` columns instead of ``D`` per row, a step of the full scan finds the few rows whose distance to
    the new centre may be below their current one; only those rows are read in full. It holds for any
    orthonormal ``V``: principal directions only make it tight, so a sample of rows is enough to find them.

    Args:
        features (torch.Tensor): ``N x D`` rows, ``D > 2 * dims``.
        dims (int): ``d``, the number of directions.
        generator (torch.Generator): Draws the sample of rows for the covariance.
    """

    def __init__(self, features: torch.Tensor, dims: int, generator: torch.Generator) -> None:
        sample = features[torch.randperm(len(features), generator=generator)[:PCA_SAMPLE]].double()
        self.mean = sample.mean(0)
        centred = sample - self.mean
        basis = torch.linalg.eigh(centred.T @ centred).eigenvectors[:, -dims:]
        self.basis = basis.to(features.dtype)
        projected, residual, norms = zip(*(self.project(chunk) for chunk in features.split(65536)), strict=True)
        self.projected = torch.cat(projected).contiguous()
        self.residual = torch.cat(residual)
        self.sq_norms = self.projected.pow(2).sum(1)
        self.residual_slack = ROUNDING * torch.cat(norms)

    def project(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``y``, ``r`` and ``||x - m||`` of some rows (or of one row), from one centring."""
        centred = rows - self.mean.to(rows.dtype)
        y = centred @ self.basis
        return y, (centred - y @ self.basis.T).norm(dim=-1), centred.norm(dim=-1)

    def below(self, centre: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
        """Indices of the rows whose lower bound to ``centre`` is not above ``bound`` (squared distances).

        Each term is loosened by far more than float32 rounding can move it (``ROUNDING`` of the sizes
        involved), so no row that the exact distance would update is missed.
        """
        y, r, norm = self.project(centre)
        y_sq = y @ y
        lower = torch.addmv(self.sq_norms + y_sq, self.projected, y, alpha=-2.0)
        lower.sub_(ROUNDING * (self.sq_norms + y_sq)).clamp_min_(0.0)
        slack = self.residual_slack + ROUNDING * norm
        lower.add_(((self.residual - r).abs_() - slack).clamp_min_(0.0).square_())
        return (lower <= bound).nonzero().squeeze(1)


class Agreement(Protocol):
    """How the processes that each hold a shard of the rows agree on a selection (see ``distributed``)."""

    def total(self, values: torch.Tensor) -> torch.Tensor:
        """The sum of ``values`` over every shard."""
        ...

    def pick(self, distance: torch.Tensor, row: torch.Tensor) -> tuple[bool, torch.Tensor]:
        """The row with the largest ``distance`` over every shard: whether it is this shard's, and the row."""
        ...

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Every shard's ``rows``, concatenated in shard order."""
        ...


class OneShard:
    """The :class:`Agreement` of a process that holds every row."""

    def total(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` itself: there is no other shard."""
        return values

    def pick(self, distance: torch.Tensor, row: torch.Tensor) -> tuple[bool, torch.Tensor]:
        """This shard's candidate, which is the farthest of all."""
        del distance
        return True, row

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` themselves."""
        return rows


class ThreadMeeting:
    """Where the threads that each hold a shard of one process's rows meet: one barrier a call.

    Each call's values go to one of two sets of slots, alternately: a thread that leaves a meeting
    first can only write the other set before every thread has read this one, since the next
    meeting waits for them all.

    Args:
        shards (int): The number of threads.
    """

    def __init__(self, shards: int) -> None:
        self.barrier = threading.Barrier(shards)
        self.slots: list[list[object]] = [[None] * shards, [None] * shards]
        self.winners: list[int] = []
        """The shard of every pick, in order (recorded by shard 0)."""

    def exchange(self, rank: int, call: int, value: object) -> list[object]:
        """Every shard's ``value`` for this call, in shard order, once all have given theirs."""
        slots = self.slots[call % 2]
        slots[rank] = value
        self.barrier.wait()
        return list(slots)


class ThreadAgreement:
    """The :class:`Agreement` of one of several threads of a process, each holding a shard of the rows.

    Ties go to the lowest shard, as across processes.

    Args:
        meeting (ThreadMeeting): Where the shards' threads meet.
        rank (int): This thread's shard.
    """

    def __init__(self, meeting: ThreadMeeting, rank: int) -> None:
        self.meeting = meeting
        self.rank = rank
        self.calls = 0

    def _exchange(self, value: object) -> list:
        self.calls += 1
        return self.meeting.exchange(self.rank, self.calls, value)

    def total(self, values: torch.Tensor) -> torch.Tensor:
        """The sum of ``values`` over every shard."""
        return torch.stack(self._exchange(values)).sum(0)

    def pick(self, distance: torch.Tensor, row: torch.Tensor) -> tuple[bool, torch.Tensor]:
        """The row with the largest ``distance`` over every shard: whether it is this shard's, and the row."""
        proposals = self._exchange((float(distance), row))
        winner = max(range(len(proposals)), key=lambda rank: (proposals[rank][0], -rank))
        if self.rank == 0:
            self.meeting.winners.append(winner)
        return winner == self.rank, proposals[winner][1]

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Every shard's ``rows``, concatenated in shard order."""
        return torch.cat(self._exchange(rows))


@dataclass
class Handover:
    """A selection stopped between two picks, for another loop to go on from exactly there.

    Attributes:
        done (int): Rows selected so far.
        centre (torch.Tensor): The last selected row; its distances to the rows are not applied yet.
        mind (torch.Tensor): Every row's squared distance to its nearest selected row but the last (0 for
            selected rows), in row order.
    """

    done: int
    centre: torch.Tensor
    mind: torch.Tensor


def on_thread_shards(
    features: torch.Tensor,
    n_select: int,
    shards: int = TASKS,
    ball_size: int = 256,
    generator: torch.Generator | None = None,
    progress: Callable[[int], None] | None = None,
    hand_over: bool = False,
) -> tuple[torch.Tensor, Handover | None]:
    """:func:`greedy_k_center` on ``shards`` threads, each holding a part of the rows on one torch thread.

    The threads meet once a pick, sleeping until the last one arrives, where torch's own threads would
    meet after each of the pick's dozen operations (spinning, which a busy CPU makes costly; see
    ``docs/design/busy-cpu.md``). The selection is the one of all rows in one thread (up to ties and the
    float rounding of equal distances), in the same order. The calling thread forwards ``progress``; if
    it is interrupted (or a shard fails) every shard stops at its next meeting, and the exception is
    raised here. Torch's thread count is restored.

    Args:
        features (torch.Tensor): ``N x D`` rows on the CPU, at least one per shard.
        n_select (int): Number of rows to select, in ``(0, N]``.
        shards (int): Number of threads and parts. Defaults to ``TASKS``.
        ball_size (int): Largest number of rows in one ball.
        generator (torch.Generator | None): Seeds each part's ball clustering (its seed plus the part's
            index); None seeds with 0.
        progress (Callable[[int], None] | None): Called in the calling thread with the number of rows
            selected so far, now and then and once at the end.
        hand_over (bool): Stop once the balls prune most picks (:func:`greedy_k_center`'s ``hand_over``),
            where a pick is a few small operations and one loop beats the shards' meetings. Defaults to
            ``False``.

    Returns:
        tuple[torch.Tensor, Handover | None]: The selected row indices (int64), in the order they were
        chosen, and where the shards stopped (None when they selected all ``n_select`` rows).
    """
    parts = features.tensor_split(shards)
    offsets = [0, *torch.tensor([len(part) for part in parts]).cumsum(0).tolist()[:-1]]
    seed = generator.initial_seed() if generator is not None else 0
    meeting = ThreadMeeting(shards)
    selected: list[torch.Tensor | None] = [None] * shards
    errors: list[BaseException] = []
    reported = [0]
    stopped: list[list[Handover]] = [[] for _ in range(shards)]

    def select(rank: int) -> None:
        try:
            torch.set_num_threads(1)
            with torch.no_grad():
                selected[rank] = greedy_k_center(
                    parts[rank],
                    n_select,
                    ball_size=ball_size,
                    generator=torch.Generator().manual_seed(seed + rank),
                    progress=(lambda count: reported.__setitem__(0, count)) if rank == 0 else None,
                    agreement=ThreadAgreement(meeting, rank),
                    hand_over=stopped[rank] if hand_over else None,
                )
        except BaseException as error:  # raised in the calling thread below
            errors.append(error)
            meeting.barrier.abort()

    workers = [
        threading.Thread(target=select, args=(rank,), name=f"reconpatch-coreset-{rank}") for rank in range(shards)
    ]
    forwarded, interrupted = 0, True
    with torch_threads():
        try:
            for worker in workers:
                worker.start()
            for worker in workers:
                while worker.is_alive():
                    worker.join(POLL_S)
                    if progress is not None and reported[0] != forwarded:
                        forwarded = reported[0]
                        progress(forwarded)
            interrupted = False
        finally:
            meeting.barrier.abort()  # a no-op once every shard is done; otherwise each stops at its next meeting
            for worker in workers:
                if worker.ident is not None:
                    worker.join()
            for error in errors if interrupted else []:  # the caller's exception goes on; a shard's is logged
                if not isinstance(error, threading.BrokenBarrierError):
                    logger.error("coreset shard failed while the selection was stopped: %r", error)
    if errors:
        raise next((error for error in errors if not isinstance(error, threading.BrokenBarrierError)), errors[0])
    rows = [iter((part + offset).tolist()) for part, offset in zip(selected, offsets, strict=True)]
    order = torch.tensor([next(rows[winner]) for winner in meeting.winners], dtype=torch.long)
    if progress is not None and forwarded != len(order):
        progress(len(order))
    if not stopped[0]:
        return order, None
    # every shard stopped after the same pick (their check sums the same counts), the agreed centre in hand
    mind = torch.cat([shard[0].mind for shard in stopped])
    return order, Handover(stopped[0][0].done, stopped[0][0].centre, mind)


def farthest_from_mean(features: torch.Tensor, agreement: Agreement) -> tuple[int, bool, torch.Tensor]:
    """The row farthest from the mean of all rows: the start of the greedy selection.

    It is the same row whatever the order of the rows and however they are split into shards, so a
    distributed fit starts where one process would.

    Returns:
        tuple[int, bool, torch.Tensor]: This shard's candidate index, whether it is the chosen row, and the row.
    """
    count = torch.tensor([len(features)], dtype=torch.float64)
    total = agreement.total(torch.cat([features.sum(0, dtype=torch.float64), count]))
    mean = (total[:-1] / total[-1]).to(features.dtype)
    far = torch.cat([(chunk - mean).pow(2).sum(1) for chunk in features.split(65536)])
    index = int(far.argmax())
    mine, row = agreement.pick(far[index], features[index])
    return index, mine, row


def greedy_k_center(
    features: torch.Tensor,
    n_select: int,
    start: int | None = None,
    ball_size: int = 256,
    generator: torch.Generator | None = None,
    progress: Callable[[int], None] | None = None,
    agreement: Agreement | None = None,
    on_pick: Callable[[torch.Tensor], None] | None = None,
    threads: int | None = None,
    resume: Handover | None = None,
    hand_over: list[Handover] | None = None,
) -> torch.Tensor:
    """Select ``n_select`` rows by greedy k-center, starting at row ``start``.

    Exact: every step picks the row whose distance to the nearest chosen row is largest, as a
    brute-force scan would (up to ties and float rounding of equal distances). Balls of nearby rows
    and the triangle inequality let most steps skip most rows (see ``docs/design/coreset-pruning.md``).
    The loop logs how many balls it scans per step every 10 seconds.

    With an ``agreement`` across processes, each process passes its shard of the rows: every step,
    each proposes its farthest row and all take the farthest proposal, so the selection is the one a
    single process would make on all rows, and no process ever holds them all.

    Args:
        features (torch.Tensor): ``N x D`` rows (this process's shard); non-float rows become float32.
        n_select (int): Number of rows to select over all shards, in ``(0, N]`` (``N`` of all shards).
        start (int | None): Index of the first selected row; None starts at the row farthest from the
            mean (:func:`farthest_from_mean`), the only start that shards can agree on. Defaults to ``None``.
        ball_size (int): Largest number of rows in one ball.
        generator (torch.Generator | None): Random generator of the ball clustering; None uses one
            seeded with 0.
        progress (Callable[[int], None] | None): Called with the number of rows selected so far, every
            ``PROGRESS_EVERY`` selections and once at the end.
        agreement (Agreement | None): How shards agree on each pick; None for one process holding every row.
        on_pick (Callable[[torch.Tensor], None] | None): Called with every selected row, this shard's or
            another's, in order: how a shard collects the whole coreset. Defaults to ``None``.
        threads (int | None): The thread count that a phase just before found faster (a ``ThreadChooser``'s
            ``verdict``): the set-up's products run on it and the loop starts on it. None sets up on all of
            torch's threads and probes from the first step. Where torch has ``TASKS`` (2) threads, with no
            ``agreement`` across processes, no ``start``, no ``on_pick`` and at least ``SHARD_MIN_ROWS`` rows
            on the CPU, a count selects on two threads of one torch thread each, each holding half the rows
            (:func:`on_thread_shards`): 1 (a busy CPU) to the end, without probing; ``TASKS`` (a quiet one)
            while most steps scan every row, then on all threads from where the shards stopped (``resume``).
            Defaults to ``None``.
        resume (Handover | None): Go on from a selection stopped there (its rows are not selected again, nor
            returned): no start, no set-up's start point. Defaults to ``None``.
        hand_over (list[Handover] | None): Given, every ``HANDOVER_EVERY`` steps the shards sum how many of
            the last ones scanned every row; below ``HANDOVER_WEAK`` of them, with at least ``HANDOVER_LEFT``
            picks left, the loop appends where it stopped here and returns. Defaults to ``None``.

    Returns:
        torch.Tensor: The selected row indices of this shard (int64), in the order they were chosen; with
        one process, all ``n_select`` of them.

    Raises:
        ValueError: If ``n_select`` is not in ``(0, N]``, or ``start`` is given with an ``agreement``.

    Example:
        The row farthest from the start is chosen next:

        >>> import torch
        >>> features = torch.tensor([[0.0], [1.0], [10.0]])
        >>> greedy_k_center(features, n_select=2, start=0)
        tensor([0, 2])
    """
    if (
        threads in (1, TASKS)
        and (agreement is None or isinstance(agreement, OneShard))
        and start is None
        and on_pick is None
        and resume is None
        and torch.get_num_threads() == TASKS
        and len(features) >= SHARD_MIN_ROWS
        and features.device.type == "cpu"
    ):
        order, stopped = on_thread_shards(
            features, n_select, ball_size=ball_size, generator=generator, progress=progress, hand_over=threads == TASKS
        )
        if stopped is None:
            return order
        message = "coreset: the balls prune most steps from pick %d of %d on: one loop goes on"
        logger.info(message, stopped.done, n_select)
        rest = greedy_k_center(
            features,
            n_select,
            ball_size=ball_size,
            generator=generator,
            progress=progress,
            threads=threads,
            resume=stopped,
        )
        return torch.cat([order, rest])
    agreement = agreement or OneShard()
    n = int(agreement.total(torch.tensor([features.shape[0]]))[0])
    if not 0 < n_select <= n:
        msg = f"Cannot select {n_select} coreset points from {n} patch features: choose a coreset ratio in (0, 1]."
        raise ValueError(msg)
    if start is not None and not isinstance(agreement, OneShard):
        msg = "Shards cannot agree on a start index: pass start=None to start at the row farthest from the mean."
        raise ValueError(msg)
    if start is not None and resume is not None:
        msg = "A resumed selection has its start already: pass start=None."
        raise ValueError(msg)
    generator = generator or torch.Generator().manual_seed(0)
    # one thread when a busy CPU makes barriers costly: for the set-up's products as for the loop's steps
    chooser = ThreadChooser(torch.get_num_threads(), start=threads)
    with torch_threads():
        if threads is not None:
            torch.set_num_threads(threads)
        features = features.contiguous() if features.is_floating_point() else features.float()
        if resume is not None:
            mine, centre = False, resume.centre.to(features.dtype)
        elif start is None:
            start, mine, centre = farthest_from_mean(features, agreement)
        else:
            mine, centre = True, features[start]
        bound = ProjectedBound(features, PROJECTED_DIMS, generator) if features.shape[1] > 2 * PROJECTED_DIMS else None
        index, valid = _balls(features if bound is None else bound.projected, ball_size, generator)
        n_balls = len(index)
        points = features[index]  # balls x ball_size x D (padding repeats row 0, masked out below)
        flat = points.reshape(-1, points.shape[-1])
        row_sq_norms = features.pow(2).sum(1)
        sq_norms = row_sq_norms[index].reshape(-1)
        centres = (points * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
        point_radius = torch.where(valid, (points - centres[:, None]).norm(dim=-1), 0.0)
        radius = point_radius.amax(1)
        slack = 1e-4 * radius.max().clamp_min(1e-6)  # guards the bound against float rounding
        # Squared distances to the nearest chosen centre; padding slots sit at -inf and never win.
        mind = torch.where(valid, math.inf, -math.inf).to(features.dtype)
        if resume is not None:
            mind[valid] = resume.mind[index[valid]].to(features.dtype)
        ball_max = mind.amax(1)
        slot_of_row = torch.empty(features.shape[0], dtype=torch.long)
        slot_of_row[index[valid]] = valid.reshape(-1).nonzero().squeeze(1)
        flat_mind = mind.view(-1)
        # the same distances in row order, for the projected bound: kept beside the ball layout, since
        # gathering them from it would read every row's slot at every step
        row_mind = None
        if bound is not None:
            row_mind = torch.full((features.shape[0],), math.inf, dtype=features.dtype)
            if resume is not None:
                row_mind.copy_(resume.mind)
        flat_index = index.view(-1)
        selected = [start] if mine else []
        if on_pick is not None and resume is None:
            on_pick(centre)
        tick, scanned, full_scans = time.monotonic(), 0, 0
        first = 1 if resume is None else resume.done
        for step in range(first, n_select):
            count = chooser.threads(step - first)  # its windows count from the loop's first step
            if count != torch.get_num_threads():
                torch.set_num_threads(count)
            step_start, cpu_start = time.perf_counter(), time.thread_time()
            to_centre = (centres - centre).norm(dim=1)
            active = (to_centre - radius - slack < ball_max.clamp_min(0).sqrt()).nonzero().squeeze(1)
            scanned += len(active)
            centre_sq = centre @ centre
            if len(active) > n_balls // 4:  # weak pruning (early steps, few centres, diffuse data)
                full_scans += 1
                if bound is not None:
                    # the projected bound reads d of D columns of every row, and in full only the rows it
                    # cannot rule out
                    rows = bound.below(centre, row_mind)
                    dist = (row_sq_norms[rows] + centre_sq - 2.0 * (features[rows] @ centre)).clamp_min_(0.0)
                    row_mind[rows] = dist = torch.minimum(row_mind[rows], dist)
                    flat_mind[slot_of_row[rows]] = dist
                else:  # few columns: one contiguous matvec over the unpadded rows (balls are a third padding
                    # on diffuse data), then gathered into ball layout
                    dist = torch.addmv(row_sq_norms + centre_sq, features, centre, alpha=-2.0).clamp_min_(0.0)
                    torch.minimum(mind, dist[index], out=mind)
                ball_max = mind.amax(1)
            else:
                # Per point, ||x - c|| >= ||c - centre_b|| - ||x - centre_b||: only points whose bound is below
                # their current distance can move, and only their D-dimensional rows are read.
                lower = (to_centre[active, None] - point_radius[active] - slack).clamp_min_(0.0)
                block = mind[active]
                rows = (active[:, None] * ball_size + torch.arange(ball_size))[lower.square_() < block]
                dist = (sq_norms[rows] + centre_sq - 2.0 * (flat[rows] @ centre)).clamp_min_(0.0)
                flat_mind[rows] = dist = torch.minimum(flat_mind[rows], dist)
                if row_mind is not None:
                    row_mind[flat_index[rows]] = dist
                ball_max[active] = mind[active].amax(1)
            ball = int(ball_max.argmax())
            slot = int(mind[ball].argmax())
            chosen = int(index[ball, slot])
            mine, centre = agreement.pick(mind[ball, slot], features[chosen])
            if mine:
                selected.append(chosen)
                mind[ball, slot] = 0.0
                if row_mind is not None:
                    row_mind[chosen] = 0.0
                ball_max[ball] = mind[ball].amax()
            if on_pick is not None:
                on_pick(centre)
            chooser.record(step - first, time.perf_counter() - step_start, time.thread_time() - cpu_start)
            if progress is not None and (step + 1) % PROGRESS_EVERY == 0:
                progress(step + 1)
            if time.monotonic() - tick > 10:
                message = "coreset: %d/%d selected, %.1f of %d balls scanned per step"
                logger.info(message, step, n_select, scanned / (step + 1 - first), n_balls)
                tick = time.monotonic()
            if hand_over is not None and (step + 1) % HANDOVER_EVERY == 0:
                # the same sums on every shard, so all stop after the same pick
                window_scans, shards = agreement.total(torch.tensor([full_scans, 1.0], dtype=torch.float64)).tolist()
                full_scans = 0
                logger.debug(
                    "coreset: %d of the last %d picks scanned every row", window_scans, HANDOVER_EVERY * shards
                )
                if window_scans < HANDOVER_WEAK * HANDOVER_EVERY * shards and n_select - step - 1 >= HANDOVER_LEFT:
                    if row_mind is None:
                        row_mind = torch.empty(features.shape[0], dtype=features.dtype)
                        row_mind[index[valid]] = mind[valid]
                    hand_over.append(Handover(step + 1, centre, row_mind))
                    return torch.tensor(selected, dtype=torch.long)
    if progress is not None:
        progress(n_select)
    return torch.tensor(selected, dtype=torch.long)


class FastKCenterGreedy:
    """Drop-in for anomalib's ``KCenterGreedy``: same constructor and ``sample_coreset``, exact and faster.

    The selection is :func:`greedy_k_center`, which skips the distance updates that the triangle
    inequality proves useless. Unlike anomalib's, it runs on the features themselves (no random
    projection): the greedy radius is then measured in the very metric the nearest-neighbour scores
    use. See ``docs/design/coreset-pruning.md``. It selects on the CPU whatever the features' device:
    each pick is a decision in Python that a GPU would wait on, and the balls, bounds and thread halves
    are built for the CPU's caches; the chosen rows come back on the features' device.

    Args:
        embedding (torch.Tensor): ``N x D`` patch features, on any device.
        sampling_ratio (float): Fraction of the rows to keep; the coreset has ``int(N * sampling_ratio)`` rows.
        agreement (Agreement | None): How the processes that each hold a shard of the rows agree on each
            pick; None for one process holding every row. Defaults to ``None``.
        threads (int | None): The thread count to start on, as :func:`greedy_k_center` takes it. Defaults to
            ``None``.

    Raises:
        ValueError: If the ratio selects no row.

    Example:
        >>> import torch
        >>> embedding = torch.tensor([[0.0], [1.0], [10.0], [11.0]])
        >>> sampler = FastKCenterGreedy(embedding, sampling_ratio=0.5)
        >>> sampler.sample_coreset().shape
        torch.Size([2, 1])
        >>> sorted(index // 2 for index in sampler.select_coreset_idxs())  # one row of each pair
        [0, 1]
    """

    def __init__(
        self,
        embedding: torch.Tensor,
        sampling_ratio: float,
        agreement: Agreement | None = None,
        threads: int | None = None,
    ) -> None:
        self.device = embedding.device
        self.embedding = embedding.cpu()
        self.agreement = agreement or OneShard()
        self.threads = threads
        self.total_rows = int(self.agreement.total(torch.tensor([embedding.shape[0]]))[0])
        self.coreset_size = int(self.total_rows * sampling_ratio)
        if self.coreset_size <= 0:
            msg = (
                f"Coreset ratio {sampling_ratio} selects no point from {self.total_rows} patch features: "
                "raise model.coreset_sampling_ratio or train on more images."
            )
            raise ValueError(msg)

    def select_coreset_idxs(self, progress: Callable[[int], None] | None = None) -> list[int]:
        """Select the coreset's row indices by greedy k-center.

        The selection starts at the row farthest from the mean of all rows (anomalib draws a random
        one): the bank is then the same set of rows whatever the order of the patches, which is what
        lets a distributed fit, whose ranks hold the patches in another order, choose the same bank.

        Args:
            progress (Callable[[int], None] | None): Called now and then with the number of points
                selected so far.

        Returns:
            list[int]: The selected row indices of this shard (with one process, all ``coreset_size``), in
            the order they were chosen.
        """
        return greedy_k_center(
            self.embedding, self.coreset_size, progress=progress, agreement=self.agreement, threads=self.threads
        ).tolist()

    def sample_coreset(self, progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Select the coreset and return its rows: all of them, on every shard.

        Args:
            progress (Callable[[int], None] | None): Called now and then with the number of points
                selected so far.

        Returns:
            torch.Tensor: ``coreset_size x D`` rows in the order chosen; every row, in order, when the ratio
            keeps them all (a greedy "selection" of every row would cost quadratic time for nothing).
        """
        if self.coreset_size >= self.total_rows:
            if progress is not None:
                progress(self.coreset_size)
            return self.agreement.gather(self.embedding)[: self.coreset_size].to(self.device)
        if isinstance(self.agreement, OneShard):
            return self.embedding[self.select_coreset_idxs(progress)].to(self.device)
        rows: list[torch.Tensor] = []
        greedy_k_center(
            self.embedding,
            self.coreset_size,
            progress=progress,
            agreement=self.agreement,
            on_pick=rows.append,
            threads=self.threads,
        )
        return torch.stack(rows).to(self.device)
