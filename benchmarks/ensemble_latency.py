"""OpenVINO FP32 latency of the ensemble against the single ``tf_efficientnet_lite0`` ReConPatch.

    python benchmarks/ensemble_latency.py --data configs/data/bottle.yaml --out results/bench/ensemble

Both models are fitted with anomalib's Engine at ``--coreset-ratio`` (default 0.01) and
``--num-steps`` (default 0: the latency does not depend on what ``f`` learned, only on the
backbones and the banks' sizes) and exported with ``to_openvino``; then one fresh process times
both IRs in turn on real test images at batch 1 (``benchmarks/ir_timing.py``), so a change in the
machine's load hits them alike.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from anomalib.engine import Engine
from common import data_parser
from ir_timing import interleaved_ms

from anomalib_reconpatch import ReConPatch, ReConPatchEnsemble
from anomalib_reconpatch.tools.compare import build_datamodule, image_shape, load_datamodule_config


def main() -> None:
    """Fit, export and time the single model and the ensemble."""
    parser = data_parser(__doc__)
    parser.add_argument("--coreset-ratio", type=float, default=0.01)
    parser.add_argument("--num-steps", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {"layers": args.layers, "coreset_sampling_ratio": args.coreset_ratio, "num_steps": args.num_steps}
    models = {
        "ReConPatch, tf_efficientnet_lite0": ReConPatch(backbone="tf_efficientnet_lite0", **settings),
        "ReConPatchEnsemble, lite0 + lite1 + lite2": ReConPatchEnsemble(**settings),
    }
    irs = {}
    for index, (name, model) in enumerate(models.items()):
        torch.manual_seed(0)
        datamodule = build_datamodule(load_datamodule_config(args.data), seed=0)
        model.pre_processor = model.configure_pre_processor(image_size=image_shape(args.image_size))
        Engine(default_root_dir=args.out / "runs", logger=False).fit(model=model, datamodule=datamodule)
        irs[name] = (model.to_openvino(args.out / f"model_{index}"), 1)
        print(f"{name}: exported, bank rows per member {[int(m.shape[0]) for m in banks(model)]}", flush=True)
    datamodule = build_datamodule(load_datamodule_config(args.data), seed=0)
    datamodule.setup()
    images = torch.cat([batch.image for batch in datamodule.test_dataloader()])[:20]
    sample = args.out / "images.npy"
    np.save(sample, images.numpy())
    times = interleaved_ms(irs, sample, args.repeats)
    single = next(iter(times.values()))
    print(f"{args.data.stem}, coreset ratio {args.coreset_ratio}, batch 1, images {tuple(images.shape[-2:])}")
    print("| model | ms/image | vs single |\n|---|---|---|")
    for name, ms in times.items():
        print(f"| {name} | {ms:.1f} | {ms / single:.2f}x |")


def banks(model: torch.nn.Module) -> list[torch.Tensor]:
    """The memory bank of each member (one for the single model)."""
    members = getattr(model.model, "members", [model.model])
    return [member.memory_bank for member in members]


if __name__ == "__main__":
    main()
