"""Failing loudly on bad numbers, and giving the same answer twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from anomalib_reconpatch import ReConPatch, ReConPatchModel

from .conftest import BACKBONE, LAYERS, interruptible
from .test_export import snapshot
from .test_model import demo_images


@pytest.fixture(scope="module")
def demo_features(lite_weights: None, demo_root: Path) -> torch.Tensor:
    """Raw patch features of eight real demo images."""
    features = ReConPatchModel(BACKBONE, LAYERS).patch_features(demo_images(demo_root, count=8))
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


def small_model(**kwargs: object) -> ReConPatch:
    return ReConPatch(backbone=BACKBONE, layers=LAYERS, num_steps=20, coreset_sampling_ratio=0.02, **kwargs)


def fit_on(model: ReConPatch, features: torch.Tensor) -> None:
    model.feature_store = [features.clone()]
    model.fit()


def test_non_finite_features_stop_before_training(lite_weights: None, demo_features: torch.Tensor) -> None:
    features = demo_features.clone()
    features[5, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or inf patch features"):
        fit_on(small_model(), features)


def test_diverging_loss_names_the_step(lite_weights: None, demo_features: torch.Tensor) -> None:
    model = small_model(learning_rate=1e30)
    threads = torch.get_num_threads()
    with pytest.raises(FloatingPointError, match=r"diverged at step \d+/20"):
        fit_on(model, demo_features)
    assert model.model.memory_bank.numel() == 0  # no bank of NaNs left behind
    assert torch.get_num_threads() == threads  # restored, though the next labels were under way on another thread


def test_too_few_patches_for_k(lite_weights: None, demo_features: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="needs more than k=5 training patches"):
        fit_on(small_model(), demo_features[:5])


def test_same_seed_same_bank_and_scores(lite_weights: None, demo_features: torch.Tensor, demo_root: Path) -> None:
    banks, scores = [], []
    images = demo_images(demo_root, "test/stain", 2)
    for _ in range(2):
        torch.manual_seed(123)
        model = small_model()
        fit_on(model, demo_features)
        banks.append(model.model.memory_bank.clone())
        with torch.no_grad():
            scores.append(model.model.eval()(images).pred_score)
    assert torch.equal(banks[0], banks[1])
    assert torch.equal(scores[0], scores[1])


RUN_SCRIPT = """
import sys, time
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from anomalib_reconpatch import ReConPatch
from anomalib_reconpatch.components.coreset import FastKCenterGreedy

root, results, out, steps, slowed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]


def mark(text):  # a phase marker for the test, which signals the run when it reads one
    print(text, file=sys.stderr, flush=True)


training_step, train_representation = ReConPatch.training_step, ReConPatch.train_representation
sample_coreset = FastKCenterGreedy.sample_coreset


def marked_training_step(self, batch, *args, **kwargs):
    mark("phase features")
    if slowed == "phase features":
        time.sleep(0.5)  # the signal lands while features are being extracted
    return training_step(self, batch, *args, **kwargs)


def marked_training(self, features, on_step=None):
    def announce(state):
        if state.step % 50 == 49:
            mark(f"phase representation step {state.step + 1}/{steps}")

    return train_representation(self, features, on_step=announce)


def marked_coreset(self, progress=None):
    def announce(selected):
        mark(f"phase coreset {selected}")
        if slowed == "phase coreset":
            time.sleep(0.5)  # the signal lands mid-selection
        progress(selected)

    return sample_coreset(self, progress=announce)


ReConPatch.training_step, ReConPatch.train_representation = marked_training_step, marked_training
FastKCenterGreedy.sample_coreset = marked_coreset
torch.manual_seed(0)
datamodule = MVTecAD(root=root, category="brick", num_workers=0, train_batch_size=8)
model = ReConPatch(
    backbone="tf_efficientnet_lite0", layers=["blocks.2", "blocks.4"], num_steps=steps,
    patches_per_step=256, coreset_sampling_ratio=0.02, feature_memory_mb=0,
)
engine = Engine(default_root_dir=results, logger=False, enable_progress_bar=False)
engine.fit(model=model, datamodule=datamodule)
predictions = engine.predict(model=model, datamodule=datamodule)
scores = torch.cat([p.pred_score for p in predictions])
torch.save({"bank": model.model.memory_bank, "scores": scores}, out)
"""
STEPS = 400  # the script announces every 50th step, so a signal can come mid-training


@dataclass
class Run:
    """How a training subprocess ended: the marker line it was signalled at, its exit code and its last lines."""

    marker: str
    returncode: int
    seconds_after_signal: float
    tail: str


def run_training(root: Path, results: Path, out: Path, tmp: Path, signal_at: tuple[str, int] | None = None) -> Run:
    """Train in a fresh interpreter (features spilled to ``tmp``); with ``signal_at=(text, signal)``, send
    that signal at the first marker line containing the text, and wait for the process to end. Only the
    phase to be signalled pauses at its markers, so runs without a signal take no pauses."""
    tmp.mkdir(exist_ok=True)
    slowed = signal_at[0] if signal_at is not None else ""
    command = [sys.executable, "-u", "-c", RUN_SCRIPT, str(root), str(results), str(out), str(STEPS), slowed]
    env = {**os.environ, "TMPDIR": str(tmp)}
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=interruptible
    )
    lines, marker, sent = [], "", 0.0
    for line in process.stderr:
        lines.append(line)
        if signal_at is not None and not marker and signal_at[0] in line:
            marker, sent = line.strip(), time.perf_counter()
            os.kill(process.pid, signal_at[1])
    returncode = process.wait()
    seconds = time.perf_counter() - sent if marker else 0.0
    return Run(marker, returncode, seconds, "".join(lines[-30:]))


def spill_folders(tmp: Path) -> list[Path]:
    return sorted(tmp.glob("reconpatch-features-*"))


@pytest.mark.slow
def test_training_killed_mid_representation_reruns_to_the_same_result_and_removes_the_orphaned_spill(
    lite_weights: None, demo_root: Path, tmp_path: Path
) -> None:
    results, tmp = tmp_path / "results", tmp_path / "tmp"
    killed = run_training(demo_root, results, tmp_path / "killed.pt", tmp, ("representation step", signal.SIGKILL))
    assert killed.marker, f"training ended before a representation step: raise STEPS\n{killed.tail}"
    step = int(killed.marker.split("representation step ")[1].split("/")[0])
    assert 0 < step < STEPS, f"not killed during the representation phase: {killed.marker!r}"
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed.pt").exists()
    assert len(spill_folders(tmp)) == 1  # no finalizer runs after SIGKILL
    rerun = run_training(demo_root, results, tmp_path / "rerun.pt", tmp)  # same results folder, leftovers and all
    assert rerun.returncode == 0, rerun.tail
    assert spill_folders(tmp) == []  # the rerun removed the dead run's spill, then its own
    clean = run_training(demo_root, tmp_path / "clean", tmp_path / "clean.pt", tmp_path / "tmp-clean")
    assert clean.returncode == 0, clean.tail
    rerun_result, clean_result = torch.load(tmp_path / "rerun.pt"), torch.load(tmp_path / "clean.pt")
    assert rerun_result["bank"].shape[0] > 0
    assert torch.equal(rerun_result["bank"], clean_result["bank"])
    assert torch.equal(rerun_result["scores"], clean_result["scores"])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("phase", "signal_number", "returncode"),
    [
        ("phase features", signal.SIGTERM, 143),
        ("phase representation", signal.SIGTERM, 143),
        ("phase coreset", signal.SIGTERM, 143),
        ("phase features", signal.SIGINT, 1),
        ("phase representation", signal.SIGINT, 1),
        ("phase coreset", signal.SIGINT, 1),
        ("phase features", signal.SIGKILL, -signal.SIGKILL),  # before the first batch's features are stored
        ("phase coreset", signal.SIGKILL, -signal.SIGKILL),  # after fit has closed the spill
    ],
)
def test_a_signal_in_any_phase_stops_training_at_once_without_a_checkpoint_or_temporary_files(
    lite_weights: None, demo_root: Path, tmp_path: Path, phase: str, signal_number: int, returncode: int
) -> None:
    """SIGKILL runs no clean-up; in these two phases no spill file exists (mid-training: the test above)."""
    before = snapshot(demo_root)
    results, tmp = tmp_path / "results", tmp_path / "tmp"
    run = run_training(demo_root, results, tmp_path / "out.pt", tmp, (phase, signal_number))
    assert run.marker, f"the run never reached {phase!r}:\n{run.tail}"
    assert run.returncode == returncode, run.tail
    assert run.seconds_after_signal < 20, f"the run went on for {run.seconds_after_signal:.0f} s after the signal"
    assert not (tmp_path / "out.pt").exists()
    assert not list(results.rglob("*.ckpt"))
    assert spill_folders(tmp) == []
    assert snapshot(demo_root) == before
