"""Shared fixtures: offline weights, the demo data set and the real data sets (skipped when absent)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
BOTTLE = SHARED_DATA / "mvtec_ad" / "bottle"
KOLEKTOR = SHARED_DATA / "kolektorsdd" / "kolektor"
BACKBONE = "tf_efficientnet_lite0"
LAYERS = ["blocks.2", "blocks.4"]
DEMO_SETTINGS = {"backbone": BACKBONE, "layers": LAYERS, "num_steps": 20, "coreset_sampling_ratio": 0.02}
"""The small ReConPatch that the end-to-end tests train on the demo brick category."""


def interruptible() -> None:
    """``preexec_fn`` of a child that a test interrupts: SIGINT back to its default action.

    A shell that starts the tests as a background job ignores SIGINT, children inherit that, and
    Python then installs no KeyboardInterrupt handler, so the signal would be lost.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="session")
def lite_weights() -> None:
    """Install the offline EfficientNet-Lite0 weights (idempotent) so backbones load with real weights."""
    from anomalib_reconpatch.tools.weights import write_lite_weights

    write_lite_weights(0)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo data set (brick, grass), written once per session."""
    from anomalib_reconpatch.tools.demo_data import write_demo_dataset

    root = tmp_path_factory.mktemp("demo")
    write_demo_dataset(root, ("brick", "grass"))
    return root


@pytest.fixture(scope="session")
def bottle_root() -> Path:
    """MVTec AD bottle from ../shared/data; the test is skipped where it is absent."""
    if not BOTTLE.is_dir():
        pytest.skip(f"real data not found at {BOTTLE}")
    return BOTTLE.parent


def train_demo(root: Path, results: Path, **overrides: object) -> tuple:
    """A small ReConPatch fitted by anomalib's Engine on ``root/brick``, seeded so runs are comparable.

    Returns:
        tuple: The model, its engine and its datamodule.
    """
    import torch
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine

    from anomalib_reconpatch import ReConPatch

    torch.manual_seed(0)
    datamodule = MVTecAD(root=root, category="brick", num_workers=0)
    model = ReConPatch(**{**DEMO_SETTINGS, **overrides})
    engine = Engine(default_root_dir=results, logger=False)
    engine.fit(model=model, datamodule=datamodule)
    return model, engine, datamodule


@pytest.fixture(scope="session")
def demo_model(lite_weights: None, demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The demo brick model, trained once per session: fitted, checkpointed and exported to OpenVINO FP32.

    Training and the export take most of a minute each, so the export and bad-input tests share it.
    """
    root = tmp_path_factory.mktemp("demo_model")
    model, engine, datamodule = train_demo(demo_root, root / "results")
    engine.trainer.save_checkpoint(root / "model.ckpt")
    xml = model.eval().to_openvino(root / "openvino")
    return {
        "model": model,
        "engine": engine,
        "datamodule": datamodule,
        "ckpt": root / "model.ckpt",
        "xml": xml,
        "root": root,
    }
