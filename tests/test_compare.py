"""``reconpatch compare`` end to end on the demo data, and ReConPatch in anomalib's benchmark pipeline."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import matplotlib
import matplotlib.pyplot
import pytest
import torch
import yaml
from torch import nn

from anomalib_reconpatch.tools.cli import main
from anomalib_reconpatch.tools.compare import (
    METRIC_KEYS,
    TIMING_KEYS,
    CompareSettings,
    compare,
    describe_exit,
    heatmap_figure,
    latency_images,
)
from anomalib_reconpatch.tools.compare import TestRecorder as Recorder
from anomalib_reconpatch.tools.latency import interleaved_medians, split_latency_ms

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
        data=data,
        out=out,
        coreset_ratio=0.02,
        image_size=(128, 96),
        reconpatch_args={"num_steps": 50},
        latency_images=3,
    )
    return out, compare(settings, log=lambda _: None)


def test_report_holds_every_field(report: tuple[Path, dict]) -> None:
    out, _ = report
    saved = json.loads((out / "report.json").read_text())
    assert set(saved["models"]) == {"ReConPatch", "Patchcore"}
    for numbers in saved["models"].values():
        for key in (*METRIC_KEYS, *TIMING_KEYS):
            assert isinstance(numbers[key], float), key
        assert numbers["memory_bank"] == [int(24 * 16 * 12 * 0.02), 152]  # 24 images of 16x12 patches at 128x96 px
        assert numbers["fit_s"] == pytest.approx(
            numbers["features_s"] + numbers["representation_s"] + numbers["coreset_s"], rel=0.05
        )
        assert numbers["backbone_ms"] > 0
        assert numbers["search_ms"] > 0
        parts = numbers["backbone_ms"] + numbers["search_ms"] + numbers["rest_ms"]
        assert numbers["latency_ms"] == pytest.approx(parts, rel=1e-9)
    assert saved["models"]["ReConPatch"]["representation_s"] > 0
    assert saved["models"]["Patchcore"]["representation_s"] == 0
    assert set(saved["versions"]) == {"anomalib", "torch", "timm", "openvino", "cpu_count"}
    assert saved["settings"]["coreset_ratio"] == 0.02
    for name in ("report.md", "roc.png", "heatmaps.png"):
        assert (out / name).stat().st_size > 1000
    assert "| image_AUROC |" in (out / "report.md").read_text()
    assert "128x96 px (height x width)" in (out / "report.md").read_text()
    assert (
        "ReConPatch by the largest pixel of its anomaly map (image_score=map); Patchcore by its largest"
        in (out / "report.md").read_text()
    )


def test_report_numbers_are_the_engines(report: tuple[Path, dict]) -> None:
    out, result = report
    saved = json.loads((out / "report.json").read_text())
    for name, engine_metrics in result["engine_metrics"].items():
        for key in METRIC_KEYS:
            assert saved["models"][name][key] == pytest.approx(float(engine_metrics[key]), abs=0, rel=0)


class Toy(nn.Module):
    """Backbone, search and a rest step, each counting its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.feature_extractor = nn.Linear(4, 4)
        self.calls = {"search": 0}

    def search_bank(self, x: torch.Tensor) -> torch.Tensor:
        self.calls["search"] += 1
        return x.sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.search_bank(self.feature_extractor(x)) * 2


def test_latency_split_times_each_phase_and_restores_the_model() -> None:
    model = Toy()
    images = [torch.randn(4) for _ in range(5)]
    result = split_latency_ms(model, model, images, warmup=2)
    assert set(result) == {"latency_ms", "backbone_ms", "search_ms", "rest_ms"}
    assert result["backbone_ms"] > 0
    assert result["search_ms"] > 0
    assert result["latency_ms"] == pytest.approx(result["backbone_ms"] + result["search_ms"] + result["rest_ms"])
    assert model.calls["search"] == 7
    assert "forward" not in vars(model.feature_extractor)
    assert "search_bank" not in vars(model)


def test_interleaved_medians_time_every_model_in_each_round() -> None:
    calls = []

    def timer(name: str, rounds: list[dict[str, float]]) -> object:
        samples = iter(rounds)

        def run() -> dict[str, float]:
            calls.append(name)
            return next(samples)

        return run

    a = [{"latency_ms": v, "search_ms": v / 2} for v in (3.0, 1.0, 2.0)]
    result = interleaved_medians({"a": timer("a", a), "b": timer("b", [{"latency_ms": v} for v in (10.0, 30.0, 20.0)])})
    assert calls == ["a", "b"] * 3
    assert result == {"a": a[2], "b": {"latency_ms": 20.0}}  # the median round, whole


def test_a_runs_exit_is_described_and_a_kill_points_at_memory() -> None:
    assert describe_exit(1) == "exited with code 1; its error is printed above"
    assert describe_exit(-signal.SIGTERM) == "was killed by SIGTERM"
    killed = describe_exit(-signal.SIGKILL)
    assert killed.startswith("was killed by SIGKILL, most often the kernel's out-of-memory killer")
    assert "lower --coreset-ratio or --image-size" in killed


def test_heatmaps_give_each_model_one_colour_scale_so_good_images_look_cool(demo_root: Path) -> None:
    test = demo_root / "grass" / "test"
    paths = [str(test / "scratch" / "000.png"), str(test / "good" / "000.png")]
    recorders = {
        name: Recorder.restore(
            {
                "scores": [high, low],
                "labels": [1, 0],
                "paths": paths,
                "maps": [torch.full((8, 8), high), torch.full((8, 8), low)],
            }
        )
        for name, low, high in (("A", 1.0, 10.0), ("B", 100.0, 1000.0))
    }
    fig = heatmap_figure(recorders)
    axes = [ax for ax in fig.axes if ax.images]
    grid = [axes[row * 4 : row * 4 + 4] for row in range(2)]  # image, A, B, ground truth per row
    for column, (low, high) in ((1, (1.0, 10.0)), (2, (100.0, 1000.0))):
        defect, good = (grid[row][column].images[0] for row in range(2))
        assert (defect.norm.vmin, defect.norm.vmax) == (good.norm.vmin, good.norm.vmax) == (low, high)
        assert tuple(good.to_rgba(good.get_array())[0, 0]) == pytest.approx(matplotlib.colormaps["jet"](0.0))
        assert tuple(defect.to_rgba(defect.get_array())[0, 0]) == pytest.approx(matplotlib.colormaps["jet"](1.0))
    matplotlib.pyplot.close(fig)


def test_latency_images_are_a_fixed_spread_of_the_test_set() -> None:
    items = [SimpleNamespace(image=torch.full((1,), float(i))) for i in range(83)]
    datamodule = SimpleNamespace(test_data=items)
    picked = [int(image) for image in latency_images(datamodule, 5)]
    assert picked == [0, 20, 41, 62, 82]
    assert [int(image) for image in latency_images(datamodule, 5)] == picked


def test_compare_rejects_a_missing_data_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["compare", "--data", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "nope.yaml does not exist" in capsys.readouterr().err


def test_compare_rejects_a_bad_image_size_before_any_fit(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data.yaml"
    data.write_text("class_path: anomalib.data.MVTecAD\ninit_args: {root: nowhere, category: grass}\n")
    code = main(["compare", "--data", str(data), "--image-size", "640", "256", "3", "--out", str(tmp_path / "out")])
    assert code == 2
    assert "--image-size (640, 256, 3) is not a side or a height and width" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_compare_rejects_a_repeated_seed_before_any_fit(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data.yaml"
    data.write_text("class_path: anomalib.data.MVTecAD\ninit_args: {root: nowhere, category: grass}\n")
    code = main(["compare", "--data", str(data), "--seed", "0", "0", "--out", str(tmp_path / "out")])
    assert code == 2
    assert "--seed 0 0: give one or more different seeds" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_compare_rejects_a_bad_reconpatch_setting_before_any_fit(
    tmp_path: Path, lite_weights: None, capsys: pytest.CaptureFixture
) -> None:
    data = tmp_path / "data.yaml"
    data.write_text("class_path: anomalib.data.MVTecAD\ninit_args: {root: nowhere, category: grass}\n")
    code = main(["compare", "--data", str(data), "--reconpatch", "k=0", "--out", str(tmp_path / "out")])
    assert code == 2
    error = capsys.readouterr().err
    assert "ReConPatch: k=0 is out of range; expected an integer >= 1 (set --reconpatch k=...)." in error
    assert "--model." not in error  # compare has no --model flags
    code = main(["compare", "--data", str(data), "--reconpatch", "sigmaa=2", "--out", str(tmp_path / "out")])
    assert code == 2
    assert "ReConPatch has no setting sigmaa: check the names given to --reconpatch" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_compare_refuses_an_output_folder_inside_the_data_folder(
    demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = tmp_path / "data.yaml"
    data.write_text(f"class_path: anomalib.data.MVTecAD\ninit_args: {{root: {demo_root}, category: grass}}\n")
    before = sorted(demo_root.rglob("*"))
    code = main(["compare", "--data", str(data), "--out", str(demo_root / "grass" / "results")])
    assert code == 2
    assert f"Output folder {demo_root / 'grass' / 'results'} is inside the input folder" in capsys.readouterr().err
    assert sorted(demo_root.rglob("*")) == before


def test_a_runs_bad_input_error_reaches_the_user_from_its_process(
    demo_root: Path, lite_weights: None, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    shutil.copytree(demo_root / "brick", tmp_path / "data" / "brick")
    for path in (tmp_path / "data" / "brick" / "train" / "good").glob("*.png"):
        path.unlink()
    data = tmp_path / "data.yaml"
    init_args = {"root": str(tmp_path / "data"), "category": "brick", "num_workers": 0}
    data.write_text(yaml.safe_dump({"class_path": "anomalib.data.MVTecAD", "init_args": init_args}))
    code = main(["compare", "--data", str(data), "--models", "ReConPatch", "--out", str(tmp_path / "out")])
    assert code == 2
    assert f"No training images found under {tmp_path / 'data' / 'brick'}" in capsys.readouterr().err


def test_a_missing_data_set_that_cannot_be_downloaded_says_where_it_was_looked_for(
    lite_weights: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    for name in ("https_proxy", "HTTPS_PROXY"):  # the run's process fails to download, even with internet
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    data = tmp_path / "data.yaml"
    init_args = {"root": str(tmp_path / "absent"), "category": "brick", "num_workers": 0}
    data.write_text(yaml.safe_dump({"class_path": "anomalib.data.MVTecAD", "init_args": init_args}))
    code = main(["compare", "--data", str(data), "--models", "ReConPatch", "--out", str(tmp_path / "out")])
    assert code == 2
    error = capsys.readouterr().err
    assert f"The data set is not under {tmp_path / 'absent'} (init_args.root in {data})" in error
    assert f"reconpatch demo-data {tmp_path / 'absent'}" in error


@pytest.fixture(scope="module")
def two_seeds(
    demo_root: Path, lite_weights: None, tmp_path_factory: pytest.TempPathFactory
) -> tuple[CompareSettings, dict, dict, str]:
    """ReConPatch compared over seeds 0 and 1 while this process holds 3 GiB: the settings, what
    ``compare`` returned, and the report.json and report.md it wrote."""
    tmp_path = tmp_path_factory.mktemp("seeds")
    data = tmp_path / "data.yaml"
    init_args = {"root": str(demo_root), "category": "grass", "num_workers": 0}
    data.write_text(yaml.safe_dump({"class_path": "anomalib.data.MVTecAD", "init_args": init_args}))
    settings = CompareSettings(
        data=data,
        out=tmp_path / "out",
        models=["ReConPatch"],
        coreset_ratio=0.05,
        image_size=64,
        seeds=[0, 1],
        reconpatch_args={"num_steps": 5},
        latency_images=2,
    )
    ballast = torch.ones(3 * 2**30 // 4)  # 3 GiB this process holds (and has touched) during the runs
    result = compare(settings, log=lambda _: None)
    del ballast
    saved = json.loads((settings.out / "report.json").read_text())
    return settings, result, saved, (settings.out / "report.md").read_text()


def test_several_seeds_give_each_models_mean_and_spread(two_seeds: tuple) -> None:
    import statistics

    settings, result, saved, text = two_seeds
    assert set(saved["per_seed"]) == {"0", "1"}
    runs = [saved["per_seed"][seed]["ReConPatch"] for seed in ("0", "1")]
    assert all(0 < run["peak_rss_mb"] < 3 * 1024 for run in runs)  # each run's own process, not this one
    for seed, run in zip((0, 1), runs, strict=True):
        engine = result["engine_metrics_per_seed"][seed]["ReConPatch"]
        assert all(run[key] == pytest.approx(float(engine[key]), abs=0, rel=0) for key in METRIC_KEYS)
        assert (settings.out / "runs" / "ReConPatch" / f"seed{seed}").is_dir()  # each seed was fitted
    mean, spread = saved["models"]["ReConPatch"], saved["spread"]["ReConPatch"]
    for key in METRIC_KEYS:
        assert mean[key] == pytest.approx(statistics.fmean(run[key] for run in runs))
        assert spread[key] == pytest.approx(statistics.stdev(run[key] for run in runs))
    assert mean["fit_s"] == pytest.approx((runs[0]["fit_s"] + runs[1]["fit_s"]) / 2)
    assert mean["latency_ms"] > 0
    assert "seeds 0, 1 (each number is the mean over the seeds" in text
    assert "Per seed (0, 1):" in text
    assert f"| image_AUROC | {runs[0]['image_AUROC']:.3f} / {runs[1]['image_AUROC']:.3f} (sd " in text


def test_a_rerun_reuses_each_finished_run_and_runs_again_what_changed(
    two_seeds: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, result, saved, _ = two_seeds

    def new_run(name: str, *args: object) -> dict:
        raise AssertionError(f"{name} ran again")

    monkeypatch.setattr("anomalib_reconpatch.tools.compare.runner.run_in_process", new_run)
    lines: list[str] = []
    again = compare(replace(settings, seeds=[1]), log=lines.append)  # no new run: new_run would raise
    assert again["engine_metrics"]["ReConPatch"] == result["engine_metrics_per_seed"][1]["ReConPatch"]
    assert (
        json.loads((settings.out / "report.json").read_text())["models"]["ReConPatch"]["image_AUROC"]
        == (saved["per_seed"]["1"]["ReConPatch"]["image_AUROC"])
    )
    assert any("[ReConPatch, seed 1] reusing the run finished earlier with the same settings" in line for line in lines)
    lines.clear()
    with pytest.raises(AssertionError, match="Patchcore ran again"):  # only the model added runs
        compare(replace(settings, seeds=[1], models=["ReConPatch", "Patchcore"]), log=lines.append)
    assert any("[ReConPatch, seed 1] reusing the run finished earlier" in line for line in lines)
    changed = replace(settings, seeds=[1], reconpatch_args={"num_steps": 6})
    with pytest.raises(AssertionError, match="ReConPatch ran again"):
        compare(changed, log=lambda _: None)
    with pytest.raises(AssertionError, match="ReConPatch ran again"):
        compare(replace(settings, seeds=[1]), log=lambda _: None, reuse=False)
    (settings.out / "runs" / "ReConPatch" / "seed0" / "compare_run.pt").write_bytes(b"cut short")
    lines.clear()
    with pytest.raises(AssertionError, match="ReConPatch ran again"):
        compare(replace(settings, seeds=[0]), log=lines.append)
    assert any("compare_run.pt is unreadable" in line and "running it again" in line for line in lines)


def test_a_saved_run_matches_on_the_settings_that_change_it_alone(tmp_path: Path) -> None:
    from anomalib_reconpatch.tools.compare.runner import run_key, same_run

    settings = CompareSettings(data=tmp_path / "data.yaml", out=tmp_path / "out", models=["ReConPatch"])
    data_config = {"class_path": "anomalib.data.MVTecAD", "init_args": {"category": "brick"}}
    key = run_key("ReConPatch", settings, 0, data_config)
    saved = json.loads(key)
    saved["settings"]["models"] = ["ReConPatch", "ReConPatchEnsemble"]
    assert same_run(json.dumps(saved, sort_keys=True), key)
    saved["settings"]["coreset_ratio"] = 0.01
    assert not same_run(json.dumps(saved, sort_keys=True), key)
    assert not same_run(run_key("ReConPatch", settings, 1, data_config), key)
    tuned = replace(settings, reconpatch_args={"num_steps": 6})  # changes ReConPatch's runs, not PatchCore's
    assert not same_run(run_key("ReConPatch", tuned, 0, data_config), key)
    assert same_run(run_key("Patchcore", tuned, 0, data_config), run_key("Patchcore", settings, 0, data_config))
    saved = json.loads(run_key("Patchcore", settings, 0, data_config))
    saved["settings"]["reconpatch_args"] = {"num_steps": 6}
    assert same_run(json.dumps(saved, sort_keys=True), run_key("Patchcore", settings, 0, data_config))
    assert not same_run("cut short", key)
    assert not same_run(None, key)


def test_fresh_flag_turns_reuse_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []
    monkeypatch.setattr("anomalib_reconpatch.tools.compare.compare", lambda settings, reuse: calls.append(reuse))
    command = ["compare", "--data", str(tmp_path / "data.yaml"), "--out", str(tmp_path / "out")]
    assert main(command) == 0
    assert main([*command, "--fresh"]) == 0
    assert calls == [True, False]


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


STOCK_CORESET_LOOP = """
import sys, psutil, torch
from anomalib.models.components.sampling import KCenterGreedy
from anomalib_reconpatch.tools.memory import compare_mmap_threshold, fix_mmap_threshold
assert fix_mmap_threshold(compare_mmap_threshold(sys.argv[1]))
torch.manual_seed(0)
sampler = KCenterGreedy(torch.randn(61440, 152), sampling_ratio=151 / 61440)
sampler.features = sampler.model.fit(sampler.embedding).transform(sampler.embedding)
index, start = torch.tensor(0), psutil.Process().memory_info().rss
chosen = [index]
for _ in range(150):  # select_coreset_idxs's loop, without its progress bar
    sampler.update_distances(cluster_center=index)
    index = sampler.get_new_idx()
    sampler.min_distances.scatter_(0, index.view(1, 1), 0.0)
    chosen.append(index)
print((psutil.Process().memory_info().rss - start) / 150)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the allocator setting is glibc's")
def test_stock_patchcores_coreset_loop_runs_in_flat_memory_under_compares_allocator_setting() -> None:
    # 61,440 rows are MPDD metal_plate's; each selection allocates a 240 KB distance vector, and at
    # a 4 MiB threshold about one of them a selection stayed in the heap (docs/design/feature-spill.md)
    done = subprocess.run(
        [sys.executable, "-c", STOCK_CORESET_LOOP, "Patchcore"], capture_output=True, text=True, check=True
    )
    growth_per_selection = float(done.stdout.strip().splitlines()[-1])
    assert growth_per_selection < 60 * 1024, f"resident memory grew {growth_per_selection / 1024:.0f} KB a selection"
