"""DDP on CPU (gloo), and on two GPUs (NCCL) where there are: each rank reads its part of the data, and the bank
and metrics are one process's. On a GPU the fit scores as on the CPU."""

from __future__ import annotations

import importlib.util
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from anomalib_reconpatch.components.coreset import FastKCenterGreedy
from anomalib_reconpatch.components.distributed import ProcessGroupAgreement, Shard, first_sightings, gather_rows

from .test_coreset import clustered_points

DRIVER = Path(__file__).parents[1] / "benchmarks" / "distributed.py"


def load_driver() -> ModuleType:
    """``benchmarks/distributed.py`` as a module, whose ``run`` fits in fresh processes."""
    spec = importlib.util.spec_from_file_location("distributed_benchmark", DRIVER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def data_config(root: Path, path: Path, **init_args: object) -> Path:
    """A datamodule YAML of ``root/brick``, validated on its test set."""
    extra = "".join(f"  {key}: {value}\n" for key, value in init_args.items())
    path.write_text(
        "class_path: anomalib.data.MVTecAD\n"
        f"init_args:\n  root: {root}\n  category: brick\n  num_workers: 0\n  val_split_mode: same_as_test\n{extra}"
    )
    return path


@pytest.fixture
def demo_data(demo_root: Path, tmp_path: Path) -> Path:
    """A datamodule YAML of the demo brick category."""
    return data_config(demo_root, tmp_path / "demo.yaml")


@pytest.fixture
def uneven_data(demo_root: Path, tmp_path: Path) -> Path:
    """The demo brick category less one training image, in batches that split unevenly over 2 ranks.

    23 images give the ranks 12 and 11; in batches of 11, one rank would run a batch more than the other.
    """
    root = tmp_path / "uneven"
    shutil.copytree(demo_root / "brick", root / "brick")
    images = sorted((root / "brick" / "train" / "good").glob("*.png"))
    for path in images[23:]:
        path.unlink()
    return data_config(root, tmp_path / "uneven.yaml", train_batch_size=11)


# Each DDP test runs on CPU processes (gloo) and, on a machine with two CUDA GPUs, on them (NCCL).
ACCELERATORS = pytest.mark.parametrize(
    "accelerator",
    [
        "cpu",
        pytest.param(
            "gpu",
            marks=pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL DDP needs two CUDA GPUs"),
        ),
    ],
)


def free_port() -> int:
    """A TCP port nobody listens on now, for the process group's rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_shards_split_a_dataset_into_disjoint_parts_and_fill_up_only_with_their_own_items() -> None:
    items = list(range(7))
    for size in (1, 2, 3):
        parts = [[Shard(items, rank, size)[i] for i in range(len(Shard(items, rank, size)))] for rank in range(size)]
        assert sorted(item for part in parts for item in part) == items
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    filled = Shard(items, 1, 2, length=4)
    assert [filled[i] for i in range(len(filled))] == [1, 3, 5, 1]


def test_first_sightings_skip_repeats_within_an_epoch() -> None:
    seen: set[str] = set()
    assert first_sightings(["a", "b"], seen) is None
    assert first_sightings(["b", "c", "c"], seen) == [False, True, False]
    assert first_sightings(None, seen) is None


RATIOS = (0.05, 1.0)
"""A coreset the ranks choose together, and one that keeps (gathers) every row."""


def select_on_shard(rank: int, size: int, port: int, features: torch.Tensor, out: Path) -> None:
    """One rank of the coreset test: select from its shard with the others at each ratio and save what it got."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        shard = features[rank::size]
        agreement = ProcessGroupAgreement()
        banks = [FastKCenterGreedy(shard, ratio, agreement=agreement).sample_coreset() for ratio in RATIOS]
        torch.save({"banks": banks, "gathered": gather_rows(shard[: rank + 1])}, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_coreset_chooses_the_one_process_rows_and_every_rank_holds_them(tmp_path: Path) -> None:
    features = clustered_points(3000, 16, seed=4)
    mp.spawn(select_on_shard, args=(2, free_port(), features, tmp_path), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for index, ratio in enumerate(RATIOS):
        alone = FastKCenterGreedy(features, ratio).sample_coreset()
        assert torch.equal(ranks[0]["banks"][index], ranks[1]["banks"][index])
        assert load_driver().same_rows(ranks[0]["banks"][index], alone, atol=0.0)
    assert torch.equal(ranks[0]["gathered"], torch.cat([features[0:1], features[1:2], features[3:4]]))


def printed_metric(output: str, name: str) -> float:
    """A metric from the table that ``anomalib train`` prints after testing."""
    found = re.search(rf"{name}\s*\W\s*([0-9.]+)", output)
    assert found is not None, f"{name} not printed:\n{output[-3000:]}"
    return float(found.group(1))


@pytest.mark.slow
@ACCELERATORS
def test_two_process_ddp_fit_gives_the_one_process_bank_and_metrics_on_half_the_features_each(
    lite_weights: None, uneven_data: Path, tmp_path: Path, accelerator: str
) -> None:
    driver = load_driver()
    ranks = driver.run(uneven_data, tmp_path / "ddp", devices=2, num_steps=0, ratio=0.05, accelerator=accelerator)
    alone = driver.run(uneven_data, tmp_path / "alone", devices=1, num_steps=0, ratio=0.05, accelerator=accelerator)[0]
    assert [record["world"] for record in ranks] == [2, 2]
    assert sum(record["rows"] for record in ranks) == alone["rows"]
    assert max(record["feature_bytes"] for record in ranks) <= 0.55 * alone["feature_bytes"]
    bank_alone, bank_ddp = torch.load(tmp_path / "alone" / "bank.pt"), torch.load(tmp_path / "ddp" / "bank.pt")
    assert driver.same_rows(bank_ddp, bank_alone, atol=1e-4)
    for record in ranks:
        assert record["metrics"] == pytest.approx(alone["metrics"], abs=1e-6)


@pytest.mark.slow
@ACCELERATORS
def test_stock_cli_trains_with_ddp_on_two_processes_within_seed_noise_of_one(
    lite_weights: None, demo_root: Path, demo_data: Path, tmp_path: Path, accelerator: str
) -> None:
    # in a process of its own, so that no GPU is held by this one while the DDP ranks start
    trained_alone = load_driver().run(
        demo_data, tmp_path / "alone", devices=1, num_steps=None, ratio=0.05, accelerator=accelerator
    )[0]
    command = [str(Path(sys.executable).with_name("anomalib")), "train", "--model", "ReConPatch"]
    command += ["--model.backbone", "tf_efficientnet_lite0", "--model.layers", "[blocks.2, blocks.4]"]
    command += ["--model.coreset_sampling_ratio", "0.05", "--seed_everything", "0"]
    command += ["--data", "anomalib.data.MVTecAD", "--data.root", str(demo_root), "--data.category", "brick"]
    command += ["--data.num_workers", "0", "--data.val_split_mode", "same_as_test"]
    command += ["--trainer.accelerator", accelerator, "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    command += ["--default_root_dir", str(tmp_path / "cli")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in output
    for key in ("image_AUROC", "pixel_AUROC"):
        assert printed_metric(output, key) == pytest.approx(trained_alone["metrics"][key], abs=0.02)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs a CUDA GPU")
def test_a_one_gpu_fit_scores_the_test_set_as_the_cpu_fit_does(
    lite_weights: None, demo_data: Path, tmp_path: Path
) -> None:
    driver = load_driver()
    gpu = driver.run(demo_data, tmp_path / "gpu", devices=1, num_steps=None, ratio=0.05, accelerator="gpu")[0]
    cpu = driver.run(demo_data, tmp_path / "cpu", devices=1, num_steps=None, ratio=0.05, accelerator="cpu")[0]
    # cuDNN's convolutions round otherwise (TF32 by default on recent GPUs): close, not equal
    for key in ("image_AUROC", "pixel_AUROC"):
        assert gpu["metrics"][key] == pytest.approx(cpu["metrics"][key], abs=0.01)
