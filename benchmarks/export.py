"""OpenVINO deployment benchmark: parity with torch, INT8 accuracy, batch-1 latency split, memory, IR size.

    python benchmarks/export.py --data configs/data/bottle.yaml --coreset-ratio 0.1 --out results/bench/export

ReConPatch is trained with anomalib's Engine and exported with ``model.to_openvino`` in FP32 and in
INT8_PTQ (NNCF, calibrated on the training images). Stock Patchcore is exported FP32 with a bank of
the same ratio from ``common.patchcore_bank`` (the latency depends only on the bank size).
All IRs are timed in one fresh process, one inference of each in turn (batch 1, real test images,
median of ``--repeats``; ``benchmarks/ir_timing.py``), so a change in the machine's load hits them
alike; each IR's peak resident memory (VmHWM, which unlike ru_maxrss is not inherited from the
parent) comes from a fresh process of its own. Split per image: ``backbone`` is an IR of the
pre-processing, backbone and patch features alone; ``search`` is the full model minus the same
model with a one-row bank; ``rest`` (anomaly map, score re-weighting, post-processing) is the remainder.
OpenVINO's per-op profile of the ReConPatch IRs (op types, their time and kernels) closes the report.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from anomalib.deploy import CompressionType
from anomalib.engine import Engine
from common import cache, data_parser, evaluate, flat_patches, load_data, load_test_split, patchcore_bank
from ir_timing import interleaved_ms, peak_rss_mb
from torch import nn

from anomalib_reconpatch.tools.predict import compile_options


class PatchFeaturesOnly(nn.Module):
    """Pre-processing, frozen backbone and patch features: the part both models share."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.pre_processor = model.pre_processor
        self.model = model.model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Patch features of raw ``[0, 1]`` images."""
        return self.model.patch_features(self.pre_processor(images))


def stock_patchcore(args: object, datamodule: object, reconpatch: nn.Module, ratio: float) -> nn.Module:
    """Stock anomalib Patchcore with ``common.patchcore_bank``'s bank (the training features are extracted again)."""
    from anomalib.models import Patchcore

    model = Patchcore(backbone=args.backbone, layers=args.layers, coreset_sampling_ratio=ratio)
    train = flat_patches(cache(reconpatch, datamodule.train_dataloader(), test=False)["features"])
    model.model.memory_bank = patchcore_bank(train, ratio)
    return model.eval()


def one_row_bank(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose memory bank is its first row: the same graph without the search's cost."""
    tiny = copy.deepcopy(model)
    tiny.model.memory_bank = model.model.memory_bank[:1].clone()
    return tiny


def ir_size_mb(xml: Path) -> float:
    """Size of the ``.xml`` and its ``.bin`` on disk."""
    return (xml.stat().st_size + xml.with_suffix(".bin").stat().st_size) / 2**20


def accepts_batch_one(xml: Path) -> bool:
    """Whether the IR's batch dimension is dynamic or 1 (stock Patchcore's can be frozen at 2)."""
    import openvino as ov

    shape = ov.Core().read_model(str(xml)).input(0).get_partial_shape()
    return shape[0].is_dynamic or shape[0].get_length() == 1


def op_profile(xml: Path, images: np.ndarray, repeats: int = 10) -> dict[str, dict]:
    """OpenVINO's own per-op timing (``PERF_COUNT``) at batch 1, summed by op type: ms per image and kernels.

    This is what showed the exported search's costs: TopK as slow as the chunk matmuls, and the INT8
    matmul kernel no faster than the FP32 one on a CPU without VNNI.
    """
    import openvino as ov

    options = {"PERF_COUNT": "YES", **compile_options()}
    request = ov.Core().compile_model(str(xml), "CPU", options).create_infer_request()
    request.infer({0: images[:1]})
    totals: dict[str, dict] = {}
    for i in range(repeats):
        request.infer({0: images[i % len(images)][None]})
        for op in request.profiling_info:
            entry = totals.setdefault(op.node_type, {"ms": 0.0, "kernels": set()})
            entry["ms"] += op.real_time.total_seconds() * 1000 / repeats
            entry["kernels"].add(op.exec_type)
    top = sorted(totals.items(), key=lambda item: -item[1]["ms"])[:6]
    return {name: {"ms": entry["ms"], "kernels": sorted(entry["kernels"])} for name, entry in top}


def run_ir(xml: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    """Scores and maps of an IR over all ``images`` at batch 1."""
    import openvino as ov

    compiled = ov.Core().compile_model(str(xml), "CPU", compile_options())
    outputs = [compiled(image[None]) for image in images]
    return {name: np.concatenate([o[compiled.output(name)] for o in outputs]) for name in ("pred_score", "anomaly_map")}


def main() -> None:
    """Train, export, check parity and accuracy, time every IR and print the table."""
    parser = data_parser(__doc__)
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("results/bench/export"))
    args = parser.parse_args()
    torch.manual_seed(0)
    datamodule, model = load_data(args, coreset_sampling_ratio=args.coreset_ratio)
    start = time.perf_counter()
    Engine(default_root_dir=args.out / "train", logger=False).fit(model=model, datamodule=datamodule)
    print(f"ReConPatch fit {time.perf_counter() - start:.0f}s, bank {tuple(model.model.memory_bank.shape)}")
    model.eval()

    images, truth = load_test_split(datamodule, args.image_size)
    np.save(args.out / "images.npy", images[:20].numpy())

    xmls: dict[str, Path] = {}
    start = time.perf_counter()
    xmls["ReConPatch FP32"] = model.to_openvino(args.out / "reconpatch_fp32")
    print(f"export FP32 {time.perf_counter() - start:.0f}s")
    start = time.perf_counter()
    xmls["ReConPatch INT8"] = model.to_openvino(
        args.out / "reconpatch_int8", compression_type=CompressionType.INT8_PTQ, datamodule=datamodule
    )
    print(f"export INT8_PTQ {time.perf_counter() - start:.0f}s")
    with model.model.export_form(convolution=True):  # FP32 in the INT8 export's form: why FP32 keeps the matmul
        xmls["ReConPatch FP32 conv"] = super(type(model), model).to_openvino(args.out / "reconpatch_fp32_conv")
    xmls["ReConPatch 1-row"] = one_row_bank(model).to_openvino(args.out / "reconpatch_tiny")
    patchcore = stock_patchcore(args, datamodule, model, args.coreset_ratio)
    patchcore.post_processor = model.post_processor
    xmls["Patchcore FP32"] = patchcore.to_openvino(args.out / "patchcore_fp32")
    xmls["Patchcore 1-row"] = one_row_bank(patchcore).to_openvino(args.out / "patchcore_tiny")

    import openvino as ov

    backbone_xml = args.out / "backbone" / "model.xml"
    ov.save_model(ov.convert_model(PatchFeaturesOnly(model).eval(), example_input=images[:1]), backbone_xml)

    with torch.no_grad():
        reference = [model(image[None]) for image in images]
    ref_score = torch.cat([r.pred_score for r in reference]).numpy()
    ref_map = torch.cat([r.anomaly_map for r in reference]).numpy()
    fp32 = run_ir(xmls["ReConPatch FP32"], images.numpy())
    int8 = run_ir(xmls["ReConPatch INT8"], images.numpy())
    score_range = float(ref_score.max() - ref_score.min())
    map_range = float(ref_map.max() - ref_map.min())
    parity = {
        "score_max_abs_diff_over_range": float(np.abs(fp32["pred_score"] - ref_score).max() / score_range),
        "map_max_abs_diff_over_range": float(np.abs(fp32["anomaly_map"] - ref_map).max() / map_range),
        **{
            name: evaluate(torch.from_numpy(out["pred_score"]), torch.from_numpy(out["anomaly_map"]), truth)
            for name, out in (
                ("torch", {"pred_score": ref_score, "anomaly_map": ref_map}),
                ("openvino_fp32", fp32),
                ("openvino_int8", int8),
            )
        },
    }

    sample = args.out / "images.npy"
    irs = {"backbone": (backbone_xml, 1)} | {
        name: (xml, 1 if accepts_batch_one(xml) else 2) for name, xml in xmls.items()
    }
    latency = interleaved_ms(irs, sample, args.repeats)
    timings = {
        name: {
            "ms": latency[name],
            "peak_rss_mb": peak_rss_mb(xml, sample, batch),
            "batch": batch,
            "ir_mb": ir_size_mb(xml),
        }
        for name, (xml, batch) in irs.items()
    }

    profiles = {name: op_profile(xmls[name], np.load(sample)) for name in ("ReConPatch FP32", "ReConPatch INT8")}
    backbone = timings["backbone"]["ms"]
    rows = []
    for name in ("ReConPatch FP32", "ReConPatch FP32 conv", "ReConPatch INT8", "Patchcore FP32"):
        t = timings[name]
        tiny = timings.get(name.replace("FP32", "1-row")) if name.endswith("FP32") else None
        split = f"{backbone:.1f} / {t['ms'] - tiny['ms']:.1f} / {tiny['ms'] - backbone:.1f}" if tiny else "-"
        rows.append(f"| {name} | {t['batch']} | {t['ms']:.1f} | {split} | {t['peak_rss_mb']:.0f} | {t['ir_mb']:.1f} |")
    rp, int8_t, pc = (timings[n]["ms"] for n in ("ReConPatch FP32", "ReConPatch INT8", "Patchcore FP32"))
    report = {
        "settings": {**vars(args), "data": str(args.data), "out": str(args.out)},
        "bank_rows": int(model.model.memory_bank.shape[0]),
        "parity": parity,
        "timings": timings,
        "ratios": {
            "patchcore_over_reconpatch_fp32": pc / rp,
            "fp32_over_int8": rp / int8_t,
            "fp32_conv_over_fp32": timings["ReConPatch FP32 conv"]["ms"] / rp,
        },
        "op_profiles": profiles,
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print("| model | batch | ms/image | backbone / search / rest ms | peak RSS MB | IR MB |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(json.dumps({"parity": parity, "ratios": report["ratios"], "op_profiles": profiles}, indent=2))


if __name__ == "__main__":
    main()
