"""A really full disk (a small tmpfs) stops predict and the feature spill with one line and loses nothing.

Each test runs its commands in a private mount namespace (``unshare``) with a tmpfs of a few hundred
kilobytes, so nothing outside the test sees the mount. Where the kernel does not allow that, the tests
skip; the injected ``ENOSPC`` tests in ``test_export.py`` and ``test_spill.py`` still run everywhere.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import BACKBONE, LAYERS
from .test_export import snapshot


def can_mount_tmpfs(tmp_path: Path) -> bool:
    """Whether ``unshare`` can mount a tmpfs here (root, or user namespaces allowed)."""
    if shutil.which("unshare") is None:
        return False
    point = tmp_path / "probe"
    point.mkdir()
    probe = f"mount -t tmpfs -o size=64k tmpfs {shlex.quote(str(point))}"
    return subprocess.run(["unshare", "-rm", "sh", "-c", probe], capture_output=True, check=False).returncode == 0


def on_small_tmpfs(tmp_path: Path, mount_point: Path, size_kb: int, script: str) -> subprocess.CompletedProcess:
    """Run a shell ``script`` with a ``size_kb`` tmpfs on ``mount_point``, visible to this script only."""
    if not can_mount_tmpfs(tmp_path):
        pytest.skip("no tmpfs can be mounted here (unshare or mount not permitted)")
    mount_point.mkdir(parents=True, exist_ok=True)
    mount = f"mount -t tmpfs -o size={size_kb}k tmpfs {shlex.quote(str(mount_point))}"
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"{mount} && {script}"], capture_output=True, text=True, check=False
    )


def test_predict_filling_the_disk_keeps_the_earlier_run_and_says_so(
    demo_model: dict, demo_root: Path, tmp_path: Path
) -> None:
    from anomalib_reconpatch.tools.predict import predict

    few, many = demo_root / "brick" / "test" / "good", demo_root / "brick" / "test"
    predict(demo_model["xml"], few, tmp_path / "sizing", log=lambda line: None)
    room_kb = sum(path.stat().st_size for path in (tmp_path / "sizing").rglob("*") if path.is_file()) * 3 // 2048
    disk, before, after = tmp_path / "disk", tmp_path / "before", tmp_path / "after"
    out, python = disk / "out", shlex.quote(sys.executable)
    predict_command = f"{python} -m anomalib_reconpatch.tools.cli predict --model {shlex.quote(str(demo_model['xml']))}"
    script = (
        f"{predict_command} --input {shlex.quote(str(few))} --out {out} > /dev/null && cp -r {out} {before} && "
        f"{{ {predict_command} --input {shlex.quote(str(many))} --out {out}; echo exit=$?; }}; cp -r {out} {after}"
    )
    done = on_small_tmpfs(tmp_path, disk, room_kb, script)
    assert before.is_dir(), done.stderr
    assert "exit=2" in done.stdout, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("reconpatch predict: error:")]
    assert len(errors) == 1, done.stderr
    assert f"The disk is full: writing {out}" in errors[0]
    assert errors[0].endswith(f"Free some space or choose another --out. Earlier results in {out}, if any, are kept.")
    assert snapshot(after) == snapshot(before)  # the earlier run, whole; nothing staged is left


def test_spill_filling_the_disk_stops_the_fit_naming_tmpdir_and_leaves_no_file(
    lite_weights: None, demo_root: Path, tmp_path: Path
) -> None:
    disk = tmp_path / "tmpdir"
    fit = (
        "from anomalib.data import MVTecAD\n"
        "from anomalib.engine import Engine\n"
        "from anomalib_reconpatch import ReConPatch\n"
        f"model = ReConPatch(backbone={BACKBONE!r}, layers={LAYERS!r}, num_steps=5, feature_memory_mb=0.5)\n"
        f"datamodule = MVTecAD(root={str(demo_root)!r}, category='brick', num_workers=0)\n"
        f"engine = Engine(default_root_dir={str(tmp_path / 'results')!r}, logger=False)\n"
        "engine.fit(model=model, datamodule=datamodule)\n"
    )
    (tmp_path / "fit.py").write_text(fit)
    script = f"TMPDIR={disk} {shlex.quote(sys.executable)} {tmp_path / 'fit.py'}; echo exit=$?; ls -A {disk}"
    done = on_small_tmpfs(tmp_path, disk, 512, script)
    assert "exit=1" in done.stdout, done.stdout + done.stderr[-3000:]
    assert f"Writing the feature spill file under {disk} failed" in done.stderr
    assert "Point TMPDIR at a disk with more room, or raise --model.feature_memory_mb" in done.stderr
    assert done.stdout.strip().splitlines()[-1] == "exit=1"  # ls printed nothing: no spill folder is left
