"""Offline EfficientNet-Lite weights: strict remap, idempotent writes, and a real classification."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from anomalib_reconpatch.tools.weights import timm_lite_state_dict, write_lite_weights


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_remap_loads_strictly(variant: int) -> None:
    state = timm_lite_state_dict(variant)  # load_state_dict(strict=True) inside
    assert "blocks.0.0.conv_dw.weight" in state
    assert "classifier.weight" in state


def test_write_respects_hf_home_and_is_idempotent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    first = write_lite_weights(0)
    assert first.changed
    assert first.path.is_relative_to(tmp_path / "hub" / "models--timm--tf_efficientnet_lite0.in1k" / "snapshots")
    mtime = first.path.stat().st_mtime_ns
    second = write_lite_weights(0)
    assert not second.changed
    assert second.path == first.path
    assert first.path.stat().st_mtime_ns == mtime


CLASSIFY = """
import timm, torch
from skimage import data
model = timm.create_model("tf_efficientnet_lite0", pretrained=True).eval()
image = torch.tensor(data.chelsea()).permute(2, 0, 1)[None].float() / 255
image = torch.nn.functional.interpolate(image, size=(224, 224), mode="bilinear", antialias=True)
with torch.no_grad():
    print(int(model((image - 0.5) / 0.5).argmax()))
"""


def test_stock_timm_loads_them_offline_and_sees_a_cat(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "anomalib_reconpatch.tools.cli", "weights", "--variants", "0"]
    subprocess.run(command, env=env, check=True)
    out = subprocess.run([sys.executable, "-c", CLASSIFY], env=env, check=True, capture_output=True, text=True)
    assert 281 <= int(out.stdout.strip()) <= 285  # ImageNet's domestic cat classes
