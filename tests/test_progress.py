"""Representation training and the coreset show in the progress bar that ``anomalib train`` draws."""

from __future__ import annotations

from pathlib import Path

import pytest
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

from anomalib_reconpatch import ReConPatch
from anomalib_reconpatch.components.progress import fit_progress

from .conftest import BACKBONE, LAYERS

STEPS = 12


def fit_demo(root: Path, out: Path, callbacks: list) -> tuple[ReConPatch, Engine]:
    model = ReConPatch(
        backbone=BACKBONE, layers=LAYERS, num_steps=STEPS, patches_per_step=64, coreset_sampling_ratio=0.05
    )
    datamodule = MVTecAD(root=root, category="brick", train_batch_size=8, eval_batch_size=8, num_workers=0)
    engine = Engine(default_root_dir=out, logger=False, callbacks=callbacks)
    engine.fit(model=model, datamodule=datamodule)
    return model, engine


def test_rich_bar_gets_a_task_per_phase_with_the_loss(lite_weights: None, demo_root: Path, tmp_path: Path) -> None:
    del lite_weights
    bar = RichProgressBar()
    model, _ = fit_demo(demo_root, tmp_path, [bar])
    tasks = {task.description.split(" loss")[0]: task for task in bar.progress.tasks}
    representation = tasks["ReConPatch representation"]
    assert representation.completed == representation.total == STEPS
    assert " loss " in representation.description
    coreset = tasks["ReConPatch coreset"]
    assert coreset.completed == coreset.total == model.model.memory_bank.shape[0]


def test_tqdm_bar_shows_both_phases(
    lite_weights: None, demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    del lite_weights
    model, _ = fit_demo(demo_root, tmp_path, [TQDMProgressBar()])
    shown = capsys.readouterr().err
    assert "ReConPatch representation: 100%" in shown
    assert "loss=" in shown
    rows = model.model.memory_bank.shape[0]
    assert "ReConPatch coreset: 100%" in shown
    assert f"{rows}/{rows}" in shown


def test_without_a_trainer_nothing_is_drawn(capsys: pytest.CaptureFixture) -> None:
    with fit_progress(None, "phase", total=3) as update:
        for step in range(3):
            update(step + 1, loss=0.5)
    shown = capsys.readouterr()
    assert shown.out == shown.err == ""
