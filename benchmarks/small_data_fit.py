"""Fit time on data the size of anomalib's integration tests: ReConPatch against stock PatchCore, default settings.

anomalib's model tests fit every model on a handful of generated images: five small training images,
each one random colour, and test images in which a shape of another colour is the defect. This script
writes such a set (MVTec layout, seeded, 64 x 64 PNGs) and runs ``reconpatch compare`` on it, which
trains and tests both models in fresh processes with the defaults, then prints each model's fit and its
phases, and the ratio of the fits.

    python benchmarks/small_data_fit.py --out docs/results/small_data/fit.md
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
from common import write_report
from PIL import Image

CATEGORY = "shapes"


def write_data(root: Path, num_train: int, num_test: int, side: int, seed: int) -> Path:
    """Write the small data set under ``root`` and a datamodule YAML beside it; return the YAML's path."""
    rng = np.random.default_rng(seed)
    base = root / CATEGORY

    def plain() -> np.ndarray:
        return np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), (side, side, 3)).copy()

    def save(array: np.ndarray, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)

    for i in range(num_train):
        save(plain(), base / "train" / "good" / f"{i:03}.png")
    for i in range(num_test):
        save(plain(), base / "test" / "good" / f"{i:03}.png")
        image, mask = plain(), np.zeros((side, side), dtype=np.uint8)
        top, left = rng.integers(0, side // 2, 2)
        height, width = rng.integers(side // 8, side // 2, 2)
        image[top : top + height, left : left + width] = rng.integers(0, 256, 3, dtype=np.uint8)
        mask[top : top + height, left : left + width] = 255
        save(image, base / "test" / "bad" / f"{i:03}.png")
        save(mask, base / "ground_truth" / "bad" / f"{i:03}_mask.png")
    config = root / "data.yaml"
    config.write_text(
        "class_path: anomalib.data.MVTecAD\ninit_args:\n"
        f"  root: {root.resolve()}\n  category: {CATEGORY}\n  train_batch_size: 32\n  eval_batch_size: 32\n"
        "  num_workers: 0\n"
    )
    return config


def main() -> None:
    """Write the data, run ``reconpatch compare`` and report the fit times."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=Path("results/small_data"), help="where the images go")
    parser.add_argument("--num-train", type=int, default=5)
    parser.add_argument("--num-test", type=int, default=5, help="good and defective test images, each")
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--coreset-ratio", type=float, default=0.1, help="the models' default")
    parser.add_argument("--out", type=Path, help="also write the table here (Markdown)")
    args = parser.parse_args()
    config = write_data(args.root / "data", args.num_train, args.num_test, args.side, seed=0)
    report_dir = args.root / "compare"
    command = [
        str(Path(sys.executable).with_name("reconpatch")),
        "compare",
        "--data",
        str(config),
        "--coreset-ratio",
        str(args.coreset_ratio),
        "--seed",
        "0",
        "--out",
        str(report_dir),
    ]
    subprocess.run(command, check=True)
    models = json.loads((report_dir / "report.json").read_text())["models"]
    phases = ("fit_s", "features_s", "representation_s", "coreset_s")
    lines = [
        "| model | fit s | features s | representation s | coreset s | image AUROC |",
        "|---|---|---|---|---|---|",
        *(
            f"| {name} | " + " | ".join(f"{m[p]:.1f}" for p in phases) + f" | {m['image_AUROC']:.3f} |"
            for name, m in models.items()
        ),
    ]
    ratio = models["ReConPatch"]["fit_s"] / models["Patchcore"]["fit_s"]
    text = (
        f"`python {shlex.join(sys.argv)}`\n\n{args.num_train} training and {2 * args.num_test} test images, "
        f"{args.side} x {args.side} px, coreset ratio {args.coreset_ratio}, seed 0, defaults otherwise\n\n"
        + "\n".join(lines)
        + f"\n\nReConPatch's fit / PatchCore's: {ratio:.2f}\n"
    )
    write_report(text, args.out)


if __name__ == "__main__":
    main()
