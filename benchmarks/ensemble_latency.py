"""OpenVINO FP32 latency of ensembles against the single ``tf_efficientnet_lite0`` ReConPatch.

    python benchmarks/ensemble_latency.py --data configs/data/bottle.yaml --out results/bench/ensemble \
        --ensembles tf_efficientnet_lite0,tf_efficientnet_lite1,tf_efficientnet_lite2 \
        tf_efficientnet_lite0,tf_efficientnet_lite1

``--ensembles`` lists the ensembles to time (default: the three offline backbones).

Every model is fitted with anomalib's Engine at ``--coreset-ratio`` (default 0.01) and
``--num-steps`` (default 0: the latency does not depend on what ``f`` learned, only on the
backbones and the banks' sizes) and exported with ``to_openvino``; then one fresh process times
every IR in turn on real test images at batch 1 (``benchmarks/ir_timing.py``), so a change in the
machine's load hits them alike.

In the same process it times each member's backbone alone (the resize to the model's input size and
the frozen feature extractor, exported the same way): the sum of an ensemble's backbones is the least
it can cost, whatever its banks and maps cost. ``--table`` writes the table as Markdown.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import numpy as np
import openvino as ov
import torch
from anomalib.engine import Engine
from common import data_parser, short_names, write_report
from ir_timing import interleaved_ms
from torch.nn import functional as F  # noqa: N812

from anomalib_reconpatch import ReConPatch, ReConPatchEnsemble
from anomalib_reconpatch.reconpatch.ensemble import DEFAULT_BACKBONES
from anomalib_reconpatch.tools.compare import build_datamodule, image_shape, load_datamodule_config


def main() -> None:
    """Fit, export and time the single model and each ensemble."""
    parser = data_parser(__doc__)
    parser.add_argument("--coreset-ratio", type=float, default=0.01)
    parser.add_argument("--num-steps", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument(
        "--ensembles",
        nargs="+",
        default=[",".join(DEFAULT_BACKBONES)],
        help="ensembles to time, each a comma-separated list of backbones",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs and the IRs")
    parser.add_argument("--table", type=Path, help="where to write the Markdown table too")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {"layers": args.layers, "coreset_sampling_ratio": args.coreset_ratio, "num_steps": args.num_steps}
    models = {"ReConPatch, tf_efficientnet_lite0": ReConPatch(backbone="tf_efficientnet_lite0", **settings)}
    for backbones in args.ensembles:
        names = backbones.split(",")
        models[f"ReConPatchEnsemble, {short_names(names)}"] = ReConPatchEnsemble(backbones=names, **settings)
    irs = {}
    for index, (name, model) in enumerate(models.items()):
        torch.manual_seed(0)
        datamodule = build_datamodule(load_datamodule_config(args.data), seed=0)
        model.pre_processor = model.configure_pre_processor(image_size=image_shape(args.image_size))
        Engine(default_root_dir=args.out / "runs", logger=False).fit(model=model, datamodule=datamodule)
        irs[name] = (model.to_openvino(args.out / f"model_{index}"), 1)
        print(f"{name}: exported, bank rows per member {[int(m.shape[0]) for m in banks(model)]}", flush=True)
    size = image_shape(args.image_size)
    members = {member.backbone: member for model in models.values() for member in getattr(model.model, "members", [])}
    for member in members.values():
        xml = args.out / f"backbone_{member.backbone}.xml"
        example = torch.rand(1, 3, *size)
        ov.save_model(ov.convert_model(BackbonePass(member.feature_extractor, size), example_input=example), xml)
        irs[f"backbone alone, {member.backbone}"] = (xml, 1)
    datamodule = build_datamodule(load_datamodule_config(args.data), seed=0)
    datamodule.setup()
    images = torch.cat([batch.image for batch in datamodule.test_dataloader()])[:20]
    sample = args.out / "images.npy"
    np.save(sample, images.numpy())
    times = interleaved_ms(irs, sample, args.repeats)
    single = next(iter(times.values()))
    lines = [
        f"`python {shlex.join(sys.argv)}`",
        "",
        f"{args.data.stem}, coreset ratio {args.coreset_ratio}, batch 1, images {tuple(images.shape[-2:])}",
        "",
        "| model | ms/image | vs single |",
        "|---|---|---|",
        *(f"| {name} | {ms:.1f} | {ms / single:.2f}x |" for name, ms in times.items()),
    ]
    for name, model in models.items():
        if hasattr(model.model, "members"):
            floor = sum(times[f"backbone alone, {member.backbone}"] for member in model.model.members)
            lines.append(f"| backbones of {name} alone, summed (its floor) | {floor:.1f} | {floor / single:.2f}x |")
    write_report("\n".join(lines) + "\n", args.table)


class BackbonePass(torch.nn.Module):
    """One member's feature pass alone: the bilinear resize to the model's input size, then its backbone.

    Args:
        extractor (torch.nn.Module): The member's frozen feature extractor.
        size (tuple[int, int]): The model's input size (height, width).
    """

    def __init__(self, extractor: torch.nn.Module, size: tuple[int, int]) -> None:
        super().__init__()
        self.extractor = extractor
        self.size = size

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The backbone's feature maps of ``images`` resized to the model's input size."""
        resized = F.interpolate(images, size=self.size, mode="bilinear", align_corners=False)
        return tuple(self.extractor(resized).values())


def banks(model: torch.nn.Module) -> list[torch.Tensor]:
    """The memory bank of each member (one for the single model)."""
    members = getattr(model.model, "members", [model.model])
    return [member.memory_bank for member in members]


if __name__ == "__main__":
    main()
