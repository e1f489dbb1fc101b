"""Thread counts for many small matrix products: all threads on a quiet CPU, one on a busy one.

Representation training runs thousands of steps of products of a few hundred rows by a few hundred
columns. On a quiet 2-core machine two threads make a step about 1.7 times faster than one. On a
busy machine they make it far slower: every operation ends at a barrier where one thread waits for
the other, which the scheduler has given to another process, so the phase slowed 28.6x beside four
busy processes, where PatchCore's coreset loop slowed 4x. The greedy k-center's steps are alike.

:class:`ThreadChooser` measures both counts as the steps run and keeps the faster, so the choice
follows the load as it changes. A phase that follows another can start on the count the other
just measured (``start``, from its ``verdict``): its one-off large products then run on that count too,
and its first probe waits a period. The measurements are in ``docs/design/busy-cpu.md``.

For representation training "one" means one thread for each of two tasks: the step, and the next
batch's pseudo-labels beside it (:func:`single_threaded`), which meet once a step. The coreset that
follows it, where torch has two threads, starts on two halves of the rows on one thread each, which
meet once a pick (``coreset.on_thread_shards``), after either verdict: after "one" to the end, after
"all" until the balls prune most picks, when one loop on all threads goes on.

The backbone pass over a training batch needs no choice: where torch has two threads,
:func:`split_over_threads` runs it as two one-thread tasks on half the batch each, faster than both
threads on the whole batch on a quiet CPU and on a busy one.

Example:
    >>> chooser = ThreadChooser(all_threads=2, probe=2, period=10)
    >>> for step, seconds in enumerate([0.1, 0.2, 0.9]):  # two steps on one thread, then one on two
    ...     assert chooser.threads(step) == (1 if step < 2 else 2)
    ...     chooser.record(step, seconds)
    >>> chooser.threads(3), chooser.gap  # two threads took 6 times as long: chosen at once, probed later
    (1, 20)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from statistics import median
from typing import TypeVar

import torch

ABANDON = 3.0
"""A probe step on all threads that takes this many times the one-thread median ends the probe at once:
on a busy CPU one such step costs as much as dozens of one-thread steps."""

TASKS = 2
"""One-thread tasks that share a phase's work on a busy CPU, and the thread count where the backbone pass and
the coreset split theirs: the case measured, on a 2-core machine."""

BACK_OFF = 1.5
"""When one count beats the other by more than this factor, the next probe comes twice as late."""

BUSY_SHARE = 0.6
"""A one-thread probe whose thread was on a core for less than this share of its steps' time is on a busy CPU:
other processes hold the cores, so the all-thread probe, one step of which can cost as much as dozens of
one-thread steps there, is skipped as a clear loss."""

T = TypeVar("T")


class ThreadChooser:
    """Chooses, for each step, between all threads and one thread by timing both.

    A probe window runs ``probe`` steps on one thread, then ``probe`` steps on all threads, and the rest
    of the period on whichever had the lower median step time. Probing all threads on a busy CPU is what
    costs: the all-thread probe is skipped when the one-thread steps' thread got less than ``BUSY_SHARE`` of
    a core (their CPU time, when :meth:`record` is given it), and stops after its first step if that step
    takes ``ABANDON`` times the one-thread median; while one count clearly wins (by ``BACK_OFF``) the
    period doubles, up to ``max_period``; a close call brings it back to ``period``. With one thread in
    all there is nothing to choose.

    Args:
        all_threads (int): The thread count torch would use (``torch.get_num_threads()``).
        probe (int): Steps timed with each count at the start of a window. Defaults to ``3``.
        period (int): Steps between two windows while the counts are close. Defaults to ``100``.
        max_period (int): The longest period. Defaults to ``1600``.
        start (int | None): A count measured just before (another chooser's ``verdict``): the steps run on it
            and the first window opens after ``period`` steps. None probes from the first step. Defaults to
            ``None``.
    """

    def __init__(
        self, all_threads: int, probe: int = 3, period: int = 100, max_period: int = 1600, start: int | None = None
    ) -> None:
        self.all_threads = all_threads
        self.probe = probe
        self.period = max(period, 2 * probe + 1)
        self.max_period = max(max_period, self.period)
        self.gap = self.period
        self.window = 0
        self.probing = start is None
        self.times: dict[int, list[float]] = {1: [], all_threads: []}
        self.cpu: float | None = 0.0  # the one-thread probe's CPU seconds; None once a step came without them
        self.chosen = all_threads if start is None else start
        self.verdict: int | None = start
        """The count the last finished probe chose (or ``start``); None before any."""

    def threads(self, step: int) -> int:
        """The thread count for ``step``; steps must come in increasing order.

        Args:
            step (int): The step's index, from 0.

        Returns:
            int: ``all_threads`` or 1.
        """
        if self.all_threads <= 1:
            return 1
        if step >= self.window + self.gap:
            self.window, self.probing = step, True
        offset = step - self.window
        if self.probing and offset < self.probe:
            return 1
        if self.probing and offset < 2 * self.probe:
            return self.all_threads
        return self.chosen

    def record(self, step: int, seconds: float, cpu_seconds: float | None = None) -> None:
        """Note how long ``step`` took; once the window's probes are done, choose the faster count.

        Args:
            step (int): The step's index, as given to :meth:`threads`.
            seconds (float): Its wall-clock duration.
            cpu_seconds (float | None): The CPU time of the thread that ran it (``time.thread_time``), which
                tells a busy CPU from a slow step; None leaves the all-thread probe to the timings alone.
                Defaults to ``None``.
        """
        if self.all_threads <= 1 or not self.probing:
            return
        offset = step - self.window
        if offset < self.probe:
            self.times[1].append(seconds)
            self.cpu = None if cpu_seconds is None or self.cpu is None else self.cpu + cpu_seconds
            if offset == self.probe - 1 and self.cpu is not None and self.cpu < BUSY_SHARE * sum(self.times[1]):
                self._choose(1, clear=True)
            return
        self.times[self.all_threads].append(seconds)
        one = median(self.times[1])
        if seconds < ABANDON * one and offset < 2 * self.probe - 1:
            return
        many = median(self.times[self.all_threads])
        self._choose(1 if one < many else self.all_threads, clear=max(one, many) > BACK_OFF * min(one, many))

    def _choose(self, count: int, clear: bool) -> None:
        """End the window's probes on ``count``; a clear win puts the next window twice as far."""
        self.chosen = self.verdict = count
        self.gap = min(2 * self.gap, self.max_period) if clear else self.period
        self.probing = False
        self.times = {1: [], self.all_threads: []}
        self.cpu = 0.0


def single_threaded(function: Callable[..., T], *args: object) -> T:
    """``function(*args)`` on one of torch's threads, for work that another thread runs beside.

    A thread that a pool started keeps torch's thread count of its first task, so the count is set
    on every call.

    Args:
        function (Callable[..., T]): What to run.
        *args (object): Its arguments.

    Returns:
        T: What ``function`` returns.
    """
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    return function(*args)


def split_over_threads(function: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
    """``function(batch)`` as two one-thread tasks on a CPU of two threads, each on half the batch's images.

    A CNN's layers on a batch of images are hundreds of operations, each of which ends at a barrier
    between torch's threads; a half batch per thread has none. On 2 cores that is faster alone and
    beside busy processes (measured in ``docs/design/busy-cpu.md``). With another thread count, on a
    GPU or with one image, ``function`` runs on the whole batch as before: nothing was measured there.
    Each task runs in the caller's grad, inference and CPU autocast modes, which are per thread, and
    torch's thread count is restored.

    Args:
        function (Callable[[torch.Tensor], torch.Tensor]): Maps ``B x ...`` images to outputs whose first
            dimension runs over the images in order (one row or several per image).
        batch (torch.Tensor): The images.

    Returns:
        torch.Tensor: The halves' outputs, concatenated in order.
    """
    if torch.get_num_threads() != TASKS or len(batch) < TASKS or batch.device.type != "cpu":
        return function(batch)
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    autocast, autocast_dtype = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")

    def task(part: torch.Tensor) -> torch.Tensor:
        with (
            torch.inference_mode(inference),
            torch.set_grad_enabled(grad),
            torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast),
        ):
            return single_threaded(function, part)

    first, second = batch.tensor_split(TASKS)
    with torch_threads(), ThreadPoolExecutor(1, thread_name_prefix="reconpatch-features") as pool:
        other = pool.submit(task, second)
        return torch.cat([task(first), other.result()])


@contextmanager
def torch_threads() -> Iterator[None]:
    """Restore torch's thread count after a block that changes it.

    Yields:
        None.
    """
    previous = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(previous)
