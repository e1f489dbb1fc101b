"""Load test of ``reconpatch predict``: throughput and peak memory on 100 and 1,000 images.

Writes copies of the demo test images into a temporary folder (never the user's data), runs
``reconpatch predict`` on each folder size in a fresh subprocess, and prints one table row per
size. Peak RSS is the child's VmHWM, printed by the child as it exits (``ru_maxrss`` would count
the memory this parent held when it forked the child); images/s is what
predict reports for its loop (reading, inference, overlay and CSV writing), and the wall time
includes interpreter start-up and model compilation. Streaming means peak RSS stays flat as the
folder grows.

    .venv/bin/python benchmarks/predict_load.py               # builds a small demo model first
    .venv/bin/python benchmarks/predict_load.py --model model.xml --counts 100 1000 5000
    .venv/bin/python benchmarks/predict_load.py --counts 100 --large 8000 6000   # plus one 48-megapixel image
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import write_report


def build_model(work: Path, image_size: int) -> Path:
    """Train a small ReConPatch on the demo grass category and export it to OpenVINO."""
    import torch
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine

    from anomalib_reconpatch import ReConPatch
    from anomalib_reconpatch.tools.demo_data import DemoConfig, write_demo_dataset
    from anomalib_reconpatch.tools.weights import write_lite_weights

    write_lite_weights(0)
    write_demo_dataset(work / "demo", ("grass",), DemoConfig(image_size=image_size))
    torch.manual_seed(0)
    model = ReConPatch(
        backbone="tf_efficientnet_lite0", layers=["blocks.2", "blocks.4"], num_steps=100, coreset_sampling_ratio=0.02
    )
    engine = Engine(default_root_dir=work / "results", logger=False, enable_progress_bar=False)
    engine.fit(model=model, datamodule=MVTecAD(root=work / "demo", category="grass", num_workers=0))
    return model.eval().to_openvino(work / "openvino")


def cpu_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, or the machine type where there is none."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def write_large_image(source: Path, folder: Path, size: tuple[int, int]) -> None:
    """One PNG of ``size`` (width, height) in ``folder``: a demo test image enlarged, as a camera's photo."""
    from PIL import Image

    folder.mkdir(parents=True)
    with Image.open(source) as image:
        image.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(folder / "large.png")


def write_images(sources: list[Path], folder: Path, count: int) -> None:
    """``count`` images in ``folder``: the demo test images copied round-robin."""
    folder.mkdir(parents=True)
    for index in range(count):
        shutil.copyfile(sources[index % len(sources)], folder / f"{index:05d}.png")


# ``reconpatch predict`` that prints its own peak resident memory (VmHWM) when it exits.
_PREDICT = """
import atexit, sys
from anomalib_reconpatch.tools.cli import main
status = open("/proc/self/status").read
atexit.register(lambda: print("VmHWM MB", int(status().split("VmHWM:")[1].split()[0]) / 1024, flush=True))
sys.exit(main(sys.argv[1:]))
"""


def run_predict(model: Path, images: Path, out: Path) -> dict[str, float]:
    """One ``reconpatch predict`` subprocess: wall time, the loop's images/s and the child's peak RSS."""
    command = [sys.executable, "-c", _PREDICT, "predict"]
    command += ["--model", str(model), "--input", str(images), "--out", str(out)]
    out.mkdir(parents=True)
    log = out.parent / f"{out.name}.log"
    start = time.perf_counter()
    with log.open("w") as handle:  # a file, not a pipe: a chatty child can never block on a full pipe
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, text=True, check=False).returncode
    wall = time.perf_counter() - start
    stdout = log.read_text()
    if code != 0:
        msg = f"reconpatch predict failed ({code}):\n{stdout[-2000:]}"
        raise RuntimeError(msg)
    found = re.search(r"(\d+) images in ([\d.]+) s \(([\d.]+) images/s\)", stdout)
    if found is None:
        msg = f"unexpected predict output: {stdout[-500:]}"
        raise RuntimeError(msg)
    peak = re.search(r"VmHWM MB ([\d.]+)", stdout)
    if peak is None:
        msg = f"predict did not report its peak memory: {stdout[-500:]}"
        raise RuntimeError(msg)
    return {
        "images": int(found.group(1)),
        "loop_s": float(found.group(2)),
        "images_per_s": float(found.group(3)),
        "wall_s": wall,
        "peak_rss_mb": float(peak.group(1)),
    }


def main(argv: list[str] | None = None) -> int:
    """Build or take a model, run predict on each folder size, print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="exported model.xml; default: train and export a small demo model")
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--image-size", type=int, default=256, help="side of the demo images written (pixels)")
    parser.add_argument(
        "--large", type=int, nargs=2, metavar=("WIDTH", "HEIGHT"), help="also predict one image of this size"
    )
    parser.add_argument("--out", type=Path, help="also write the table, with this command atop, to this file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="predict_load_") as tmp:
        work = Path(tmp)
        model = args.model or build_model(work, args.image_size)
        demo = work / "demo"
        if not demo.is_dir():
            from anomalib_reconpatch.tools.demo_data import DemoConfig, write_demo_dataset

            write_demo_dataset(demo, ("grass",), DemoConfig(image_size=args.image_size))
        sources = sorted((demo / "grass" / "test").rglob("*.png"))
        rows = []
        for count in args.counts:
            write_images(sources, work / f"images_{count}", count)
            rows.append(run_predict(model, work / f"images_{count}", work / f"out_{count}"))
            shutil.rmtree(work / f"images_{count}")
            shutil.rmtree(work / f"out_{count}")
        if args.large:
            write_large_image(sources[0], work / "large", tuple(args.large))
            rows.append({**run_predict(model, work / "large", work / "out_large"), "size": tuple(args.large)})
    lines = [
        f"model: {args.model or 'demo grass, built here'}; images {args.image_size}x{args.image_size} px PNG"
        + (f", and one {args.large[0]}x{args.large[1]} px PNG (a demo image enlarged)" if args.large else ""),
        "",
        "| images | wall s | loop s | images/s | peak RSS MB |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        images = f"1 of {row['size'][0]}x{row['size'][1]} px" if "size" in row else str(row["images"])
        lines.append(
            f"| {images} | {row['wall_s']:.1f} | {row['loop_s']:.1f} | {row['images_per_s']:.1f} "
            f"| {row['peak_rss_mb']:.0f} |"
        )
    counted = [row for row in rows if "size" not in row]
    if len(counted) > 1:
        growth = counted[-1]["peak_rss_mb"] - counted[0]["peak_rss_mb"]
        first, last = counted[0]["images"], counted[-1]["images"]
        lines += ["", f"peak RSS change from {first} to {last} images: {growth:+.0f} MB"]
    head = [
        "# reconpatch predict: throughput and peak memory",
        "",
        f"`{shlex.join(['python', *sys.argv])}`",
        "",
        f"{cpu_name()}, {os.cpu_count()} cores, {platform.platform()}; each run in a fresh process.",
        "",
    ]
    write_report("\n".join(head + lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
