"""Lightning callbacks of a compare run: the fit's phase clock and the test outputs the figures need."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

MAP_SIZE = 128
"""Side, in pixels, to which recorded anomaly maps are resized, to keep the recorded outputs small."""


class PhaseTimer(Callback):
    """Times the model's ``fit`` and, for models that do not time it themselves (PatchCore), feature extraction.

    ReConPatch reports its own ``fit_timings["features_s"]``; ``run_one`` takes that one, so each phase
    has a single measurement.

    Attributes:
        epoch_start (float): ``time.perf_counter()`` at the start of the training epoch.
        features_s (float): Seconds from the epoch's start to the model's ``fit`` (feature extraction).
        fit_s (float): Seconds spent in the model's ``fit``.
    """

    def __init__(self) -> None:
        self.epoch_start = 0.0
        self.features_s = 0.0
        self.fit_s = 0.0

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Wrap the model's ``fit`` once so its duration is measured exactly.

        Args:
            trainer (Trainer): Unused.
            pl_module (LightningModule): The model whose ``fit`` is wrapped (marked so it is wrapped once).
            stage (str): Lightning's stage; only ``fit`` wraps.
        """
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
        """Note the epoch's start time: feature extraction starts with the epoch.

        Args:
            trainer (Trainer): Unused.
            pl_module (LightningModule): Unused.
        """
        del trainer, pl_module
        self.epoch_start = time.perf_counter()


class TestRecorder(Callback):
    """Keeps per-image scores, labels, paths and small anomaly maps of the test run, for the figures.

    Attributes:
        scores (list[float]): Image scores, in test order.
        labels (list[int]): Ground-truth labels (1 anomalous).
        paths (list[str]): Image paths.
        maps (list[torch.Tensor]): ``MAP_SIZE x MAP_SIZE`` float32 anomaly maps on the CPU.
    """

    def __init__(self) -> None:
        self.scores: list[float] = []
        self.labels: list[int] = []
        self.paths: list[str] = []
        self.maps: list[torch.Tensor] = []

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, *args: Any) -> None:
        """Record one batch of predictions.

        Args:
            trainer (Trainer): Unused.
            pl_module (LightningModule): Unused.
            outputs (Any): The batch's anomalib predictions (``pred_score``, ``gt_label``, ``image_path``,
                ``anomaly_map``).
            *args (Any): The batch and its indices, unused.
        """
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
        """Return the recorded outputs as plain lists and tensors, to pass from a run's process to the parent.

        Returns:
            dict[str, list]: ``scores``, ``labels``, ``paths`` and ``maps``.
        """
        return {"scores": self.scores, "labels": self.labels, "paths": self.paths, "maps": self.maps}

    @classmethod
    def restore(cls, saved: dict[str, list]) -> TestRecorder:
        """Rebuild a recorder from :meth:`saved`'s output.

        Args:
            saved (dict[str, list]): What :meth:`saved` returned.

        Returns:
            TestRecorder: A recorder holding those outputs.
        """
        recorder = cls()
        recorder.scores, recorder.labels, recorder.paths, recorder.maps = (
            saved[key] for key in ("scores", "labels", "paths", "maps")
        )
        return recorder
