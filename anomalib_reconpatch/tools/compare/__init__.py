"""``reconpatch compare``: train and test ReConPatch and stock PatchCore on the same data, one report.

Both models go through anomalib's own ``Engine`` and ``Evaluator`` with the same datamodule,
backbone, layers, image size, coreset ratio and seed, one after the other. Each (model, seed) run is
a fresh Python process (``python -m anomalib_reconpatch.tools.compare JOB RESULT``), so its peak resident
memory is its own and not what earlier runs left behind; the parent then times every model's
latency in turn in one process. With several seeds every model runs once per seed and the report
gives means and spreads: on small data sets one seed's noise can exceed the gap between the models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from ..latency import interleaved_medians
from ..predict import check_output_outside
from .callbacks import TestRecorder
from .data import build_datamodule, load_datamodule_config, split_categories
from .figures import heatmap_figure, plot_heatmaps, plot_roc
from .models import build_model
from .probes import image_latency_ms, latency_images
from .report import (
    METRIC_KEYS,
    TIMING_KEYS,
    mean_over_runs,
    spread_over_seeds,
    write_category_summary,
    write_data_report,
)
from .runner import RunFailedError, describe_exit, finished_or_new_run
from .settings import CompareSettings, image_shape

__all__ = [
    "METRIC_KEYS",
    "TIMING_KEYS",
    "CompareSettings",
    "RunFailedError",
    "TestRecorder",
    "build_datamodule",
    "compare",
    "describe_exit",
    "heatmap_figure",
    "image_shape",
    "latency_images",
    "load_datamodule_config",
    "split_categories",
]


def compare(settings: CompareSettings, log: Callable[[str], None] = print, reuse: bool = True) -> dict:
    """Train and test every model on the same data; write report.json, report.md, roc.png and heatmaps.png.

    A (model, seed) run that an earlier call finished in the same output folder with the same settings
    is reused, so a comparison that stopped goes on from its last finished run; adding a model, or new
    ``reconpatch_args``, leaves the runs that they cannot change reusable.

    With several categories (``init_args.category`` a list or ``all``) each category gets those files
    in ``settings.out/CATEGORY``, and ``settings.out`` gets the summary over the categories. The data
    config, image size, seeds, datamodules and models are all checked before the first run, so bad
    settings fail at once rather than after a fit.

    Args:
        settings (CompareSettings): What every run shares; the files go to ``settings.out``.
        log (Callable[[str], None]): Receives progress lines, the runs' output and the tables.
        reuse (bool): Reuse finished runs; ``False`` runs every model and seed again. Defaults to ``True``.

    Returns:
        dict: For one category, ``report`` (as in report.json), ``engine_metrics`` (anomalib's test
        metrics of the first seed's runs) and ``engine_metrics_per_seed``; for several, ``report`` (the
        summary) and ``categories`` (each category's result).

    Raises:
        FileNotFoundError: If the data config or the data set is missing.
        ValueError: If the data config, image size, seeds or a model name is wrong, or ``settings.out`` is
            inside the data folder.
        RunFailedError: If a run's process ends on an unexpected error.

    Example:
        >>> from pathlib import Path
        >>> settings = CompareSettings(data=Path("configs/data/bottle.yaml"), out=Path("results/compare/bottle"))
        >>> result = compare(settings)  # doctest: +SKIP
        >>> sorted(result["report"]["models"])  # doctest: +SKIP
        ['Patchcore', 'ReConPatch']
    """
    data_config = load_datamodule_config(settings.data)
    root = (data_config.get("init_args") or {}).get("root")
    if root is not None:
        check_output_outside(Path(root), settings.out)  # results never land among the user's images
    image_shape(settings.image_size)  # a bad size fails here, not after the first model's fit
    if not settings.seeds or len(set(settings.seeds)) != len(settings.seeds):
        msg = f"--seed {' '.join(map(str, settings.seeds))}: give one or more different seeds (e.g. --seed 0 1 2)."
        raise ValueError(msg)
    categories = split_categories(data_config, settings.data)
    for config in (categories or {"": data_config}).values():
        build_datamodule(config, settings.seeds[0])  # bad data or model settings fail here, before any run
    fresh = {name: build_model(name, settings) for name in settings.models}  # take the fitted states for latency
    if categories is None:
        return compare_data(settings, data_config, fresh, log, reuse)
    results = {}
    for category, config in categories.items():
        log(f"[{category}] category {len(results) + 1} of {len(categories)}")
        results[category] = compare_data(replace(settings, out=settings.out / category), config, fresh, log, reuse)
    return {"report": write_category_summary(settings, data_config, results, log), "categories": results}


def compare_data(
    settings: CompareSettings,
    data_config: dict[str, Any],
    fresh: dict[str, Any],
    log: Callable[[str], None],
    reuse: bool = True,
) -> dict:
    """Run :func:`compare` on one datamodule config.

    Every (model, seed) runs in its own process; the first seed's fitted states are then loaded into
    ``fresh`` and timed in interleaved rounds, and its test outputs drawn in the figures.

    Args:
        settings (CompareSettings): What every run shares; the files go to ``settings.out``.
        data_config (dict[str, Any]): The datamodule config of one category.
        fresh (dict[str, Any]): One unfitted model per name, to load the fitted states into and time.
        log (Callable[[str], None]): Receives progress lines, the runs' output and the table.
        reuse (bool): Reuse the runs that an earlier call finished with the same settings. Defaults to ``True``.

    Returns:
        dict: ``report`` (as in report.json), ``engine_metrics`` (anomalib's test metrics of the first
        seed's runs) and ``engine_metrics_per_seed``.
    """
    settings.out.mkdir(parents=True, exist_ok=True)
    first, *more = settings.seeds
    per_seed: dict[int, dict[str, dict]] = {}
    engine_metrics: dict[int, dict[str, dict]] = {}
    runs: dict[str, dict] = {}
    for seed in settings.seeds:
        for name in settings.models:
            run = finished_or_new_run(name, settings, seed, data_config, log, reuse)
            per_seed.setdefault(seed, {})[name] = run["result"]
            engine_metrics.setdefault(seed, {})[name] = run["engine_metrics"]
            if seed == first:
                runs[name] = run  # only the first seed's models are kept, for latency and the figures
    log(f"[latency] seed {first}'s models, batch 1, every model in turn in each of 3 rounds")
    images = next(iter(runs.values()))["images"]
    for name, run in runs.items():
        fresh[name].load_state_dict(run.pop("state"))  # anomalib's DynamicBufferMixin resizes the memory banks
    timers = {name: partial(image_latency_ms, model, images) for name, model in fresh.items()}
    latencies = interleaved_medians(timers)
    for name, latency in latencies.items():
        log(f"[{name}] " + ", ".join(f"{k} {v:.1f}" for k, v in latency.items()))
    del timers
    models = mean_over_runs(per_seed)
    for name, latency in latencies.items():
        models[name].update(latency)
    spread = spread_over_seeds(per_seed) if more else None
    recorders = {name: TestRecorder.restore(run["outputs"]) for name, run in runs.items()}
    plot_roc(recorders, settings.out / "roc.png")
    plot_heatmaps(recorders, settings.out / "heatmaps.png")
    report = write_data_report(settings, data_config, models, per_seed, spread, log)
    return {"report": report, "engine_metrics": engine_metrics[first], "engine_metrics_per_seed": engine_metrics}
