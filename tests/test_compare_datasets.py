"""``reconpatch compare`` on other anomalib datamodules (VisA, BTAD) and on several categories at once.

The VisA and BTAD layouts are built from the demo data's real texture photos in the folder
structure each anomalib datamodule reads, so no data set needs downloading.
"""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest
import yaml

from anomalib_reconpatch.tools.cli import main
from anomalib_reconpatch.tools.compare import (
    METRIC_KEYS,
    CompareSettings,
    build_datamodule,
    compare,
    load_datamodule_config,
    split_categories,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "data"
DEFECT = "patch"  # the demo defect type copied into the single-defect layouts


def copy_layout(source: Path, target: Path, normal: str, defect: str) -> None:
    """The demo category ``source`` as ``target/{train/NORMAL, test/NORMAL, test/DEFECT, ground_truth/DEFECT}``.

    VisA's split uses ``good``/``bad`` and BTAD ``ok``/``ko``; masks take their image's name (BTAD needs it).
    """
    folders = {
        ("train", "good"): ("train", normal),
        ("test", "good"): ("test", normal),
        ("test", DEFECT): ("test", defect),
        ("ground_truth", DEFECT): ("ground_truth", defect),
    }
    for (split, label), (new_split, new_label) in folders.items():
        (target / new_split / new_label).mkdir(parents=True)
        for path in sorted((source / split / label).glob("*.png")):
            shutil.copyfile(path, target / new_split / new_label / f"{path.stem.removesuffix('_mask')}.png")


def write_config(path: Path, class_path: str, **init_args: object) -> Path:
    path.write_text(yaml.safe_dump({"class_path": class_path, "init_args": {**init_args, "num_workers": 0}}))
    return path


SMALL = {"coreset_ratio": 0.05, "image_size": 64, "reconpatch_args": {"num_steps": 5}, "latency_images": 2}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda path: path.name)
def test_every_shipped_data_config_builds_its_datamodules(path: Path) -> None:
    config = load_datamodule_config(path)
    categories = split_categories(config, path)
    modules = [build_datamodule(one, seed=0) for one in (categories or {"": config}).values()]
    assert type(modules[0]).__name__ == config["class_path"].rpartition(".")[2]
    if path.name == "mvtec_ad_all.yaml":
        assert [module.category for module in modules][:2] == ["bottle", "cable"]
        assert len(modules) == 15


@pytest.mark.parametrize(
    ("class_path", "category", "message"),
    [
        ("anomalib.data.Folder", "all", "Folder has no known category list for 'category: all'"),
        ("anomalib.data.MVTecAD", ["bottle", "bottle"], "should list different category names"),
        ("anomalib.data.MVTecAD", [], "should list different category names"),
        ("anomalib.data.MVTecAD", ["bottle", "../cable"], "should list different category names"),
    ],
)
def test_a_bad_category_list_is_refused_before_any_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture, class_path: str, category: object, message: str
) -> None:
    data = write_config(tmp_path / "data.yaml", class_path, root="nowhere", category=category)
    code = main(["compare", "--data", str(data), "--out", str(tmp_path / "out")])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_compare_runs_each_listed_visa_category_and_averages_them(
    demo_root: Path, lite_weights: None, tmp_path: Path
) -> None:
    root = tmp_path / "visa"
    for category in ("grass", "brick"):
        copy_layout(demo_root / category, root / "visa_pytorch" / category, "good", "bad")
    data = write_config(tmp_path / "visa.yaml", "anomalib.data.Visa", root=str(root), category=["grass", "brick"])
    settings = CompareSettings(data=data, out=tmp_path / "out", models=["ReConPatch"], **SMALL)
    result = compare(settings, log=lambda _: None)
    summary = json.loads((settings.out / "report.json").read_text())
    assert list(summary["per_category"]) == ["grass", "brick"]
    for category, run in result["categories"].items():
        folder = settings.out / category
        own = json.loads((folder / "report.json").read_text())
        assert own["settings"]["data_config"]["init_args"]["category"] == category
        assert summary["per_category"][category] == own["models"]
        test_images = len(list((root / "visa_pytorch" / category / "test").rglob("*.png")))
        assert own["models"]["ReConPatch"]["test_images"] == test_images > 6  # the good and the defect ones
        for name, engine_metrics in run["engine_metrics"].items():
            for key in METRIC_KEYS:
                assert own["models"][name][key] == pytest.approx(float(engine_metrics[key]), abs=0, rel=0)
        for name in ("report.md", "roc.png", "heatmaps.png"):
            assert (folder / name).stat().st_size > 1000
        assert f"({category})" in (folder / "report.md").read_text().splitlines()[0]
    for name in ("ReConPatch",):  # one model: the per-model averaging is the same for every model
        for key in (*METRIC_KEYS, "fit_s", "latency_ms"):
            values = [summary["per_category"][category][name][key] for category in ("grass", "brick")]
            assert summary["models"][name][key] == pytest.approx(statistics.fmean(values))
    text = (settings.out / "report.md").read_text()
    assert "2 categories" in text.splitlines()[0]
    assert "| [brick](brick/report.md) |" in text
    assert "| image_AUROC |" in text


def test_compare_reads_a_btad_category(demo_root: Path, lite_weights: None, tmp_path: Path) -> None:
    copy_layout(demo_root / "grass", tmp_path / "btad" / "01", "ok", "ko")
    data = write_config(tmp_path / "btad.yaml", "anomalib.data.BTech", root=str(tmp_path / "btad"), category="01")
    settings = CompareSettings(data=data, out=tmp_path / "out", models=["ReConPatch"], **SMALL)
    result = compare(settings, log=lambda _: None)
    numbers = result["report"]["models"]["ReConPatch"]
    assert numbers["test_images"] == len(list((tmp_path / "btad" / "01" / "test").rglob("*.png"))) > 6
    assert numbers["image_AUROC"] == pytest.approx(float(result["engine_metrics"]["ReConPatch"]["image_AUROC"]))
    assert 0 < numbers["pixel_PRO"] <= 1  # the ground-truth masks were read
