"""The stock anomalib CLI trains ReConPatch by short name, by class path and from the shipped config."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

from .conftest import REPO

BIN = Path(sys.executable).parent


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_startup_hook_imports_nothing_heavy() -> None:
    code = "import sys; print(any(m in sys.modules for m in ('torch', 'anomalib', 'anomalib_reconpatch')))"
    assert run([sys.executable, "-c", code], REPO).stdout.strip() == "False"
    code = "import sys, anomalib.models; print('anomalib_reconpatch' in sys.modules)"
    assert run([sys.executable, "-c", code], REPO).stdout.strip() == "True"


def test_wheel_records_the_hook_so_uninstall_removes_it(tmp_path: Path) -> None:
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        REPO,
    )
    wheel = next(tmp_path.glob("anomalib_reconpatch-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        record = archive.read(next(n for n in names if n.endswith("RECORD"))).decode()
        pth = archive.read("anomalib_reconpatch.pth").decode()
    assert pth.strip() == "import _anomalib_reconpatch_hook"
    for installed in ("anomalib_reconpatch.pth", "_anomalib_reconpatch_hook.py", "anomalib_reconpatch/__init__.py"):
        assert installed in names
        assert re.search(rf"^{re.escape(installed)},", record, re.M)


def metrics_from(output: str) -> dict[str, float]:
    return {m[0]: float(m[1]) for m in re.findall(r"│\s+(image_AUROC|pixel_AUROC)\s+│\s+([\d.]+)", output)}


def test_stock_cli_resolves_the_class_path(tmp_path: Path) -> None:
    """The class path resolves to the same model; training it is the short name's test below."""
    command = [str(BIN / "anomalib"), "train", "--model", "anomalib_reconpatch.ReConPatch", "--print_config"]
    result = run([*command, "--model.backbone", "tf_efficientnet_lite0", "--model.num_steps", "100"], tmp_path)
    assert "class_path: anomalib_reconpatch.ReConPatch" in result.stdout
    assert "num_steps: 100" in result.stdout


def test_stock_cli_trains_by_name(demo_root: Path, lite_weights: None, tmp_path: Path) -> None:
    result = run(
        [
            str(BIN / "anomalib"),
            "train",
            "--model",
            "ReConPatch",
            "--data",
            "anomalib.data.MVTecAD",
            "--data.root",
            str(demo_root),
            "--data.category",
            "brick",
            "--data.num_workers",
            "0",
            "--model.backbone",
            "tf_efficientnet_lite0",
            "--model.layers",
            "[blocks.2, blocks.4]",
            "--model.num_steps",
            "100",
            "--default_root_dir",
            str(tmp_path),
        ],
        tmp_path,
    )
    metrics = metrics_from(result.stdout)
    assert metrics["image_AUROC"] >= 0.9, result.stdout[-2000:]
    assert list(tmp_path.rglob("*.ckpt")), "no checkpoint written"


def test_stock_cli_reads_the_shipped_config_which_lists_every_default(tmp_path: Path) -> None:
    """The config parses in the stock CLI, and says what the model really defaults to (training: the test above)."""
    import inspect

    import yaml

    from anomalib_reconpatch import ReConPatch

    config = REPO / "configs" / "reconpatch.yaml"
    printed = yaml.safe_load(
        run([str(BIN / "anomalib"), "train", "--config", str(config), "--print_config"], tmp_path).stdout
    )
    assert printed["model"]["class_path"] == "anomalib_reconpatch.ReConPatch"
    shipped = yaml.safe_load(config.read_text())["model"]["init_args"]
    defaults = {name: parameter.default for name, parameter in inspect.signature(ReConPatch).parameters.items()}
    for name in set(shipped) - {"backbone", "layers"}:  # the offline backbone instead of wide_resnet50_2
        assert printed["model"]["init_args"][name] == defaults[name], name
    assert set(defaults) - set(shipped) <= {"pre_processor", "post_processor", "evaluator", "visualizer"}
