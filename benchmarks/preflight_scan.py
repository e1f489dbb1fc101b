"""Cost of ReConPatch's pre-flight image scan (a full decode of every image and mask) on a data set.

    .venv/bin/python benchmarks/preflight_scan.py --data configs/data/bottle.yaml

Prints, per split set the model's ``setup`` hook scans, the number of files and the best of
``--repeats`` wall times (the first run also pays the cold page cache).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from anomalib_reconpatch.components.preflight import STAGE_SPLITS, check_datamodule, sample_paths
from anomalib_reconpatch.tools.compare import build_datamodule, load_datamodule_config


def main(argv: list[str] | None = None) -> int:
    """Scan each stage's splits ``--repeats`` times and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="datamodule YAML, e.g. configs/data/bottle.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    datamodule = build_datamodule(load_datamodule_config(args.data), seed=0)
    datamodule.setup()
    print(f"data: {args.data}")
    print("| stage | splits | files | first s | best s | ms per file |")
    print("|---|---|---:|---:|---:|---:|")
    for stage in ("fit", "test"):
        splits = STAGE_SPLITS[stage]
        files = len({path for split in splits for path in sample_paths(getattr(datamodule, split))})
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            check_datamodule(datamodule, splits)
            times.append(time.perf_counter() - start)
        best = min(times)
        print(f"| {stage} | {', '.join(splits)} | {files} | {times[0]:.2f} | {best:.2f} | {1000 * best / files:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
