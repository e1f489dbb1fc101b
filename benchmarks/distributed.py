"""One process against DDP (gloo on CPUs, NCCL on GPUs): each rank's training rows, feature memory, peak RSS, phases.

Runs the fit and test of ReConPatch on a datamodule YAML once in one process and once with
``--processes`` DDP processes, each in a fresh Python (Lightning's DDP launcher starts the other ranks
by running the same command again), and writes a table: per rank, the training patches it held, their
size, its peak resident memory (VmHWM), the fit's phases and the test metrics. With ``--num-steps 0``
the bank is the one-process bank; the script says whether it is. ``--accelerator gpu`` runs one process
per GPU instead of per CPU process (NCCL).

    python benchmarks/distributed.py --data configs/data/mpdd_metal_plate.yaml --num-steps 0 --out FILE.md

``--rank-run`` is the mode each run uses: fit, test and write ``rank<R>.json`` (and rank 0's chosen
bank, ``bank.pt``) into ``--record``. ``tests/test_distributed.py`` uses it too.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from anomalib_reconpatch import ReConPatch


class RecordingReConPatch(ReConPatch):
    """ReConPatch that keeps its bank as chosen (before the fold) and the number of training rows it held."""

    def on_memory_bank(self, embedded: torch.Tensor) -> None:
        """Keep the chosen bank and this rank's number of embedded training rows."""
        super().on_memory_bank(embedded)
        self.chosen_bank = self.model.memory_bank.clone()
        self.rows_held = len(embedded)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (VmHWM), in MB."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def fit_and_record(
    data: Path, record: Path, devices: int, num_steps: int | None, ratio: float, accelerator: str = "cpu"
) -> dict:
    """Fit and test on the datamodule of ``data`` with ``devices`` processes; write this rank's record.

    Args:
        data (Path): A stock-CLI datamodule YAML (one category).
        record (Path): Folder for ``rank<R>.json`` and rank 0's ``bank.pt``.
        devices (int): Processes (one per CPU process or GPU); more than one runs DDP.
        num_steps (int | None): Representation training steps; None follows the data.
        ratio (float): Coreset sampling ratio.
        accelerator (str): ``cpu`` (gloo) or ``gpu`` (NCCL). Defaults to ``"cpu"``.

    Returns:
        dict: This rank's record.
    """
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    from anomalib_reconpatch.tools.compare import build_datamodule, load_datamodule_config

    seed_everything(0)
    model = RecordingReConPatch(
        backbone="tf_efficientnet_lite0",
        layers=["blocks.2", "blocks.4"],
        num_steps=num_steps,
        coreset_sampling_ratio=ratio,
    )
    engine = Engine(
        default_root_dir=record / "results",
        logger=False,
        accelerator=accelerator,
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        enable_progress_bar=False,
    )
    datamodule = build_datamodule(load_datamodule_config(data), seed=0)
    engine.fit(model=model, datamodule=datamodule)
    metrics = engine.test(model=model, datamodule=datamodule)[0]
    rank = engine.trainer.global_rank
    result = {
        "rank": rank,
        "world": engine.trainer.world_size,
        "rows": model.rows_held,
        "feature_bytes": model.rows_held * model.model.representation.in_features * 4,
        "peak_rss_mb": peak_rss_mb(),
        "metrics": {key: float(value) for key, value in metrics.items()},
        "fit_timings": model.fit_timings,
    }
    record.mkdir(parents=True, exist_ok=True)
    (record / f"rank{rank}.json").write_text(json.dumps(result))
    if rank == 0:
        torch.save(model.chosen_bank.cpu(), record / "bank.pt")
    return result


def run(
    data: Path, record: Path, devices: int, num_steps: int | None, ratio: float, accelerator: str = "cpu"
) -> list[dict]:
    """One fresh-process run (with its DDP ranks); every rank's record, in rank order."""
    command = [sys.executable, __file__, "--rank-run", "--data", str(data), "--record", str(record)]
    command += ["--processes", str(devices), "--coreset-ratio", str(ratio), "--accelerator", accelerator]
    if num_steps is not None:
        command += ["--num-steps", str(num_steps)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        msg = f"the {devices}-process run failed ({done.returncode}):\n{done.stderr[-4000:]}"
        raise RuntimeError(msg)
    return [json.loads((record / f"rank{rank}.json").read_text()) for rank in range(devices)]


def same_rows(first: torch.Tensor, second: torch.Tensor, atol: float) -> bool:
    """Whether two banks hold the same rows in any order (each row of one has a twin in the other)."""
    if first.shape != second.shape:
        return False
    gaps = torch.cdist(first.double(), second.double(), compute_mode="donot_use_mm_for_euclid_dist")  # exact zeros
    return bool((gaps.min(1).values <= atol).all() and (gaps.min(0).values <= atol).all())


def table(runs: dict[int, list[dict]]) -> list[str]:
    """Markdown rows: one per rank of each run."""
    lines = [
        "| processes | rank | training patches | feature MB | peak RSS MB | features s | representation s "
        "| coreset s | image AUROC | pixel AUROC |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for devices, records in runs.items():
        for record in records:
            timings, metrics = record["fit_timings"], record["metrics"]
            lines.append(
                f"| {devices} | {record['rank']} | {record['rows']} | {record['feature_bytes'] / 2**20:.1f} "
                f"| {record['peak_rss_mb']:.0f} | {timings['features_s']:.1f} | {timings['representation_s']:.1f} "
                f"| {timings['coreset_s']:.1f} | {metrics['image_AUROC']:.4f} | {metrics['pixel_AUROC']:.4f} |"
            )
    return lines


def main() -> int:
    """Run one process and DDP, compare, print (and write) the table; or, with ``--rank-run``, one run."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a datamodule YAML of one category")
    parser.add_argument("--processes", type=int, default=2, help="DDP processes (one per GPU with --accelerator gpu)")
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu", help="cpu: gloo; gpu: NCCL")
    parser.add_argument("--num-steps", type=int, default=None, help="training steps; 0 compares the banks")
    parser.add_argument("--coreset-ratio", type=float, default=0.01)
    parser.add_argument("--out", type=Path, help="also write the table, with this command atop, to this file")
    parser.add_argument("--rank-run", action="store_true", help="internal: fit, test and record one run")
    parser.add_argument("--record", type=Path, help="with --rank-run: where the records go")
    args = parser.parse_args()
    if args.rank_run:
        fit_and_record(args.data, args.record, args.processes, args.num_steps, args.coreset_ratio, args.accelerator)
        return 0
    with tempfile.TemporaryDirectory(prefix="distributed_") as tmp:
        runs = {
            devices: run(
                args.data, Path(tmp) / f"p{devices}", devices, args.num_steps, args.coreset_ratio, args.accelerator
            )
            for devices in (1, args.processes)
        }
        banks = [torch.load(Path(tmp) / f"p{devices}" / "bank.pt") for devices in runs]
    one, many = runs[1][0], runs[args.processes]
    lines = [
        f"data: {args.data}; tf_efficientnet_lite0 blocks.2+4, coreset {args.coreset_ratio}, "
        f"num_steps {args.num_steps if args.num_steps is not None else 'following the data'}; "
        f"{os.cpu_count()} cores, accelerator {args.accelerator}, each run in a fresh process",
        "",
        *table(runs),
        "",
        f"largest rank's feature memory: {max(r['feature_bytes'] for r in many) / one['feature_bytes']:.3f} "
        f"of one process's; peak RSS: {max(r['peak_rss_mb'] for r in many) / one['peak_rss_mb']:.3f}",
        f"same bank as one process (as a set of rows, to 1e-4): {same_rows(banks[0], banks[1], atol=1e-4)}",
    ]
    print("\n".join(lines))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        where = "CPU processes" if args.accelerator == "cpu" else "GPUs"
        head = [f"# One process against DDP on {where}", "", f"`{shlex.join(['python', *sys.argv])}`", ""]
        args.out.write_text("\n".join(head + lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
