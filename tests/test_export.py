"""Export through anomalib's stock path and run in OpenVINO: same answers as torch, any batch size."""

from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from anomalib.metrics import AUROC

from anomalib_reconpatch.tools.predict import load_compiled_model

from .conftest import BACKBONE, interruptible

# Reads the INT8 IR named by sys.argv[3] into `out`: its op types, the [rows, dim] of every convolution that
# a FakeQuantize feeds (the quantized bank searches) and the op types that FakeQuantize outputs feed.
INT8_GRAPH = (
    "import json, sys, numpy as np, openvino as ov\n"
    "graph = ov.Core().read_model(sys.argv[3])\n"
    "out = {'ops': sorted({op.get_type_name() for op in graph.get_ops()})}\n"
    "out['quantized'] = [list(op.input(1).get_partial_shape().to_shape())[:2] for op in graph.get_ordered_ops()\n"
    "    if op.get_type_name() == 'Convolution'\n"
    "    and op.input(0).get_source_output().get_node().get_type_name() == 'FakeQuantize']\n"
    "out['fed'] = sorted({t.get_node().get_type_name() for op in graph.get_ops()\n"
    "    if op.get_type_name() == 'FakeQuantize' for o in op.outputs() for t in o.get_target_inputs()})\n"
)


@pytest.fixture
def exported(demo_model: dict) -> tuple:
    """The session's demo brick model, trained by the Engine and exported to OpenVINO FP32 with ``to_openvino``."""
    return demo_model["model"], demo_model["xml"], demo_model["root"]


def stock_export(ckpt: Path, export_root: Path, timeout: int, *extra: str) -> Path:
    """Run the stock ``anomalib export`` to OpenVINO on a demo checkpoint in a subprocess; the ``.xml`` path."""
    command = [
        str(Path(sys.executable).parent / "anomalib"), "export", "--model", "ReConPatch", "--export_type", "openvino",
        "--ckpt_path", str(ckpt), "--model.backbone", BACKBONE, "--model.layers", "[blocks.2, blocks.4]",
        "--export_root", str(export_root), *extra,
    ]  # fmt: skip
    wide = {**os.environ, "COLUMNS": "400"}  # one log record to a line
    result = subprocess.run(command, cwd=export_root, capture_output=True, text=True, timeout=timeout, env=wide)
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert "Failed to convert the model to the target version" not in output  # no opset conversion traceback
    return export_root / "weights" / "openvino" / "model.xml"


def raw_images(root: Path, split: str, count: int) -> torch.Tensor:
    """Real demo images in [0, 1], as the exported graph expects them (it pre-processes itself)."""
    from torchvision.io import read_image

    files = sorted((root / "brick" / split).glob("*.png"))[:count]
    return torch.stack([read_image(str(f)).float() / 255 for f in files])


@pytest.mark.parametrize("batch", [1, 3])
def test_openvino_matches_torch_at_any_batch(exported: tuple, demo_root: Path, batch: int) -> None:
    model, xml, _ = exported
    compiled = load_compiled_model(xml)
    images = torch.cat([raw_images(demo_root, "test/good", 2), raw_images(demo_root, "test/scratch", 2)])[:batch]
    with torch.no_grad():
        reference = model(images)
    result = compiled(images.numpy())
    score = result[compiled.output("pred_score")]
    amap = result[compiled.output("anomaly_map")]
    assert score.shape == (batch,)
    assert amap.shape == tuple(reference.anomaly_map.shape) == (batch, 256, 256)
    ref_map = reference.anomaly_map.numpy()
    map_range = max(float(ref_map.max() - ref_map.min()), 1e-6)
    assert np.abs(score - reference.pred_score.numpy()).max() <= 1e-3
    assert np.abs(amap - ref_map).max() <= 1e-2 * map_range


def test_a_patch_scored_model_exports_patchcores_image_score(exported: tuple, demo_root: Path, tmp_path: Path) -> None:
    # the default scores by the map (the parity test above); PatchCore's re-weighting needs the support table
    model = copy.deepcopy(exported[0]).eval()
    model.model.image_score = "patches"
    xml = model.to_openvino(tmp_path / "openvino")
    compiled = load_compiled_model(xml)
    images = torch.cat([raw_images(demo_root, "test/good", 1), raw_images(demo_root, "test/scratch", 2)])
    with torch.no_grad():
        reference = model(images)
        by_map = exported[0](images)
    result = compiled(images.numpy())
    score, amap = result[compiled.output("pred_score")], result[compiled.output("anomaly_map")]
    assert np.abs(score - reference.pred_score.numpy()).max() <= 1e-3
    assert not np.allclose(score, by_map.pred_score.numpy(), atol=1e-3)
    assert np.abs(amap - by_map.anomaly_map.numpy()).max() <= 1e-2 * np.ptp(by_map.anomaly_map.numpy())


def enlarged_images(root: Path, size: tuple[int, int]) -> torch.Tensor:
    """Two real demo images scaled up to ``size`` (h, w), so that the model's graph has to shrink them."""
    from PIL import Image

    files = sorted((root / "brick" / "test" / "scratch").glob("*.png"))[:2]
    images = [
        np.asarray(Image.open(f).convert("RGB").resize(size[::-1], Image.BICUBIC), np.float32) / 255 for f in files
    ]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


@pytest.mark.parametrize("size", [(320, 320), (333, 517), (256, 640)])
def test_openvino_scores_larger_images_as_the_trained_model_does(
    exported: tuple, demo_root: Path, size: tuple[int, int]
) -> None:
    model, xml, _ = exported
    images = enlarged_images(demo_root, size)
    with torch.no_grad():  # Engine.predict's path: the training resize (antialiased), the model, post-processing
        reference = model.post_processor(model.model(model.pre_processor.transform(images)))
    compiled = load_compiled_model(xml)
    result = compiled(images.numpy())
    ref_map = reference.anomaly_map.numpy()
    assert np.abs(result[compiled.output("pred_score")] - reference.pred_score.numpy()).max() <= 1e-4
    assert np.abs(result[compiled.output("anomaly_map")] - ref_map).max() <= 1e-3 * np.ptp(ref_map)


def test_int8_ptq_through_the_stock_cli_calibrates_on_training_images_and_keeps_the_ranking(
    exported: tuple, demo_root: Path, tmp_path: Path
) -> None:
    """Stock ``anomalib export --compression_type INT8_PTQ``; export and scoring run in subprocesses."""
    import json
    import math
    import subprocess
    import sys

    from anomalib_reconpatch.reconpatch.search import SEARCH_CHUNK

    model, fp32_xml, root = exported
    int8_xml = stock_export(
        root / "model.ckpt", tmp_path, 900, "--compression_type", "INT8_PTQ",
        "--data", "anomalib.data.MVTecAD", "--data.root", str(demo_root), "--data.category", "brick",
        "--data.num_workers", "0",
    )  # fmt: skip
    splits = {"test/good": 0, "test/patch": 1, "test/scratch": 1, "test/stain": 1}
    per_split = [raw_images(demo_root, split, 100) for split in splits]
    images = torch.cat(per_split)
    labels = torch.cat([torch.full((len(x),), label) for x, label in zip(per_split, splits.values(), strict=True)])
    np.save(tmp_path / "images.npy", images.numpy())
    scorer = (
        INT8_GRAPH + "images = np.load(sys.argv[1])\n"
        "from anomalib_reconpatch.tools.predict import compile_options\n"
        "for name, xml in (('fp32', sys.argv[2]), ('int8', sys.argv[3])):\n"
        "    compiled = ov.Core().compile_model(xml, 'CPU', compile_options())\n"
        "    out[name] = [float(compiled(i[None])[compiled.output('pred_score')][0]) for i in images]\n"
        "print(json.dumps(out))\n"
    )  # compiling the INT8 IR in the test process made a later torch training segfault
    scored = subprocess.run(
        [sys.executable, "-c", scorer, str(tmp_path / "images.npy"), str(fp32_xml), str(int8_xml)],
        capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    result = json.loads(scored.stdout.strip().splitlines()[-1])
    assert "FakeQuantize" in result["ops"]  # really quantized, not a silent FP32 copy
    bank_rows, dim = model.model.memory_bank.shape  # quantized: the 1x1 convolutions against the bank, nothing else
    rows = [rows for rows, _ in result["quantized"]]
    assert model.model.image_score == "map"  # no re-weighting, so no search for the top patch's neighbour
    assert len(rows) == math.ceil(bank_rows / SEARCH_CHUNK)  # the patch search, one per bank chunk
    assert sum(rows) == bank_rows
    assert {d for _, d in result["quantized"]} == {dim}
    assert result["fed"] == ["Convolution"]
    auroc = {}
    for name in ("fp32", "int8"):
        metric = AUROC(fields=["pred_score", "gt_label"])
        metric.update(SimpleNamespace(pred_score=torch.tensor(result[name]), gt_label=labels))
        auroc[name] = float(metric.compute())
    one_pair = 1 / (int((labels == 0).sum()) * int((labels == 1).sum()))  # AUROC step of one swapped pair
    slack = 1e-6  # the AUROCs are float32: 11/18 came out 7e-9 too low once
    assert abs(auroc["int8"] - auroc["fp32"]) <= one_pair + slack, (auroc, result["fp32"], result["int8"])


def test_int8_ptq_of_a_patch_scored_checkpoint_also_quantizes_the_top_patchs_neighbour_search(
    exported: tuple, demo_root: Path, tmp_path: Path
) -> None:
    import json
    import math

    from anomalib_reconpatch.reconpatch.search import SEARCH_CHUNK

    model, _, root = exported
    checkpoint = torch.load(root / "model.ckpt", weights_only=False)
    checkpoint["hyper_parameters"]["image_score"] = "patches"  # as if trained with --model.image_score patches
    torch.save(checkpoint, tmp_path / "patches.ckpt")
    int8_xml = stock_export(
        tmp_path / "patches.ckpt", tmp_path, 900, "--compression_type", "INT8_PTQ", "--model.image_score", "patches",
        "--data", "anomalib.data.MVTecAD", "--data.root", str(demo_root), "--data.category", "brick",
        "--data.num_workers", "0",
    )  # fmt: skip
    read = subprocess.run(
        [sys.executable, "-c", INT8_GRAPH + "print(json.dumps(out))\n", "", "", str(int8_xml)],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    result = json.loads(read.stdout.strip().splitlines()[-1])
    bank_rows, dim = model.model.memory_bank.shape
    rows = sorted(rows for rows, _ in result["quantized"])
    assert rows[-1] == bank_rows  # the top patch's neighbour, one convolution over the whole bank
    assert len(rows) - 1 == math.ceil(bank_rows / SEARCH_CHUNK)  # the patch search, one per bank chunk
    assert sum(rows[:-1]) == bank_rows
    assert {d for _, d in result["quantized"]} == {dim}
    assert result["fed"] == ["Convolution"]


def test_int8_ptq_without_data_says_what_to_pass() -> None:
    from anomalib_reconpatch.reconpatch.quantize import quantize_on_training_images

    with pytest.raises(ValueError, match="calibrates on the training images"):
        quantize_on_training_images(object(), None)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_predict_writes_overlays_and_csv_and_leaves_input_alone(
    exported: tuple, demo_root: Path, tmp_path: Path
) -> None:
    import csv

    from anomalib_reconpatch.tools.cli import main

    _, xml, _ = exported
    source = demo_root / "brick" / "test"
    before = snapshot(demo_root)
    assert main(["predict", "--model", str(xml), "--input", str(source), "--out", str(tmp_path / "pred")]) == 0
    rows = list(csv.DictReader((tmp_path / "pred" / "scores.csv").open()))
    images = sorted(p for p in source.rglob("*.png"))
    assert [r["image"] for r in rows] == [str(p) for p in images]
    assert all(Path(r["overlay"]).is_file() for r in rows)
    scores = {Path(r["image"]).parent.name: float(r["score"]) for r in rows}
    assert all(0.0 <= s <= 1.0 for s in scores.values())
    assert snapshot(demo_root) == before


def test_predict_runs_without_torch_or_anomalib(exported: tuple, demo_root: Path, tmp_path: Path) -> None:
    """On a line PC, predict needs only OpenVINO, numpy and PIL: importing torch and anomalib costs about 1 GB."""
    import subprocess
    import sys

    _, xml, _ = exported
    argv = ["predict", "--model", str(xml), "--input", str(demo_root / "brick" / "test"), "--out", str(tmp_path)]
    code = (
        "import sys; from anomalib_reconpatch.tools.cli import main; code = main(sys.argv[1:]); "
        "print(sorted(name for name in ('torch', 'anomalib', 'lightning') if name in sys.modules)); sys.exit(code)"
    )
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
    images = list(demo_root.glob("brick/test/*/*.png"))
    assert len((tmp_path / "scores.csv").read_text().splitlines()) == 1 + len(images)


def test_predict_rejects_bad_models_and_outputs(exported: tuple, demo_root: Path, tmp_path: Path) -> None:
    from anomalib_reconpatch.tools.predict import predict

    image = demo_root / "brick" / "test" / "good" / "000.png"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        predict(tmp_path / "missing.xml", image, tmp_path / "out")
    (tmp_path / "broken.xml").write_text("<not a model")
    (tmp_path / "broken.bin").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="could not read"):
        predict(tmp_path / "broken.xml", image, tmp_path / "out")
    with pytest.raises(ValueError, match="inside the input folder"):
        predict(exported[1], demo_root / "brick", demo_root / "brick" / "results")
    import openvino as ov

    fixed = ov.Core().read_model(str(exported[1]))
    fixed.reshape([1, 3, 256, 256])  # a fixed-size export, as stock PatchCore's
    ov.save_model(fixed, str(tmp_path / "fixed.xml"))
    with pytest.raises(ValueError, match=r"cannot score images of any size \(its input is fixed at \[1,3,256,256\]\)"):
        predict(tmp_path / "fixed.xml", image, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_predict_keeps_an_earlier_complete_run_until_a_new_one_completes(
    exported: tuple, demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from anomalib_reconpatch.tools import predict as predict_module

    xml, source, out = exported[1], demo_root / "brick" / "test", tmp_path / "out"
    predict_module.predict(xml, source, out, log=lambda line: None)
    earlier = snapshot(out)
    assert len(earlier["scores.csv"].splitlines()) == 1 + len(list(source.rglob("*.png")))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        predict_module.predict(xml, tmp_path / "mistyped", out)
    (tmp_path / "broken.xml").write_text("<not a model")
    (tmp_path / "broken.bin").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="could not read"):
        predict_module.predict(tmp_path / "broken.xml", source, out)
    assert snapshot(out) == earlier
    drawn, draw = [], predict_module.overlay

    def interrupted(image: object, anomaly_map: object) -> object:  # Ctrl-C at the third image
        drawn.append(image)
        if len(drawn) == 3:
            raise KeyboardInterrupt
        return draw(image, anomaly_map)

    with monkeypatch.context() as patch:
        patch.setattr(predict_module, "overlay", interrupted)
        with pytest.raises(KeyboardInterrupt):
            predict_module.predict(xml, source, out, log=lambda line: None)
    left = snapshot(out)
    assert {name: data for name, data in left.items() if ".partial" not in name} == earlier
    assert "scores.csv.partial" in left
    assert any(name.startswith("overlays.partial/") for name in left)
    predict_module.predict(xml, source / "good", out, log=lambda line: None)
    rerun = snapshot(out)
    assert not any(".partial" in name or "previous" in name for name in rerun)
    assert len(rerun["scores.csv"].splitlines()) == 1 + len(list((source / "good").glob("*.png")))
    assert {name for name in rerun if name.startswith("overlays/")} == {
        f"overlays/{path.name}" for path in (source / "good").glob("*.png")
    }
    (tmp_path / "unreadable").mkdir()
    (tmp_path / "unreadable" / "empty.png").touch()
    predict_module.predict(xml, tmp_path / "unreadable", out, log=lambda line: None)  # nothing scored: still published
    assert sorted(snapshot(out)) == ["scores.csv"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_a_signal_to_a_predict_process_keeps_the_earlier_run_and_leaves_the_new_one_marked_incomplete(
    exported: tuple, demo_root: Path, tmp_path: Path, signum: signal.Signals
) -> None:
    from anomalib_reconpatch.tools.predict import predict

    xml, out, many = exported[1], tmp_path / "out", tmp_path / "many"
    predict(xml, demo_root / "brick" / "test" / "good", out, log=lambda line: None)
    earlier = snapshot(out)
    sources = sorted((demo_root / "brick" / "test").rglob("*.png"))
    many.mkdir()
    for index in range(300):
        shutil.copyfile(sources[index % len(sources)], many / f"{index:03d}.png")
    command = [sys.executable, "-m", "anomalib_reconpatch.tools.cli", "predict", "--model", str(xml)]
    process = subprocess.Popen(
        [*command, "--input", str(many), "--out", str(out)], stderr=subprocess.PIPE, text=True, preexec_fn=interruptible
    )
    staged = out / "overlays.partial"
    deadline = time.monotonic() + 120
    while process.poll() is None and len(list(staged.glob("*.png"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "predict finished before it could be signalled"
    process.send_signal(signum)
    code = process.wait(timeout=60)
    assert code != 0
    left = snapshot(out)
    assert {name: data for name, data in left.items() if ".partial" not in name} == earlier
    assert 3 <= len([name for name in left if name.startswith("overlays.partial/")]) < 300


def test_predict_gives_same_named_images_an_overlay_each_and_names_broken_links(
    exported: tuple, demo_root: Path, tmp_path: Path
) -> None:
    import csv

    from PIL import Image

    from anomalib_reconpatch.tools.predict import predict

    source = tmp_path / "images"
    source.mkdir()
    good = demo_root / "brick" / "test" / "good" / "000.png"
    Image.open(good).save(source / "x.png")
    Image.open(good).convert("RGB").save(source / "x.jpg", quality=95)
    (source / "gone.png").symlink_to(tmp_path / "moved-away.png")
    lines = []
    summary = predict(exported[1], source, tmp_path / "out", log=lines.append)
    rows = {Path(row["image"]).name: row for row in csv.DictReader(summary.csv_path.open())}
    assert Path(rows["x.png"]["overlay"]).name == "x.png"
    assert Path(rows["x.jpg"]["overlay"]).name == "x.jpg.png"
    assert all(Path(rows[name]["overlay"]).is_file() for name in ("x.png", "x.jpg"))
    assert rows["gone.png"]["score"] == ""
    assert "moved-away.png, which does not exist" in rows["gone.png"]["error"]
    assert any("gone.png" in line for line in lines)
    assert summary.images == 2


def test_predict_output_problems_get_one_line_and_keep_the_earlier_run(
    exported: tuple, demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import errno

    from PIL import Image

    from anomalib_reconpatch.tools.cli import main
    from anomalib_reconpatch.tools.predict import OutputFolderError, predict

    xml, source, out = exported[1], demo_root / "brick" / "test" / "good", tmp_path / "out"
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    assert (
        main(["predict", "--model", str(xml), "--input", str(source), "--out", str(tmp_path / "notes.txt" / "o")]) == 2
    )
    error_lines = capsys.readouterr().err.strip().splitlines()
    assert len(error_lines) == 1
    assert "a file is in the way" in error_lines[0]
    assert "Choose another --out" in error_lines[0]
    predict(xml, source, out, log=lambda line: None)
    earlier = snapshot(out)
    save, saved = Image.Image.save, []

    def disk_fills(image: Image.Image, path: object, *args: object, **kwargs: object) -> None:
        saved.append(path)
        if len(saved) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        save(image, path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Image.Image, "save", disk_fills)
        with pytest.raises(OutputFolderError, match=r"^The disk is full: writing .*overlays\.partial.* failed"):
            predict(xml, source, out, log=lambda line: None)
    assert snapshot(out) == earlier  # nothing of the failed run is left, the earlier one is whole
    real_open = Path.open

    def refused(path: Path, *args: object, **kwargs: object) -> object:
        if path.name.endswith(".partial"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "open", refused)
        with pytest.raises(OutputFolderError, match=r"^No permission to write .*scores\.csv\.partial"):
            predict(xml, source, out, log=lambda line: None)
    assert snapshot(out) == earlier


def test_overlay_names_never_collide() -> None:
    from anomalib_reconpatch.tools.predict import overlay_path_for

    taken: set[Path] = set()
    names = [overlay_path_for(Path(name), taken) for name in ("a/x.jpg", "a/x.png", "a/x.jpg.png", "b/x.PNG")]
    assert names == [Path("a/x.jpg.png"), Path("a/x.png"), Path("a/x.jpg~2.png"), Path("b/x.png")]


def test_predict_compiles_in_float32_unless_asked_otherwise(exported: tuple) -> None:
    import openvino as ov

    from anomalib_reconpatch.tools.predict import compile_options

    assert load_compiled_model(exported[1]).get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    assert compile_options("auto") == {}
    with pytest.raises(ValueError, match="--precision bf16: use f32"):
        compile_options("bf16")


def test_stock_openvino_inferencer_with_the_readme_config_matches_torch(
    exported: tuple, demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from anomalib.deploy import OpenVINOInferencer

    from anomalib_reconpatch.tools.predict import compile_options

    monkeypatch.chdir(tmp_path)  # the inferencer writes openvino_cache/ into the working directory
    model, xml, _ = exported
    inferencer = OpenVINOInferencer(path=xml, device="CPU", config=compile_options())
    images = raw_images(demo_root, "test/scratch", 2)
    with torch.no_grad():
        reference = model(images).pred_score.numpy()
    scores = [float(inferencer.predict(image).pred_score.squeeze()) for image in images]
    assert np.abs(np.array(scores) - reference).max() <= 1e-3


def test_int8_acq_is_refused_before_any_work_and_points_at_ptq(exported: tuple, tmp_path: Path) -> None:
    from anomalib.deploy import CompressionType

    model, _, _ = exported
    with pytest.raises(ValueError, match="Use INT8_PTQ"):
        model.to_openvino(tmp_path / "acq", compression_type=CompressionType.INT8_ACQ)
    assert not (tmp_path / "acq").exists()
