"""Thread counts for many small matrix products: all threads on a quiet CPU, one on a busy one.

Representation training runs thousands of steps of products of a few hundred rows by a few hundred
columns. On a quiet 2-core machine two threads make a step about 1.7 times faster than one. On a
busy machine they make it far slower: every operation ends at a barrier where one thread waits for
the other, which the scheduler has given to another process, so the phase slowed 28.6x beside four
busy processes, where PatchCore's coreset loop slowed 4x.
:class:`ThreadChooser` measures both counts as the steps run and keeps the faster, so the choice
follows the load as it changes. The measurements are in ``docs/design/busy-cpu.md``.

Example:
    >>> chooser = ThreadChooser(all_threads=2, probe=2, period=10)
    >>> [chooser.threads(step) for step in range(4)]
    [2, 2, 1, 1]
    >>> for step, seconds in enumerate([0.9, 0.8, 0.1, 0.2]):
    ...     chooser.record(step, seconds)
    >>> chooser.threads(4)
    1
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from statistics import median

import torch


class ThreadChooser:
    """Chooses, for each training step, between all threads and one thread by timing both.

    Each period of ``period`` steps starts with ``probe`` steps on all threads and ``probe`` steps on
    one; the rest of the period runs on whichever had the lower median step time. With one thread in
    all there is nothing to choose.

    Args:
        all_threads (int): The thread count torch would use (``torch.get_num_threads()``).
        probe (int): Steps timed with each count at the start of a period. Defaults to ``3``.
        period (int): Steps between two choices. Defaults to ``100``.
    """

    def __init__(self, all_threads: int, probe: int = 3, period: int = 100) -> None:
        self.all_threads = all_threads
        self.probe = probe
        self.period = max(period, 2 * probe + 1)
        self.times: dict[int, list[float]] = {all_threads: [], 1: []}
        self.chosen = all_threads

    def threads(self, step: int) -> int:
        """The thread count for ``step``.

        Args:
            step (int): The step's index, from 0.

        Returns:
            int: ``all_threads`` or 1.
        """
        position = step % self.period
        if self.all_threads <= 1:
            return 1
        if position < self.probe:
            return self.all_threads
        if position < 2 * self.probe:
            return 1
        return self.chosen

    def record(self, step: int, seconds: float) -> None:
        """Note how long ``step`` took; after a period's probes, choose the faster count.

        Args:
            step (int): The step's index, as given to :meth:`threads`.
            seconds (float): Its wall-clock duration.
        """
        position = step % self.period
        if self.all_threads <= 1 or position >= 2 * self.probe:
            return
        self.times[self.threads(step)].append(seconds)
        if position == 2 * self.probe - 1:
            many, one = median(self.times[self.all_threads]), median(self.times[1])
            self.chosen = 1 if one < many else self.all_threads
            self.times = {self.all_threads: [], 1: []}


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
