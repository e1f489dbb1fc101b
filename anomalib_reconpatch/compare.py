"""``reconpatch compare``: train and test ReConPatch and stock PatchCore on the same data, one report.

Both models go through anomalib's own ``Engine`` and ``Evaluator`` with the same datamodule,
backbone, layers, image size, coreset ratio and seed, one after the other. Each (model, seed) run is
a fresh Python process (``python -m anomalib_reconpatch.compare JOB RESULT``), so its peak resident
memory is its own and not what earlier runs left behind; the parent then times every model's
latency in turn in one process. With several seeds every model runs once per seed and the report
gives means and spreads: on small data sets one seed's noise can exceed the gap between the models.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any
from urllib.error import URLError

import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer

from .cli import BAD_INPUT_ERRORS
from .latency import interleaved_medians, split_latency_ms
from .memory import fix_mmap_threshold

METRIC_KEYS = ("image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_PRO")
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
MAP_SIZE = 128


@dataclass
class CompareSettings:
    """Everything the runs share, plus ReConPatch-only overrides; ``image_size`` is a side or (height, width)."""

    data: Path
    out: Path
    models: list[str] = field(default_factory=lambda: ["ReConPatch", "Patchcore"])
    backbone: str = "tf_efficientnet_lite0"
    layers: list[str] = field(default_factory=lambda: ["blocks.2", "blocks.4"])
    coreset_ratio: float = 0.1
    image_size: int | tuple[int, int] = 256
    seeds: list[int] = field(default_factory=lambda: [0])
    reconpatch_args: dict[str, Any] = field(default_factory=dict)
    latency_images: int = 16


def load_datamodule_config(path: Path) -> dict[str, Any]:
    """Read a stock-CLI datamodule YAML (``class_path`` + ``init_args``), with errors that name the file."""
    if not path.is_file():
        msg = f"Data config {path} does not exist: pass a YAML file with class_path and init_args (see configs/data/)."
        raise FileNotFoundError(msg)
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        msg = f"Data config {path} is not valid YAML: {error}"
        raise ValueError(msg) from error
    if not isinstance(config, dict) or "class_path" not in config:
        msg = f"Data config {path} needs a top-level 'class_path' (e.g. anomalib.data.MVTecAD) and 'init_args'."
        raise ValueError(msg)
    return config


def datamodule_class(class_path: str) -> type:
    """The anomalib datamodule class that ``class_path`` names (short anomalib names work too)."""
    from anomalib.data import AnomalibDataModule

    module_name, _, class_name = class_path.rpartition(".")
    found = getattr(importlib.import_module(module_name or "anomalib.data"), class_name, None)
    if not (isinstance(found, type) and issubclass(found, AnomalibDataModule)):
        msg = f"class_path '{class_path}' is not an anomalib datamodule (for example anomalib.data.MVTecAD or Folder)."
        raise ValueError(msg)
    return found


def several_categories(category: Any) -> bool:
    """``init_args.category`` names several categories: a list, or ``all``."""
    return isinstance(category, list) or category == "all"


def build_datamodule(config: dict[str, Any], seed: int) -> Any:
    """Instantiate the datamodule of a stock-CLI data config, for one category."""
    cls = datamodule_class(config["class_path"])
    init_args = dict(config.get("init_args") or {})
    if several_categories(init_args.get("category")):
        msg = (
            f"init_args.category {init_args['category']!r} names several categories; this command takes one "
            "(`reconpatch compare` runs each of a list, or all)."
        )
        raise ValueError(msg)
    init_args.setdefault("seed", seed)
    return cls(**init_args)


def split_categories(config: dict[str, Any], data: Path) -> dict[str, dict[str, Any]] | None:
    """One data config per category when ``init_args.category`` is a list or ``all``; None for a single one.

    ``all`` means the data set's own category list (``CATEGORIES`` of its anomalib dataset module), so
    MVTec AD gives its 15 categories whether or not they are all on disk yet.
    """
    init_args = config.get("init_args") or {}
    category = init_args.get("category")
    if not several_categories(category):
        return None
    if category == "all":
        cls = datamodule_class(config["class_path"])
        dataset_module = importlib.import_module(cls.__module__.replace(".datamodules.", ".datasets."))
        category = list(getattr(dataset_module, "CATEGORIES", []))
        if not category:
            msg = f"{data}: {cls.__name__} has no known category list for 'category: all'; list them instead."
            raise ValueError(msg)
    named = all(isinstance(c, str) and c not in {".", ".."} and Path(c).name == c for c in category)
    if not category or len(set(category)) != len(category) or not named:  # each name is a folder under --out
        msg = f"{data}: init_args.category {category!r} should list different category names, e.g. [bottle, cable]."
        raise ValueError(msg)
    return {name: {**config, "init_args": {**init_args, "category": name}} for name in category}


def make_evaluator() -> Any:
    """Anomalib's metrics: image AUROC and F1 (adaptive threshold), pixel AUROC and PRO (AUPRO to 30% FPR)."""
    from anomalib.metrics import AUPRO, AUROC, Evaluator, F1Score

    pro = AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", fpr_limit=0.3, strict=False)
    pro.name = "pixel_PRO"
    return Evaluator(
        test_metrics=[
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            F1Score(fields=["pred_label", "gt_label"], prefix="image_"),
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            pro,
        ]
    )


def image_shape(size: int | Sequence[int]) -> tuple[int, int]:
    """``256`` or ``(640, 256)`` -> (height, width): long, narrow parts keep their aspect ratio with two values."""
    shape = (size,) if isinstance(size, int) else tuple(size)
    shape = shape * 2 if len(shape) == 1 else shape
    if len(shape) != 2 or min(shape) < 32:
        msg = f"--image-size {size} is not a side or a height and width of at least 32 pixels (e.g. 256, or 640 256)."
        raise ValueError(msg)
    return shape


def build_model(name: str, settings: CompareSettings) -> Any:
    """ReConPatch or any anomalib memory-bank model by class name, on the shared settings."""
    import anomalib.models

    import anomalib_reconpatch  # noqa: F401 - registers anomalib.models.ReConPatch

    model_class = getattr(anomalib.models, name, None)
    if not isinstance(model_class, type):
        msg = f"Unknown model '{name}': use an anomalib model class name such as ReConPatch or Patchcore."
        raise ValueError(msg)
    kwargs: dict[str, Any] = {
        "backbone": settings.backbone,
        "layers": settings.layers,
        "coreset_sampling_ratio": settings.coreset_ratio,
        "pre_processor": model_class.configure_pre_processor(image_size=image_shape(settings.image_size)),
        "evaluator": make_evaluator(),
        "visualizer": False,
    }
    if model_class.__name__ == "ReConPatch":
        kwargs.update(settings.reconpatch_args)
    return model_class(**kwargs)


class PhaseTimer(Callback):
    """Times the model's ``fit`` and, for models that do not time it themselves (PatchCore), feature extraction.

    ReConPatch reports its own ``fit_timings["features_s"]``; ``run_one`` takes that one, so each phase
    has a single measurement.
    """

    def __init__(self) -> None:
        self.epoch_start = 0.0
        self.features_s = 0.0
        self.fit_s = 0.0

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Wrap the model's ``fit`` once so its duration is measured exactly."""
        del trainer
        if stage != "fit" or getattr(pl_module, "_timed_fit", False):
            return
        original: Callable[[], None] = pl_module.fit

        def timed_fit() -> None:
            start = time.perf_counter()
            self.features_s = start - self.epoch_start
            original()
            self.fit_s = time.perf_counter() - start

        pl_module.fit = timed_fit
        pl_module._timed_fit = True

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Feature extraction starts with the epoch."""
        del trainer, pl_module
        self.epoch_start = time.perf_counter()


class TestRecorder(Callback):
    """Keeps per-image scores, labels, paths and small anomaly maps of the test run."""

    def __init__(self) -> None:
        self.scores: list[float] = []
        self.labels: list[int] = []
        self.paths: list[str] = []
        self.maps: list[torch.Tensor] = []

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, *args: Any) -> None:
        """Record one batch of predictions."""
        del trainer, pl_module, args
        self.scores += outputs.pred_score.flatten().tolist()
        self.labels += outputs.gt_label.flatten().int().tolist()
        self.paths += list(outputs.image_path)
        maps = torch.nn.functional.interpolate(
            outputs.anomaly_map.reshape(-1, 1, *outputs.anomaly_map.shape[-2:]),
            size=(MAP_SIZE, MAP_SIZE),
            mode="bilinear",
        )
        self.maps += list(maps[:, 0].float().cpu())

    def saved(self) -> dict[str, list]:
        """The recorded outputs as plain lists and tensors, to pass from a run's process to the parent."""
        return {"scores": self.scores, "labels": self.labels, "paths": self.paths, "maps": self.maps}

    @classmethod
    def restore(cls, saved: dict[str, list]) -> TestRecorder:
        """The inverse of :meth:`saved`."""
        recorder = cls()
        recorder.scores, recorder.labels, recorder.paths, recorder.maps = (
            saved[key] for key in ("scores", "labels", "paths", "maps")
        )
        return recorder


@contextmanager
def peak_rss() -> Iterator[dict[str, float]]:
    """Sample this process's resident memory every 20 ms; yields a dict that gets ``peak_rss_mb``."""
    import psutil

    process, result, stop = psutil.Process(), {"peak_rss_mb": 0.0}, threading.Event()

    def sample() -> None:
        while not stop.is_set():
            result["peak_rss_mb"] = max(result["peak_rss_mb"], process.memory_info().rss / 2**20)
            stop.wait(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()


def latency_images(datamodule: Any, count: int) -> list[torch.Tensor]:
    """``count`` test images spread evenly over the test set, read from the dataset itself.

    No dataloader, so no worker processes exist while a model is timed (a live test iterator and its
    workers used to slow down whichever model was timed first).
    """
    dataset = datamodule.test_data
    indices = sorted({round(i * (len(dataset) - 1) / max(count - 1, 1)) for i in range(count)})
    return [dataset[i].image for i in indices]


def image_latency_ms(model: Any, images: list[torch.Tensor]) -> dict[str, float]:
    """Median per-image time of the full forward (pre-processing, model, post-processing) at batch size 1.

    Also split into ``backbone_ms``, ``search_ms`` and ``rest_ms`` (see ``latency.py``), after a warm-up.
    """
    model.eval()
    gc.collect()
    return split_latency_ms(model, model.model, images)


def run_one(
    name: str, settings: CompareSettings, seed: int, data_config: dict[str, Any], log: Callable[[str], None]
) -> dict:
    """Train and test one model with one seed (inside that run's own process).

    Returns plain data for the parent: its metrics and timings, anomalib's test metrics, the recorded
    test outputs, the fitted model's state and the fixed test images that ``compare`` times it on.
    """
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    seed_everything(seed, workers=True)
    datamodule = build_datamodule(data_config, seed)
    model = build_model(name, settings)
    timer, recorder = PhaseTimer(), TestRecorder()
    engine = Engine(
        default_root_dir=settings.out / "runs" / name / f"seed{seed}",
        logger=False,
        callbacks=[timer, recorder],
        enable_progress_bar=False,
    )
    with peak_rss() as memory:
        training = "representation training and " if name == "ReConPatch" else ""
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
        memory_bank=list(model.model.memory_bank.shape),
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


class RunFailedError(RuntimeError):
    """A run's process ended on an unexpected error; its traceback is on stderr, above this message."""


def describe_exit(code: int) -> str:
    """How a run's process ended, in words: a kill by the out-of-memory killer should say so."""
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
    """
    with tempfile.TemporaryDirectory(prefix="reconpatch-compare-") as folder:
        job, result = Path(folder) / "job.json", Path(folder) / "result.pt"
        spec = {"name": name, "seed": seed, "data_config": data_config, "settings": asdict(settings)}
        job.write_text(json.dumps(spec, default=str))
        command = [sys.executable, "-m", "anomalib_reconpatch.compare", str(job), str(result)]
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


def run_child(job: Path, result: Path) -> None:
    """The child's side of :func:`run_in_process`: read the job, run it, save plain data (or the user error)."""
    spec = json.loads(job.read_text())
    fields = spec["settings"]
    size = fields["image_size"]
    size = size if isinstance(size, int) else tuple(size)
    paths = {"data": Path(fields["data"]), "out": Path(fields["out"])}
    settings = CompareSettings(**{**fields, **paths, "image_size": size})
    fix_mmap_threshold()  # the same allocator setting for every run; see memory.py
    try:
        run = run_one(spec["name"], settings, spec["seed"], spec["data_config"], partial(print, flush=True))
    except tuple(USER_ERRORS.values()) as error:
        kind = next(name for name, error_type in USER_ERRORS.items() if isinstance(error, error_type))
        run = {"error": kind, "message": str(error)}
    except URLError as error:
        run = {"error": "FileNotFoundError", "message": download_failure(error, spec["data_config"], settings.data)}
    torch.save(run, result)


def download_failure(error: URLError, data_config: dict[str, Any], data: Path) -> str:
    """What to do when anomalib tried to download a data set that is not on disk, and could not."""
    root = (data_config.get("init_args") or {}).get("root", "the data root")
    return (
        f"The data set is not under {root} (init_args.root in {data}), and anomalib's attempt to download it "
        f"failed ({error.reason}). Point root at the folder that holds your data set; for the demo data, "
        f"write it first with `reconpatch demo-data {root}`."
    )


def versions() -> dict[str, Any]:
    """Library versions and CPU count, for the report."""
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


def markdown_table(models: dict[str, dict]) -> str:
    """Side-by-side table; the difference column is first model minus second."""
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
    """Each model's numbers averaged over seeds or categories; non-float values (bank shape) come from the first."""
    runs = list(per_run.values())
    means = {}
    for name, first in runs[0].items():
        means[name] = {
            key: statistics.fmean(run[name][key] for run in runs) if isinstance(value, float) else value
            for key, value in first.items()
        }
    return means


def spread_over_seeds(per_seed: dict[int, dict[str, dict]]) -> dict[str, dict[str, float]]:
    """Sample standard deviation of each model's metrics over the seeds (needs two or more)."""
    runs = list(per_seed.values())
    return {name: {key: statistics.stdev(run[name][key] for run in runs) for key in METRIC_KEYS} for name in runs[0]}


def seed_table(per_seed: dict[int, dict[str, dict]], spread: dict[str, dict[str, float]]) -> str:
    """Per-metric rows: each model's value for every seed, in order, and their standard deviation."""
    names = list(spread)
    rows = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key in METRIC_KEYS:
        cells = [
            " / ".join(f"{run[name][key]:.3f}" for run in per_seed.values()) + f" (sd {spread[name][key]:.3f})"
            for name in names
        ]
        rows.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot_roc(recorders: dict[str, TestRecorder], path: Path) -> None:
    """Image-level ROC curves of all models in one figure."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(5, 5))
    for name, rec in recorders.items():
        if len(set(rec.labels)) < 2:
            continue
        fpr, tpr, _ = roc_curve(rec.labels, rec.scores)
        ax.plot(fpr, tpr, label=f"{name} (AUROC {roc_auc_score(rec.labels, rec.scores):.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="Image-level ROC")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pick_examples(rec: TestRecorder, count: int = 6) -> list[int]:
    """A few anomalous images (one per defect folder first) and two normal ones, deterministic."""
    by_folder: dict[str, list[int]] = {}
    for i in sorted(range(len(rec.paths)), key=lambda i: rec.paths[i]):
        by_folder.setdefault(Path(rec.paths[i]).parent.name, []).append(i)
    normal = [i for i in range(len(rec.labels)) if rec.labels[i] == 0]
    anomalous = [ids[0] for ids in by_folder.values() if rec.labels[ids[0]] == 1]
    picked = anomalous[: count - 2] + sorted(normal, key=lambda i: rec.paths[i])[:2]
    return picked[:count]


def find_mask(image_path: str) -> Path | None:
    """The MVTec-style ground-truth mask of a test image, if there is one."""
    path = Path(image_path)
    for candidate in (
        path.parents[2] / "ground_truth" / path.parent.name / f"{path.stem}_mask.png",
        path.parents[2] / "ground_truth" / path.parent.name / f"{path.stem}.png",
    ):
        if candidate.is_file():
            return candidate
    return None


def heatmap_figure(recorders: dict[str, TestRecorder]) -> Any:
    """Grid: each row one test image, then each model's anomaly map, then the ground-truth mask.

    Each model's maps share one colour scale, its lowest to its highest value over the whole test
    set, so a good image's map looks as cool as it is (per-image scaling painted good images red).
    """
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    first = next(iter(recorders.values()))
    rows = pick_examples(first)
    names = list(recorders)
    scales = {
        name: (float(min(m.min() for m in rec.maps)), float(max(m.max() for m in rec.maps)))
        for name, rec in recorders.items()
    }
    fig, axes = plt.subplots(
        len(rows), len(names) + 2, figsize=(2.2 * (len(names) + 2), 2.2 * len(rows)), squeeze=False
    )
    for r, index in enumerate(rows):
        image_path = first.paths[index]
        axes[r, 0].imshow(Image.open(image_path).convert("RGB").resize((MAP_SIZE, MAP_SIZE)))
        axes[r, 0].set_title(f"{Path(image_path).parent.name}/{Path(image_path).name}", fontsize=7)
        for c, name in enumerate(names, start=1):
            rec = recorders[name]
            j = rec.paths.index(image_path)
            low, high = scales[name]
            axes[r, c].imshow(rec.maps[j], cmap="jet", vmin=low, vmax=high)
            axes[r, c].set_title(f"{name} {rec.scores[j]:.2f}", fontsize=7)
        mask = find_mask(image_path)
        blank = Image.new("L", (MAP_SIZE, MAP_SIZE))
        axes[r, -1].imshow(Image.open(mask).convert("L").resize((MAP_SIZE, MAP_SIZE)) if mask else blank, cmap="gray")
        axes[r, -1].set_title("ground truth", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return fig


def plot_heatmaps(recorders: dict[str, TestRecorder], path: Path) -> None:
    """Write :func:`heatmap_figure` to ``path``."""
    import matplotlib.pyplot as plt

    fig = heatmap_figure(recorders)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def settings_record(settings: CompareSettings, data_config: dict[str, Any]) -> dict[str, Any]:
    """The settings as report.json holds them: paths as text, and the data config that was read."""
    return {**asdict(settings), "data": str(settings.data), "out": str(settings.out), "data_config": data_config}


CATEGORY_COLUMNS = ("image_AUROC", "pixel_AUROC", "pixel_PRO", "fit_s", "latency_ms")


def category_table(per_category: dict[str, dict[str, dict]]) -> str:
    """One row per category (linked to its own report), each cell every model's value in order."""
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
    """``report.json`` and ``report.md`` over the categories: the means over them, and each category's numbers."""
    per_category = {category: result["report"]["models"] for category, result in results.items()}
    means = {
        name: {key: value for key, value in model.items() if isinstance(value, float)}
        for name, model in mean_over_runs(per_category).items()
    }
    report = {
        "models": means,
        "per_category": per_category,
        "settings": settings_record(settings, data_config),
        "versions": versions(),
    }
    (settings.out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    table = markdown_table(means)
    text = (
        f"# ReConPatch vs PatchCore on {settings.data}, {len(per_category)} categories\n\n"
        f"Each number is the mean over the categories (seeds {', '.join(map(str, settings.seeds))}); every "
        "category's own report, with its figures, is in its folder.\n\n"
        f"{table}\n\nPer category:\n\n{category_table(per_category)}\n"
    )
    (settings.out / "report.md").write_text(text)
    log(f"\nMean over {len(per_category)} categories:\n{table}")
    log(f"\nReport: {settings.out / 'report.md'} (one folder per category)")
    return report


def compare(settings: CompareSettings, log: Callable[[str], None] = print) -> dict:
    """Run every model, write report.json, report.md, roc.png and heatmaps.png into ``settings.out``.

    With several categories (``init_args.category`` a list or ``all``) each category gets those files
    in ``settings.out/CATEGORY``, and ``settings.out`` gets the summary over the categories.
    """
    data_config = load_datamodule_config(settings.data)
    image_shape(settings.image_size)  # a bad size fails here, not after the first model's fit
    if not settings.seeds or len(set(settings.seeds)) != len(settings.seeds):
        msg = f"--seed {' '.join(map(str, settings.seeds))}: give one or more different seeds (e.g. --seed 0 1 2)."
        raise ValueError(msg)
    categories = split_categories(data_config, settings.data)
    for config in (categories or {"": data_config}).values():
        build_datamodule(config, settings.seeds[0])  # bad data or model settings fail here, before any run
    fresh = {name: build_model(name, settings) for name in settings.models}  # take the fitted states for latency
    if categories is None:
        return compare_data(settings, data_config, fresh, log)
    results = {}
    for category, config in categories.items():
        log(f"[{category}] category {len(results) + 1} of {len(categories)}")
        results[category] = compare_data(replace(settings, out=settings.out / category), config, fresh, log)
    return {"report": write_category_summary(settings, data_config, results, log), "categories": results}


def compare_data(
    settings: CompareSettings, data_config: dict[str, Any], fresh: dict[str, Any], log: Callable[[str], None]
) -> dict:
    """:func:`compare` on one datamodule; ``fresh`` holds one unfitted model per name, to time latency with."""
    settings.out.mkdir(parents=True, exist_ok=True)
    first, *more = settings.seeds
    per_seed: dict[int, dict[str, dict]] = {}
    engine_metrics: dict[int, dict[str, dict]] = {}
    runs: dict[str, dict] = {}
    for seed in settings.seeds:
        for name in settings.models:
            run = run_in_process(name, settings, seed, data_config, log)
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
    report = {
        "models": models,
        "per_seed": per_seed,
        "spread": spread,
        "settings": settings_record(settings, data_config),
        "versions": versions(),
    }
    (settings.out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    recorders = {name: TestRecorder.restore(run["outputs"]) for name, run in runs.items()}
    plot_roc(recorders, settings.out / "roc.png")
    plot_heatmaps(recorders, settings.out / "heatmaps.png")
    table = markdown_table(models)
    category = (data_config.get("init_args") or {}).get("category")
    title = f"# ReConPatch vs PatchCore on {settings.data}{f' ({category})' if category else ''}\n\n"
    seeds_text = f"seed {first}"
    if more:
        seeds_text = (
            f"seeds {', '.join(map(str, settings.seeds))} (each number is the mean over the seeds; latency and "
            f"figures come from seed {first}'s models)"
        )
    setup = (
        f"Backbone `{settings.backbone}` {settings.layers}, {'x'.join(map(str, image_shape(settings.image_size)))} px "
        f"(height x width), coreset ratio "
        f"{settings.coreset_ratio}, {seeds_text}; {report['versions']}.\n\n"
        "pixel_PRO is anomalib's AUPRO up to 30% false-positive rate. Times in seconds; latency_ms is the median "
        f"per-image time at batch 1 over {settings.latency_images} fixed test images and 3 rounds that time every "
        "model in turn, after all fits (pre- and post-processing included), split into backbone_ms (feature "
        "extractor), search_ms (nearest memory-bank search) and rest_ms (the remainder); peak_rss_mb is the "
        "resident memory of the run's own process (every model and seed is fitted and tested in a fresh one), "
        "sampled every 20 ms during its fit and test. In heatmaps.png each model's maps share one colour scale, "
        "from its lowest to its highest value over the whole test set.\n\n"
    )
    if spread:
        table += "\n\nPer seed (" + ", ".join(map(str, settings.seeds)) + "):\n\n" + seed_table(per_seed, spread)
    (settings.out / "report.md").write_text(
        title + setup + table + "\n\n![ROC](roc.png)\n\n![heatmaps](heatmaps.png)\n"
    )
    log("\n" + table)
    log(f"\nReport: {settings.out / 'report.md'} (raw numbers in report.json, roc.png, heatmaps.png)")
    return {"report": report, "engine_metrics": engine_metrics[first], "engine_metrics_per_seed": engine_metrics}


if __name__ == "__main__":
    run_child(Path(sys.argv[1]), Path(sys.argv[2]))
