"""The numbers of a comparison as tables: report.md and report.json, per seed and per category."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .settings import CompareSettings, image_shape

METRIC_KEYS = ("image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_PRO")
"""anomalib's test metrics that the report shows, in table order."""
TIMING_KEYS = (
    "fit_s",
    "features_s",
    "representation_s",
    "coreset_s",
    "test_s",
    "latency_ms",
    "backbone_ms",
    "search_ms",
    "rest_ms",
    "peak_rss_mb",
)
"""Timings and memory that the report shows after the metrics, in table order."""


def machine() -> dict[str, Any]:
    """Describe the machine the report was made on.

    Returns:
        dict[str, Any]: ``cpu`` (the model name from ``/proc/cpuinfo`` on Linux, else what ``platform``
        says), ``cpu_count`` and ``python`` (the version).
    """
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.partition(":")[2].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version()}


def versions() -> dict[str, Any]:
    """Collect the library versions and the CPU count, for the report.

    Returns:
        dict[str, Any]: Versions of anomalib, torch, timm and OpenVINO, and ``cpu_count``.
    """
    import anomalib
    import openvino
    import timm

    return {
        "anomalib": anomalib.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "openvino": openvino.get_version(),
        "cpu_count": os.cpu_count(),
    }


def command_line() -> str:
    """Quote the command that made the report, as a shell would take it.

    Returns:
        str: ``reconpatch compare ...``: the program's file name and its arguments, shell-quoted.
    """
    return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])


def provenance(settings: CompareSettings, data_config: dict[str, Any]) -> dict[str, Any]:
    """What every report records about how it was made: settings, library versions, machine and command.

    Args:
        settings (CompareSettings): The comparison's settings.
        data_config (dict[str, Any]): The datamodule config that was read.

    Returns:
        dict[str, Any]: ``settings``, ``versions``, ``machine`` and ``command`` entries.
    """
    return {
        "settings": settings_record(settings, data_config),
        "versions": versions(),
        "machine": machine(),
        "command": command_line(),
    }


def markdown_table(models: dict[str, dict]) -> str:
    """Format the models' numbers side by side as a Markdown table.

    Args:
        models (dict[str, dict]): Each model's numbers; keys of ``METRIC_KEYS``, ``TIMING_KEYS`` and
            ``memory_bank`` (a shape) are shown, rows that no model has are left out.

    Returns:
        str: The table; with exactly two models, a difference column (first model minus second).
    """
    names = list(models)
    head = "| metric | " + " | ".join(names) + (" | difference |" if len(names) == 2 else " |")
    rule = "|---" * (len(names) + 1 + (len(names) == 2)) + "|"
    rows = [head, rule]
    for key in (*METRIC_KEYS, *TIMING_KEYS, "memory_bank"):
        values = [models[n].get(key) for n in names]
        if all(v is None for v in values):
            continue
        cells = [
            " x ".join(map(str, v)) if isinstance(v, list) else f"{v:.3f}" if v is not None else "-" for v in values
        ]
        if len(names) == 2:
            numeric = all(isinstance(v, float) for v in values)
            cells.append(f"{values[0] - values[1]:+.3f}" if numeric else "")
        rows.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def mean_over_runs(per_run: dict[Any, dict[str, dict]]) -> dict[str, dict]:
    """Average each model's numbers over seeds or categories.

    Args:
        per_run (dict[Any, dict[str, dict]]): For each seed or category, each model's numbers.

    Returns:
        dict[str, dict]: Each model's float values averaged; other values (the bank's shape) come from the
        first run.
    """
    runs = list(per_run.values())
    means = {}
    for name, first in runs[0].items():
        means[name] = {
            key: statistics.fmean(run[name][key] for run in runs) if isinstance(value, float) else value
            for key, value in first.items()
        }
    return means


def spread_over_seeds(per_seed: dict[int, dict[str, dict]]) -> dict[str, dict[str, float]]:
    """Compute the sample standard deviation of each model's metrics over the seeds.

    Args:
        per_seed (dict[int, dict[str, dict]]): Each seed's numbers per model; two seeds or more.

    Returns:
        dict[str, dict[str, float]]: For each model, the deviation of every ``METRIC_KEYS`` metric.
    """
    runs = list(per_seed.values())
    return {name: {key: statistics.stdev(run[name][key] for run in runs) for key in METRIC_KEYS} for name in runs[0]}


def seed_table(per_seed: dict[int, dict[str, dict]], spread: dict[str, dict[str, float]]) -> str:
    """Format each model's metrics per seed as a Markdown table.

    Args:
        per_seed (dict[int, dict[str, dict]]): Each seed's numbers per model.
        spread (dict[str, dict[str, float]]): Each model's standard deviation per metric.

    Returns:
        str: One row per metric; each cell holds a model's value for every seed, in order, and their
        standard deviation.
    """
    names = list(spread)
    rows = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key in METRIC_KEYS:
        cells = [
            " / ".join(f"{run[name][key]:.3f}" for run in per_seed.values()) + f" (sd {spread[name][key]:.3f})"
            for name in names
        ]
        rows.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def settings_record(settings: CompareSettings, data_config: dict[str, Any]) -> dict[str, Any]:
    """Record the settings as report.json holds them.

    Args:
        settings (CompareSettings): The comparison's settings.
        data_config (dict[str, Any]): The datamodule config that was read.

    Returns:
        dict[str, Any]: The settings' fields, paths as text, and ``data_config``.
    """
    return {**asdict(settings), "data": str(settings.data), "out": str(settings.out), "data_config": data_config}


CATEGORY_COLUMNS = ("image_AUROC", "pixel_AUROC", "pixel_PRO", "fit_s", "latency_ms")
"""The numbers that the summary over categories shows for each category."""


def category_table(per_category: dict[str, dict[str, dict]]) -> str:
    """Format the categories' numbers as a Markdown table.

    Args:
        per_category (dict[str, dict[str, dict]]): Each category's numbers per model.

    Returns:
        str: One row per category, linked to its own report.md; each cell holds every model's value of
        one ``CATEGORY_COLUMNS`` entry, in order.
    """
    names = list(next(iter(per_category.values())))
    head = "| category | " + " | ".join(f"{key} ({' / '.join(names)})" for key in CATEGORY_COLUMNS) + " |"
    rows = [head, "|---" * (len(CATEGORY_COLUMNS) + 1) + "|"]
    for category, models in per_category.items():
        cells = [" / ".join(f"{models[name][key]:.3f}" for name in names) for key in CATEGORY_COLUMNS]
        rows.append(f"| [{category}]({category}/report.md) | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def write_category_summary(
    settings: CompareSettings, data_config: dict[str, Any], results: dict[str, dict], log: Callable[[str], None]
) -> dict:
    """Write ``report.json`` and ``report.md`` over the categories into ``settings.out``.

    Args:
        settings (CompareSettings): The comparison's settings.
        data_config (dict[str, Any]): The datamodule config that was read (with its list of categories).
        results (dict[str, dict]): Each category's :func:`compare_data` result.
        log (Callable[[str], None]): Where the table and the report's path are printed.

    Returns:
        dict: The report as written to ``report.json``: each model's means over the categories, each
        category's numbers, the settings, versions, machine and command.
    """
    per_category = {category: result["report"]["models"] for category, result in results.items()}
    means = {
        name: {key: value for key, value in model.items() if isinstance(value, float)}
        for name, model in mean_over_runs(per_category).items()
    }
    report = {"models": means, "per_category": per_category, **provenance(settings, data_config)}
    (settings.out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    table = markdown_table(means)
    text = (
        f"# ReConPatch vs PatchCore on {settings.data}, {len(per_category)} categories\n\n"
        f"Command: `{report['command']}`; {report['versions']}; {report['machine']['cpu']}.\n\n"
        f"Each number is the mean over the categories (seeds {', '.join(map(str, settings.seeds))}); every "
        "category's own report, with its figures, is in its folder.\n\n"
        f"{table}\n\nPer category:\n\n{category_table(per_category)}\n"
    )
    (settings.out / "report.md").write_text(text)
    log(f"\nMean over {len(per_category)} categories:\n{table}")
    log(f"\nReport: {settings.out / 'report.md'} (one folder per category)")
    return report


def ensemble_note(models: Sequence[str]) -> str:
    """The backbones of ``ReConPatchEnsemble``, which keeps its own instead of ``--backbone``; empty without it.

    Args:
        models (Sequence[str]): The compared model class names.

    Returns:
        str: A parenthesis for the report's setup line, or ``""``.
    """
    if "ReConPatchEnsemble" not in models:
        return ""
    from ...reconpatch.ensemble import DEFAULT_BACKBONES

    return f" (ReConPatchEnsemble: {', '.join(f'`{name}`' for name in DEFAULT_BACKBONES)})"


def image_score_note(settings: CompareSettings) -> str:
    """Say how each compared model scores an image: image AUROC depends on that as much as on the features.

    Args:
        settings (CompareSettings): The comparison's settings; ``reconpatch_args`` may set ``image_score``.

    Returns:
        str: One sentence for the report, or ``""`` when no compared model is described.
    """
    import inspect

    from ...reconpatch.ensemble import ReConPatchEnsemble
    from ...reconpatch.lightning_model import ReConPatch

    ways = {
        "map": "the largest pixel of its anomaly map",
        "patches": "its largest patch distance, re-weighted as in PatchCore",
        "members": "the mean of its members' standardised PatchCore scores",
        "member_peaks": "the mean of its members' standardised largest map pixels",
    }
    classes = {"ReConPatch": ReConPatch, "ReConPatchEnsemble": ReConPatchEnsemble}
    parts = []
    for name in settings.models:
        if name == "Patchcore":
            parts.append(f"Patchcore by {ways['patches']}")
        elif name in classes:
            default = inspect.signature(classes[name]).parameters["image_score"].default
            score = settings.reconpatch_args.get("image_score", default)
            parts.append(f"{name} by {ways.get(score, score)} (image_score={score})")
    if not parts:
        return ""
    hint = ""
    if "Patchcore" in settings.models and "image_score" not in settings.reconpatch_args:
        hint = " `--reconpatch image_score=patches` scores ReConPatch's images as PatchCore does."
    return "How each model scores an image: " + "; ".join(parts) + "." + hint + "\n\n"


def write_data_report(
    settings: CompareSettings,
    data_config: dict[str, Any],
    models: dict[str, dict],
    per_seed: dict[int, dict[str, dict]],
    spread: dict[str, dict[str, float]] | None,
    log: Callable[[str], None],
) -> dict:
    """Write ``report.json`` and ``report.md`` of one datamodule's comparison into ``settings.out``.

    Args:
        settings (CompareSettings): The comparison's settings.
        data_config (dict[str, Any]): The datamodule config that was read.
        models (dict[str, dict]): Each model's numbers (means over the seeds, latency included).
        per_seed (dict[int, dict[str, dict]]): Each seed's numbers per model.
        spread (dict[str, dict[str, float]] | None): Each model's standard deviation over the seeds, or
            None for one seed.
        log (Callable[[str], None]): Where the table and the report's path are printed.

    Returns:
        dict: The report as written to ``report.json``.
    """
    report = {"models": models, "per_seed": per_seed, "spread": spread, **provenance(settings, data_config)}
    (settings.out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    table = markdown_table(models)
    category = (data_config.get("init_args") or {}).get("category")
    title = f"# ReConPatch vs PatchCore on {settings.data}{f' ({category})' if category else ''}\n\n"
    first, *more = settings.seeds
    seeds_text = f"seed {first}"
    if more:
        seeds_text = (
            f"seeds {', '.join(map(str, settings.seeds))} (each number is the mean over the seeds; latency and "
            f"figures come from seed {first}'s models)"
        )
    setup = (
        f"Backbone `{settings.backbone}` {settings.layers}{ensemble_note(settings.models)}, "
        f"{'x'.join(map(str, image_shape(settings.image_size)))} px "
        f"(height x width), coreset ratio "
        f"{settings.coreset_ratio}, {seeds_text}; {report['versions']}.\n\n"
        f"Machine: {report['machine']['cpu']}, {report['machine']['cpu_count']} cores, Python "
        f"{report['machine']['python']}. Command: `{report['command']}`\n\n"
        "pixel_PRO is anomalib's AUPRO up to 30% false-positive rate. Times in seconds; latency_ms is the median "
        f"per-image time at batch 1 over {settings.latency_images} fixed test images and 3 rounds that time every "
        "model in turn, after all fits (pre- and post-processing included), split into backbone_ms (feature "
        "extractor), search_ms (nearest memory-bank search) and rest_ms (the remainder); peak_rss_mb is the "
        "resident memory of the run's own process (every model and seed is fitted and tested in a fresh one), "
        "sampled every 20 ms during its fit and test. In heatmaps.png each model's maps share one colour scale, "
        "from its lowest to its highest value over the whole test set.\n\n"
        f"{image_score_note(settings)}"
    )
    if spread:
        table += "\n\nPer seed (" + ", ".join(map(str, settings.seeds)) + "):\n\n" + seed_table(per_seed, spread)
    (settings.out / "report.md").write_text(
        title + setup + table + "\n\n![ROC](roc.png)\n\n![heatmaps](heatmaps.png)\n"
    )
    log("\n" + table)
    log(f"\nReport: {settings.out / 'report.md'} (raw numbers in report.json, roc.png, heatmaps.png)")
    return report
