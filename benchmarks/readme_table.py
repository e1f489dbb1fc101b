"""The README's results table, read from the reports that ``benchmarks/readme_results.sh`` wrote.

    python benchmarks/readme_table.py docs/results/bottle docs/results/ksdd docs/results/mpdd_metal_plate

Each row is one data set and model: image AUROC, pixel AUROC and PRO as mean ± sample standard
deviation over the report's seeds, the mean fit time and the largest peak memory of any seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

METRICS = ("image_AUROC", "pixel_AUROC", "pixel_PRO")


def cell(values: list[float]) -> str:
    """``mean ± sd`` to three decimals (the sd needs two or more values)."""
    spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):.3f}{spread}"


def rows(report: dict, folder: Path) -> list[str]:
    """One Markdown row per model of one report, linked to the report (as a path from the working directory)."""
    per_seed = list(report["per_seed"].values())
    out = []
    for model in per_seed[0]:
        runs = [seed[model] for seed in per_seed]
        metrics = [cell([run[key] for run in runs]) for key in METRICS]
        fit = statistics.fmean(run["fit_s"] for run in runs)
        peak = max(run["peak_rss_mb"] for run in runs)
        link = f"[{folder.name}]({folder.as_posix()}/report.md)"
        out.append(f"| {link} | {model} | " + " | ".join(metrics) + f" | {fit:.0f} | {peak:.0f} |")
    return out


def main() -> None:
    """Print the table for the report folders given on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="folders holding a report.json of reconpatch compare")
    args = parser.parse_args()
    print("| data | model | image AUROC | pixel AUROC | PRO | fit s | peak MB |")
    print("|---|---|---|---|---|---|---|")
    for folder in args.folders:
        report = json.loads((folder / "report.json").read_text())
        for row in rows(report, folder):
            print(row)


if __name__ == "__main__":
    main()
