"""``reconpatch compare`` end to end on the demo data, and ReConPatch in anomalib's benchmark pipeline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from anomalib_reconpatch.cli import main
from anomalib_reconpatch.compare import METRIC_KEYS, TIMING_KEYS, CompareSettings, compare

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def report(demo_root: Path, lite_weights: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("compare")
    data = out / "data.yaml"
    data.write_text(
        yaml.safe_dump(
            {
                "class_path": "anomalib.data.MVTecAD",
                "init_args": {"root": str(demo_root), "category": "grass", "num_workers": 0},
            }
        )
    )
    settings = CompareSettings(
        data=data, out=out, coreset_ratio=0.02, image_size=128, reconpatch_args={"num_steps": 50}, latency_images=3
    )
    return out, compare(settings, log=lambda _: None)


def test_report_holds_every_field(report: tuple[Path, dict]) -> None:
    out, _ = report
    saved = json.loads((out / "report.json").read_text())
    assert set(saved["models"]) == {"ReConPatch", "Patchcore"}
    for numbers in saved["models"].values():
        for key in (*METRIC_KEYS, *TIMING_KEYS):
            assert isinstance(numbers[key], float), key
        assert numbers["memory_bank"] == [int(24 * 16 * 16 * 0.02), 152]  # 24 images of 16x16 patches at 128 px
        assert numbers["fit_s"] == pytest.approx(
            numbers["features_s"] + numbers["representation_s"] + numbers["coreset_s"], rel=0.05
        )
    assert saved["models"]["ReConPatch"]["representation_s"] > 0
    assert saved["models"]["Patchcore"]["representation_s"] == 0
    assert set(saved["versions"]) == {"anomalib", "torch", "timm", "openvino", "cpu_count"}
    assert saved["settings"]["coreset_ratio"] == 0.02
    for name in ("report.md", "roc.png", "heatmaps.png"):
        assert (out / name).stat().st_size > 1000
    assert "| image_AUROC |" in (out / "report.md").read_text()


def test_report_numbers_are_the_engines(report: tuple[Path, dict]) -> None:
    out, result = report
    saved = json.loads((out / "report.json").read_text())
    for name, engine_metrics in result["engine_metrics"].items():
        for key in METRIC_KEYS:
            assert saved["models"][name][key] == pytest.approx(float(engine_metrics[key]), abs=0, rel=0)


def test_compare_rejects_a_missing_data_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["compare", "--data", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "nope.yaml does not exist" in capsys.readouterr().err


def test_anomalib_benchmark_pipeline_runs_reconpatch(demo_root: Path, lite_weights: None, tmp_path: Path) -> None:
    config = {
        "accelerator": ["cpu"],
        "benchmark": {
            "seed": 0,
            "model": {
                "class_path": "ReConPatch",
                "init_args": {
                    "backbone": "tf_efficientnet_lite0",
                    "layers": ["blocks.2", "blocks.4"],
                    "num_steps": 30,
                    "coreset_sampling_ratio": 0.02,
                },
            },
            "data": {
                "class_path": "MVTecAD",
                "init_args": {"root": str(demo_root), "category": "grass", "num_workers": 0},
            },
        },
    }
    path = tmp_path / "benchmark.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [str(BIN / "anomalib"), "benchmark", "--config", str(path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    csvs = list(tmp_path.rglob("*.csv"))
    assert csvs, "no benchmark results written"
    text = csvs[0].read_text()
    assert "ReConPatch" in text or "reconpatch" in text.lower()
    assert "image_AUROC" in text
