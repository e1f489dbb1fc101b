"""Shared fixtures: offline weights, the demo data set and the real data sets (skipped when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
BOTTLE = SHARED_DATA / "mvtec_ad" / "bottle"
KOLEKTOR = SHARED_DATA / "kolektorsdd" / "kolektor"
BACKBONE = "tf_efficientnet_lite0"
LAYERS = ["blocks.2", "blocks.4"]


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
