"""Time OpenVINO IRs against each other in one fresh process, one inference of each in turn.

    python benchmarks/ir_timing.py --images results/bench/export/images.npy old.xml new.xml

On a shared machine the load changes between processes; taking the IRs in turn within one process
gives every IR the same load, so their ratios hold even when the absolute times drift. Peak memory
needs a process per IR (``peak_rss_mb``). ``benchmarks/export.py`` uses both.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

_INTERLEAVED = """
import json, statistics, sys, time, numpy as np, openvino as ov
from anomalib_reconpatch.tools.predict import compile_options
F32 = compile_options()
irs, images, repeats = json.loads(sys.argv[1]), np.load(sys.argv[2]), int(sys.argv[3])
core = ov.Core()
compiled = {name: (core.compile_model(xml, "CPU", F32), batch) for name, (xml, batch) in irs.items()}
for model, batch in compiled.values():
    model(images[:batch])
times = {name: [] for name in compiled}
for i in range(repeats):
    for name, (model, batch) in compiled.items():
        start = i * batch % (len(images) - batch + 1)
        tick = time.perf_counter()
        model(images[start:start + batch])
        times[name].append((time.perf_counter() - tick) * 1000 / batch)
print(json.dumps({name: statistics.median(t) for name, t in times.items()}))
"""

_PEAK_RSS = """
import sys, numpy as np, openvino as ov
from anomalib_reconpatch.tools.predict import compile_options  # imports neither torch nor anomalib (a test checks)
F32 = compile_options()
images, batch = np.load(sys.argv[2]), int(sys.argv[3])
compiled = ov.Core().compile_model(sys.argv[1], "CPU", F32)
for start in range(0, 3 * batch, batch):
    compiled(images[start:start + batch])
print(int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024)
"""


def interleaved_ms(irs: dict[str, tuple[Path, int]], images: Path, repeats: int) -> dict[str, float]:
    """Median ms per image of each ``name -> (xml, batch)``, all compiled in one fresh process and run in turn."""
    spec = json.dumps({name: (str(xml), batch) for name, (xml, batch) in irs.items()})
    command = [sys.executable, "-c", _INTERLEAVED, spec, str(images), str(repeats)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def peak_rss_mb(xml: Path, images: Path, batch: int) -> float:
    """Peak resident memory (VmHWM) of a fresh process that compiles ``xml`` and runs it three times."""
    command = [sys.executable, "-c", _PEAK_RSS, str(xml), str(images), str(batch)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def main() -> None:
    """Print each IR's median ms per image and its ratio to the first IR's."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("xml", type=Path, nargs="+", help="OpenVINO .xml files")
    parser.add_argument("--images", type=Path, required=True, help=".npy of N x 3 x H x W images in [0, 1]")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    missing = [str(xml) for xml in args.xml if not xml.is_file()]
    if missing:
        parser.error(f"no such IR: {', '.join(missing)}")
    times = interleaved_ms({str(xml): (xml, args.batch) for xml in args.xml}, args.images, args.repeats)
    first = times[str(args.xml[0])]
    print("| IR | ms/image | vs first |\n|---|---|---|")
    for name, ms in times.items():
        print(f"| {name} | {ms:.1f} | {first / ms:.2f}x |")


if __name__ == "__main__":
    main()
