"""Per-image CPU latency at batch 1, split into backbone, memory-bank search and the rest.

Works for ReConPatch's and stock PatchCore's torch models: the backbone is their
``feature_extractor``; the search is ReConPatch's ``search_bank`` or PatchCore's ``nearest_neighbors``
(which PatchCore also calls once more per image for its score's support set). The rest is everything
else the timed call does: pre-processing, pooling, ``f``, score, anomaly map, post-processing.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

SEARCH_METHODS = ("search_bank", "nearest_neighbors")
"""Memory-bank search methods, ReConPatch's then PatchCore's; the first the model has is timed."""


@contextmanager
def phase_clock(torch_model: nn.Module) -> Iterator[dict[str, float]]:
    """Time the backbone and the memory-bank search of a torch model while the block runs.

    The model's ``feature_extractor.forward`` and its search method are shadowed by timed wrappers on
    these objects only, and restored on exit.

    Args:
        torch_model (nn.Module): ReConPatch's or PatchCore's torch model, or an ensemble's, whose
            ``members`` are timed together.

    Yields:
        dict[str, float]: ``{"backbone": s, "search": s}``, to which every call adds its wall seconds;
        reset the values to measure one call.

    Raises:
        TypeError: If the model has none of ``SEARCH_METHODS``.
    """
    totals = {"backbone": 0.0, "search": 0.0}
    targets = []
    for part in getattr(torch_model, "members", [torch_model]):  # an ensemble's members, each timed
        search = next((name for name in SEARCH_METHODS if hasattr(part, name)), None)
        if search is None:
            msg = f"{type(part).__name__} has none of {SEARCH_METHODS}: cannot time its search."
            raise TypeError(msg)
        targets += [("backbone", part.feature_extractor, "forward"), ("search", part, search)]
    saved = []
    for phase, owner, name in targets:
        saved.append((owner, name, vars(owner).get(name)))
        original = getattr(owner, name)

        def timed(*args: Any, _original: Callable = original, _phase: str = phase, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                totals[_phase] += time.perf_counter() - start

        setattr(owner, name, timed)  # an instance attribute shadows the method for this object only
    try:
        yield totals
    finally:
        for owner, name, own in saved:
            if own is None:
                delattr(owner, name)
            else:
                setattr(owner, name, own)


@torch.no_grad()
def split_latency_ms(
    forward: Callable[[torch.Tensor], Any], torch_model: nn.Module, images: Sequence[torch.Tensor], warmup: int = 3
) -> dict[str, float]:
    """Measure the median per-image milliseconds of ``forward(image[None])`` over ``images``, and of its phases.

    ``rest_ms`` is ``latency_ms - backbone_ms - search_ms``, so the three parts add up to the latency.

    Args:
        forward (Callable[[torch.Tensor], Any]): The timed call, given one ``1 x C x H x W`` image.
        torch_model (nn.Module): The torch model that ``forward`` runs, whose phases are timed.
        images (Sequence[torch.Tensor]): ``C x H x W`` images, each timed once.
        warmup (int): Untimed calls on the first images before timing.

    Returns:
        dict[str, float]: Medians ``latency_ms``, ``backbone_ms`` and ``search_ms``, and ``rest_ms``.
    """
    for image in list(images)[:warmup]:
        forward(image[None])
    totals, backbone, search = [], [], []
    with phase_clock(torch_model) as clock:
        for image in images:
            clock.update(backbone=0.0, search=0.0)
            start = time.perf_counter()
            forward(image[None])
            totals.append(time.perf_counter() - start)
            backbone.append(clock["backbone"])
            search.append(clock["search"])
    result = {
        "latency_ms": 1000 * statistics.median(totals),
        "backbone_ms": 1000 * statistics.median(backbone),
        "search_ms": 1000 * statistics.median(search),
    }
    result["rest_ms"] = result["latency_ms"] - result["backbone_ms"] - result["search_ms"]
    return result


def interleaved_medians(
    timers: dict[str, Callable[[], dict[str, float]]], rounds: int = 3, by: str = "latency_ms"
) -> dict[str, dict[str, float]]:
    """Run every timer once per round, in turn, and return each timer's median round by ``by``.

    Timing one model after another lets a slow spell of a shared machine land on one of them only,
    enough to reverse which model looks faster; rounds that take every model in turn spread it over
    all. A whole round is returned, so its parts (backbone, search, rest) still add up to its latency.

    Args:
        timers (dict[str, Callable[[], dict[str, float]]]): One timer per model name, each returning a
            round's timings (as :func:`split_latency_ms` does).
        rounds (int): Number of rounds.
        by (str): The timing that orders the rounds.

    Returns:
        dict[str, dict[str, float]]: For each name, the round whose ``by`` is the median (the lower
        one for an even number of rounds).
    """
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in timers}
    for _ in range(rounds):
        for name, timer in timers.items():
            samples[name].append(timer())
    return {name: sorted(runs, key=lambda r: r[by])[(len(runs) - 1) // 2] for name, runs in samples.items()}
