"""What the benchmark scripts share: the data arguments, the backbone pass over a split, scoring and metrics."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import torch

from anomalib_reconpatch import ReConPatch
from anomalib_reconpatch.tools.compare import build_datamodule, image_shape, load_datamodule_config


def short_names(backbones: Iterable[str]) -> str:
    """Backbone names joined with " + ", without the ``tf_efficientnet_`` prefix that they all share."""
    return " + ".join(name.removeprefix("tf_efficientnet_") for name in backbones)


def data_parser(description: str | None) -> argparse.ArgumentParser:
    """A parser with ``--data`` (a datamodule YAML), ``--backbone`` and ``--layers``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--layers", nargs="+", default=["blocks.2", "blocks.4"])
    parser.add_argument("--image-size", type=int, nargs="+", default=[256], help="a side, or a height and a width")
    return parser


def write_report(report: str, out: Path | None) -> None:
    """Print a benchmark's Markdown report and, with ``out``, write it there, creating its folder."""
    print(report)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)


def fit_in_scratch(model: object, datamodule: object, callbacks: list | None = None) -> float:
    """Fit ``model`` through anomalib's Engine in a throwaway folder; the seconds ``engine.fit`` took.

    No logger, progress bar or validation pass, as every fit-timing benchmark runs it.
    """
    import tempfile

    from anomalib.engine import Engine

    with tempfile.TemporaryDirectory() as root:
        engine = Engine(
            default_root_dir=root, logger=False, enable_progress_bar=False, limit_val_batches=0, callbacks=callbacks
        )
        start = time.perf_counter()
        engine.fit(model=model, datamodule=datamodule)
        return time.perf_counter() - start


@contextmanager
def busy_processes(count: int) -> Iterator[None]:
    """``count`` busy-looping Python processes, one core's work each, while the block runs.

    They compete for cores without touching memory bandwidth; they start a second before the block.
    """
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(1 if busy else 0)
        yield
    finally:
        for process in busy:
            process.kill()
            process.wait()


def load_data(args: argparse.Namespace, **model_args: object) -> tuple:
    """The set-up datamodule of ``--data`` and a ReConPatch on ``--backbone``/``--layers``/``--image-size``."""
    datamodule = build_datamodule(load_datamodule_config(args.data), seed=0)
    datamodule.setup()
    pre_processor = ReConPatch.configure_pre_processor(image_size=image_shape(args.image_size))
    return datamodule, ReConPatch(backbone=args.backbone, layers=args.layers, pre_processor=pre_processor, **model_args)


@torch.no_grad()
def cache(model: ReConPatch, loader: torch.utils.data.DataLoader, test: bool) -> dict:
    """Raw patch features of a whole split, plus labels and image-size masks for a test split.

    anomalib's training loader shuffles with torch's global generator, and the rows' order decides which
    patches each seed's training batches and coreset start draw: the loop runs under a generator seeded
    with 0, so every process caches the same rows in the same order and a table's rows can be rerun.
    """
    transform = model.pre_processor.transform
    out: dict[str, list] = {"features": [], "labels": [], "masks": []}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for batch in loader:
            images = transform(batch.image)
            out["features"].append(model.model.patch_features(images))
            if test:
                out["labels"].append(batch.gt_label)
                masks = batch.gt_mask.float().reshape(len(images), 1, *batch.gt_mask.shape[-2:])
                out["masks"].append(
                    torch.nn.functional.interpolate(masks, size=images.shape[-2:], mode="nearest")[:, 0]
                )
    return {k: torch.cat(v) for k, v in out.items() if v}


def flat_patches(features: torch.Tensor) -> torch.Tensor:
    """``B x D x h x w`` -> ``(B h w) x D`` patch rows."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


def patchcore_bank(train_patches: torch.Tensor, ratio: float) -> torch.Tensor:
    """Stock PatchCore's memory bank at ``ratio``, chosen by our greedy k-center from ReConPatch's raw patch features.

    Those features are PatchCore's own (same extractor, pooling and resizing), and inference time
    depends only on the bank's size: anomalib's ``KCenterGreedy`` would take about 45 minutes at
    ratio 0.1 on bottle here.
    """
    from anomalib_reconpatch.components.coreset import FastKCenterGreedy

    return FastKCenterGreedy(train_patches, ratio).sample_coreset()


@torch.no_grad()
def score(model: ReConPatch, features: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Image scores and anomaly maps from cached patch features, through the model's own ``score_features``.

    The search is the model's own ``search_bank``, so its ``search`` setting applies.
    """
    outputs = [model.model.score_features(chunk, size) for chunk in features.split(16)]
    return torch.cat([o.pred_score for o in outputs]), torch.cat([o.anomaly_map for o in outputs])


def load_test_split(datamodule: object, image_size: list[int]) -> tuple[torch.Tensor, dict]:
    """The whole pre-processed test split as one tensor, with labels and masks at the model's image size."""
    test = list(datamodule.test_dataloader())
    images = torch.cat([b.image for b in test])
    masks = torch.cat([b.gt_mask.float().reshape(len(b.image), 1, *b.gt_mask.shape[-2:]) for b in test])
    truth = {
        "labels": torch.cat([b.gt_label for b in test]),
        "masks": torch.nn.functional.interpolate(masks, size=image_shape(image_size), mode="nearest")[:, 0],
    }
    return images, truth


def evaluate(scores: torch.Tensor, maps: torch.Tensor, test: dict, pixel: bool = True) -> dict[str, float]:
    """Anomalib's image AUROC and, with ``pixel``, pixel AUROC and PRO (AUPRO to 30% FPR) of a cached test split."""
    from anomalib.metrics import AUPRO, AUROC

    # torchmetrics squashes values outside [0, 1] with a sigmoid: min-max them first, as anomalib's
    # post-processor does (a monotonic map, so the AUROC and PRO values are unchanged by it).
    scores, maps = (
        (scores - scores.min()) / (scores.max() - scores.min()),
        (maps - maps.min()) / (maps.max() - maps.min()),
    )
    outputs = SimpleNamespace(
        pred_score=scores,
        gt_label=test["labels"],
        anomaly_map=maps.reshape(len(maps), *maps.shape[-2:]),
        gt_mask=test["masks"].int(),
    )
    metrics = {"image_AUROC": AUROC(fields=["pred_score", "gt_label"])}
    if pixel:
        metrics["pixel_AUROC"] = AUROC(fields=["anomaly_map", "gt_mask"])
        metrics["PRO"] = AUPRO(fields=["anomaly_map", "gt_mask"], fpr_limit=0.3)
    for metric in metrics.values():
        metric.update(outputs)
    return {name: float(metric.compute()) for name, metric in metrics.items()}


METRIC_COLUMNS = (("image AUROC", "image_AUROC", 4), ("pixel AUROC", "pixel_AUROC", 4), ("PRO", "PRO", 4))


def mean_sd_table(first: str, rows: dict[str, list[dict[str, float]]], columns: tuple = METRIC_COLUMNS) -> str:
    """Markdown table of each row's mean ± sd over its runs (sd with ``n - 1``; no sd for one run).

    ``columns`` holds ``(heading, key, digits)``; ``first`` heads the column of row names. A metric that a
    row's runs do not have is shown as a dash.
    """
    lines = [
        f"| {first} | runs | " + " | ".join(heading for heading, _, _ in columns) + " |",
        "|---" * (len(columns) + 2) + "|",
    ]
    for name, runs in rows.items():
        cells = []
        for _, key, digits in columns:
            if any(key not in run for run in runs):
                cells.append("–")
                continue
            values = torch.tensor([run[key] for run in runs], dtype=torch.float64)
            spread = f" ± {values.std():.{digits}f}" if len(values) > 1 else ""
            cells.append(f"{values.mean():.{digits}f}{spread}")
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
