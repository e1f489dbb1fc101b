"""One (model, seed) run of ``reconpatch compare``, in a Python process of its own."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any
from urllib.error import URLError

import torch

from ..errors import BAD_INPUT_ERRORS, error_text
from ..memory import compare_mmap_threshold, fix_mmap_threshold, peak_rss
from .callbacks import PhaseTimer, TestRecorder
from .data import build_datamodule, download_failure
from .models import build_model, takes_reconpatch_args
from .probes import latency_images
from .report import METRIC_KEYS, machine, versions
from .settings import CompareSettings

RUN_FILE = "compare_run.pt"
"""A finished run's result, in its run folder, with the settings it was made with."""


def run_one(
    name: str, settings: CompareSettings, seed: int, data_config: dict[str, Any], log: Callable[[str], None]
) -> dict:
    """Train and test one model with one seed (inside that run's own process).

    Args:
        name (str): The model's class name (see :func:`models.build_model`).
        settings (CompareSettings): The shared settings.
        seed (int): Seed of Lightning, the datamodule and the model.
        data_config (dict[str, Any]): The datamodule config of one category.
        log (Callable[[str], None]): Receives progress lines and the run's numbers.

    Returns:
        dict: Plain data for the parent: ``result`` (its metrics, timings, peak memory and bank shape),
        ``engine_metrics`` (anomalib's test metrics), ``outputs`` (the recorded test outputs), ``state``
        (the fitted model's state) and ``images`` (the fixed test images that ``compare`` times it on).
    """
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    from ...components.failures import ExplainFailures

    seed_everything(seed, workers=True)
    datamodule = build_datamodule(data_config, seed)
    model = build_model(name, settings)
    timer, recorder = PhaseTimer(), TestRecorder()
    engine = Engine(
        default_root_dir=run_folder(settings, name, seed),
        logger=False,
        callbacks=[timer, recorder, ExplainFailures()],
        enable_progress_bar=False,
    )
    with peak_rss() as memory:
        training = "representation training and " if name.startswith("ReConPatch") else ""
        log(f"[{name}, seed {seed}] fit: features, then {training}coreset")
        engine.fit(model=model, datamodule=datamodule)
        log(f"[{name}, seed {seed}] test")
        start = time.perf_counter()
        metrics = engine.test(model=model, datamodule=datamodule)[0]
        test_s = time.perf_counter() - start
    timings = getattr(model, "fit_timings", {})
    features_s = timings.get("features_s", timer.features_s)
    result = {key: float(metrics[key]) for key in METRIC_KEYS if key in metrics}
    result.update(
        fit_s=features_s + timer.fit_s,
        features_s=features_s,
        representation_s=timings.get("representation_s", 0.0),
        coreset_s=timings.get("coreset_s", timer.fit_s),
        test_s=test_s,
        peak_rss_mb=memory["peak_rss_mb"],
        memory_bank=bank_shape(model.model),
        test_images=len(recorder.scores),
    )
    log(f"[{name}, seed {seed}] " + ", ".join(f"{k} {v:.3f}" for k, v in result.items() if isinstance(v, float)))
    return {
        "result": result,
        "engine_metrics": {key: float(value) for key, value in metrics.items()},
        "outputs": recorder.saved(),
        "state": model.state_dict(),
        "images": [image.as_subclass(torch.Tensor) for image in latency_images(datamodule, settings.latency_images)],
    }


USER_ERRORS: dict[str, type[Exception]] = {error.__name__: error for error in BAD_INPUT_ERRORS}
"""The bad-input errors by name, so a child's error can be raised again in the parent with its type."""


class RunFailedError(RuntimeError):
    """A run's process ended on an unexpected error; its traceback is on stderr, above this message."""


def describe_exit(code: int) -> str:
    """Say in words how a run's process ended; a kill by the out-of-memory killer should say so.

    Args:
        code (int): The process's return code; negative for a signal.

    Returns:
        str: The exit code, or the signal's name; for ``SIGKILL``, the likely out-of-memory kill and
        the settings that use less memory.
    """
    if code >= 0:
        return f"exited with code {code}; its error is printed above"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    text = f"was killed by {name}"
    if -code == signal.SIGKILL:
        text += (
            ", most often the kernel's out-of-memory killer (see `dmesg`): lower --coreset-ratio or --image-size "
            "(ReConPatch alone: a smaller --reconpatch feature_memory_mb=N)"
        )
    return text


def run_in_process(
    name: str, settings: CompareSettings, seed: int, data_config: dict[str, Any], log: Callable[[str], None]
) -> dict:
    """:func:`run_one` in a fresh Python process, so that the run's peak memory is its own.

    The child's output lines go to ``log``; a bad-input error in the child (a missing data folder,
    say) is raised here again with its own type and message.

    Args:
        name (str): The model's class name.
        settings (CompareSettings): The shared settings.
        seed (int): The run's seed.
        data_config (dict[str, Any]): The datamodule config of one category.
        log (Callable[[str], None]): Receives the child's output lines.

    Returns:
        dict: What :func:`run_one` returned in the child.

    Raises:
        RunFailedError: If the child ended on an unexpected error or wrote no result.
        ValueError, FileExistsError, FileNotFoundError: The child's bad-input error (``BAD_INPUT_ERRORS``),
            raised again with its own type and message.
    """
    with tempfile.TemporaryDirectory(prefix="reconpatch-compare-") as folder:
        job, result = Path(folder) / "job.json", Path(folder) / "result.pt"
        spec = {"name": name, "seed": seed, "data_config": data_config, "settings": asdict(settings)}
        job.write_text(json.dumps(spec, default=str))
        command = [sys.executable, "-m", "anomalib_reconpatch.tools.compare", str(job), str(result)]
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"}
        with subprocess.Popen(
            command, stdout=subprocess.PIPE, text=True, encoding="utf-8", errors="replace", env=environment
        ) as child:
            for line in child.stdout:
                log(line.rstrip("\n"))
        if child.returncode != 0 or not result.is_file():
            msg = f"{name}, seed {seed}: the run's process {describe_exit(child.returncode)}."
            raise RunFailedError(msg)
        run = torch.load(result, weights_only=True)
    if "error" in run:
        raise USER_ERRORS[run["error"]](run["message"])
    return run


def run_folder(settings: CompareSettings, name: str, seed: int) -> Path:
    """Where one (model, seed) run writes: anomalib's run folders and the finished run's result.

    Args:
        settings (CompareSettings): The shared settings.
        name (str): The model's class name.
        seed (int): The run's seed.

    Returns:
        Path: ``settings.out/runs/NAME/seedN``.
    """
    return settings.out / "runs" / name / f"seed{seed}"


def run_settings(name: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The settings that can change one run of model ``name``, out of all the comparison's settings.

    The other seeds, the other models and the output folder never do; ``reconpatch_args`` only change
    the ReConPatch models, so new ``--reconpatch`` values leave stock PatchCore's hour-long runs reusable.

    Args:
        name (str): The model's class name.
        settings (dict[str, Any]): The comparison's settings as a dict (``asdict(CompareSettings)``).

    Returns:
        dict[str, Any]: ``settings`` without those that cannot change the run.
    """
    ignored = {"seeds", "out", "models"} | (set() if takes_reconpatch_args(name) else {"reconpatch_args"})
    return {key: value for key, value in settings.items() if key not in ignored}


def run_key(name: str, settings: CompareSettings, seed: int, data_config: dict[str, Any]) -> str:
    """Everything a run's result depends on, as JSON text: a saved run is reused only where this matches.

    Only the settings that can change this run are in (:func:`run_settings`), so ``--seed 0`` and then
    ``--seed 0 1 2`` in the same folder reuse seed 0, and a model added to the list leaves the others'
    runs reusable; the machine and the library versions are in, so a run's timings are never
    another machine's and an upgrade runs again.

    Args:
        name (str): The model's class name.
        settings (CompareSettings): The shared settings.
        seed (int): The run's seed.
        data_config (dict[str, Any]): The datamodule config of one category.

    Returns:
        str: Sorted JSON of the model, seed, data config, settings, machine and library versions.
    """
    from ... import __version__

    spec = {"name": name, "seed": seed, "data_config": data_config, "settings": run_settings(name, asdict(settings))}
    spec["machine"], spec["versions"] = machine(), {**versions(), "anomalib_reconpatch": __version__}
    return json.dumps(spec, default=str, sort_keys=True)


def same_run(saved_key: object, key: str) -> bool:
    """Whether a saved run's key names the run of ``key``, judged on :func:`run_settings` alone.

    A key saved with settings that cannot change its run (the list of models compared beside it, or
    ReConPatch's arguments in a stock model's key) still matches.

    Args:
        saved_key (object): The key saved with a finished run; anything but a JSON string never matches.
        key (str): :func:`run_key` of the run wanted now.

    Returns:
        bool: ``True`` if the saved run was made with the same model, seed, data and settings.
    """
    if not isinstance(saved_key, str):
        return False
    try:
        spec = json.loads(saved_key)
    except json.JSONDecodeError:
        return False
    if isinstance(spec, dict) and isinstance(spec.get("settings"), dict):
        spec["settings"] = run_settings(str(spec.get("name")), spec["settings"])
    return spec == json.loads(key)


def finished_or_new_run(
    name: str,
    settings: CompareSettings,
    seed: int,
    data_config: dict[str, Any],
    log: Callable[[str], None],
    reuse: bool = True,
) -> dict:
    """Reuse the run that an earlier call finished with the same settings, or run it now and save it.

    A comparison of several models and seeds can take hours; one that stopped (a failed run, Ctrl-C, a
    machine that went down) goes on from its last finished run when the same command is given again.

    Args:
        name (str): The model's class name.
        settings (CompareSettings): The shared settings.
        seed (int): The run's seed.
        data_config (dict[str, Any]): The datamodule config of one category.
        log (Callable[[str], None]): Receives progress lines and the run's output.
        reuse (bool): Reuse a finished run; ``False`` runs every model and seed again. Defaults to ``True``.

    Returns:
        dict: What :func:`run_one` returned, now or in the earlier call.
    """
    path, key = run_folder(settings, name, seed) / RUN_FILE, run_key(name, settings, seed, data_config)
    if reuse and path.is_file():
        try:
            saved = torch.load(path, weights_only=True)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:  # unreadable: run it again
            log(f"[{name}, seed {seed}] {path} is unreadable ({error}); running it again")
            saved = {}
        if same_run(saved.get("key"), key):
            log(f"[{name}, seed {seed}] reusing the run finished earlier with the same settings ({path})")
            return saved["run"]
    run = run_in_process(name, settings, seed, data_config, log)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial_path = path.with_suffix(".partial")
    torch.save({"key": key, "run": run}, partial_path)
    partial_path.replace(path)  # a run stopped while saving leaves no half-written result to reuse
    return run


def run_child(job: Path, result: Path) -> None:
    """Run the child's side of :func:`run_in_process`: read the job, run it, save plain data.

    A bad-input error, or a failed download of a data set that is not on disk, is saved as
    ``{"error": type name, "message": ...}`` for the parent to raise; any other error ends the process.

    Args:
        job (Path): The job's JSON (model name, seed, data config and settings).
        result (Path): Where to save the result with ``torch.save``.
    """
    spec = json.loads(job.read_text())
    fields = spec["settings"]
    size = fields["image_size"]
    size = size if isinstance(size, int) else tuple(size)
    paths = {"data": Path(fields["data"]), "out": Path(fields["out"])}
    settings = CompareSettings(**{**fields, **paths, "image_size": size})
    fix_mmap_threshold(compare_mmap_threshold(spec["name"]))
    try:
        run = run_one(spec["name"], settings, spec["seed"], spec["data_config"], partial(print, flush=True))
    except tuple(USER_ERRORS.values()) as error:
        kind = next(name for name, error_type in USER_ERRORS.items() if isinstance(error, error_type))
        run = {"error": kind, "message": error_text(error)}
    except URLError as error:
        run = {"error": "FileNotFoundError", "message": download_failure(error, spec["data_config"], settings.data)}
    torch.save(run, result)


def bank_shape(torch_model: Any) -> list:
    """The memory bank's shape as ``[rows, dim]``; for an ensemble, one entry naming every member's bank.

    Args:
        torch_model (Any): A memory-bank model's torch model, or an ensemble's with ``members``.

    Returns:
        list: ``[rows, dim]``, or ``["rows x dim + rows x dim + ..."]`` for an ensemble.
    """
    members = getattr(torch_model, "members", None)
    if members is None:
        return list(torch_model.memory_bank.shape)
    return [" + ".join(" x ".join(map(str, member.memory_bank.shape)) for member in members)]
