"""A phase of a memory-bank model's fit, shown in the progress bar the trainer already draws.

Memory-bank models do their real work inside one Lightning hook (``fit`` at the end of the
epoch), where Lightning's own bar stands still. This puts each phase (representation training,
coreset selection) on that bar as a task of its own: a row in Lightning's rich bar, or a tqdm bar
under its tqdm one. Without a bar (``enable_progress_bar=False``, or no trainer) nothing is drawn.

Every update also checks for a SIGTERM: Lightning only notes the signal and acts on it between
batches, which a fit in one hook never reaches, so a supervisor's stop would otherwise wait for the
whole fit. :func:`stop_if_terminated` ends the phase at once, with the exit code 143 of a SIGTERM.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

ProgressUpdate = Callable[..., None]
"""``update(completed, **values)``: ``completed`` steps of the phase are done; ``values`` are shown beside it."""


def _describe(description: str, values: dict[str, float]) -> str:
    return " ".join([description, *(f"{name} {value:.4f}" for name, value in values.items())])


@contextmanager
def fit_progress(trainer: Any, description: str, total: int) -> Iterator[ProgressUpdate]:
    """Show one phase of ``total`` steps in the trainer's progress bar while the block runs.

    Args:
        trainer: the Lightning trainer running the fit, or None.
        description: the phase's name, shown before its values.
        total: the number of steps the phase will report.

    Yields:
        ``update(completed, **values)``, to call as the phase advances (values such as ``loss=0.31``).

    Example:
        >>> with fit_progress(None, "coreset", total=100) as update:
        ...     for step in range(100):
        ...         update(step + 1)

    """
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    bar = getattr(trainer, "progress_bar_callback", None) if trainer is not None else None
    if isinstance(bar, RichProgressBar) and bar.is_enabled and bar.progress is not None:
        progress = bar.progress
        task = progress.add_task(description, total=total)

        def update(completed: int, **values: float) -> None:
            stop_if_terminated(trainer)
            progress.update(task, completed=completed, description=_describe(description, values))

        try:
            yield update
        finally:
            progress.refresh()
    elif isinstance(bar, TQDMProgressBar) and bar.is_enabled:
        from tqdm import tqdm

        with tqdm(total=total, desc=description, leave=True, dynamic_ncols=True) as shown:

            def update(completed: int, **values: float) -> None:
                stop_if_terminated(trainer)
                shown.set_postfix({name: f"{value:.4f}" for name, value in values.items()}, refresh=False)
                shown.update(completed - shown.n)

            yield update
    else:
        yield lambda completed, **values: stop_if_terminated(trainer)


SIGTERM_EXIT_CODE = 143
"""The exit code of a process ended by SIGTERM (128 + 15), so that a supervisor sees the run did not finish."""


def stop_if_terminated(trainer: Any) -> None:
    """End the fit now if the trainer has received a SIGTERM.

    Args:
        trainer: The Lightning trainer running the fit, or None (never stops).

    Raises:
        SIGTERMException: Lightning's own, which its trainer turns into teardown and exit, with
            ``SIGTERM_EXIT_CODE``; ``finally`` blocks (the feature spill's removal) run on the way.
    """
    if trainer is not None and getattr(trainer, "received_sigterm", False):
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        raise SIGTERMException(SIGTERM_EXIT_CODE)
