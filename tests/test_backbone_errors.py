"""Backbone problems stop training at once with a message that says what to do."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from anomalib_reconpatch.components.backbone import BackboneError, build_feature_extractor

MISSING = """
from anomalib_reconpatch import ReConPatch
try:
    ReConPatch(backbone="wide_resnet50_2")
except Exception as error:
    print(type(error).__name__, error)
"""


def test_missing_weights_offline_fail_fast_with_both_ways_out(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", MISSING], env=env, capture_output=True, text=True, timeout=120).stdout
    assert time.perf_counter() - start < 60
    assert out.startswith("BackboneError")
    assert "'wide_resnet50_2'" in out
    assert str(tmp_path / "hub" / "models--timm--wide_resnet50_2") in out
    assert "internet" in out
    assert "reconpatch weights" in out
    assert "tf_efficientnet_lite0" in out


def test_unknown_backbone_names_close_matches() -> None:
    with pytest.raises(BackboneError, match=r"Unknown backbone 'tf_efficientnet_lite9'.*tf_efficientnet_lite0"):
        build_feature_extractor("tf_efficientnet_lite9", ["blocks.2"], pre_trained=False)


def test_missing_layer_lists_available_layers() -> None:
    with pytest.raises(BackboneError, match=r"no feature layer\(s\) \['layer3'\].*blocks\.4"):
        build_feature_extractor("tf_efficientnet_lite0", ["blocks.2", "layer3"], pre_trained=False)
