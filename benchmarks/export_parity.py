"""The exported model against PyTorch on real-size image files, as a user runs both.

    python benchmarks/export_parity.py --data configs/data/bottle.yaml --coreset-ratio 0.1 \
        --out docs/results/export_parity/bottle.md

ReConPatch is trained with anomalib's Engine and exported with ``Engine.export`` to OpenVINO. Every
test image is then scored from its file four ways: ``Engine.predict`` (the reference),
anomalib's ``OpenVINOInferencer`` with the float32 hint, the same inferencer with OpenVINO's default
precision, and ``reconpatch predict`` (its CSV for the scores; its reader and compiled model for the maps).
The table gives each path's largest difference from the reference, as a fraction of the reference's
score and map ranges, and the image AUROC, pixel AUROC and PRO that each path's outputs give.
A second export with anomalib's own exportable transform (antialiasing dropped) shows what the
exact resize changes.
"""

from __future__ import annotations

import csv
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from anomalib.deploy import ExportType, OpenVINOInferencer
from anomalib.engine import Engine
from anomalib.pre_processing.utils.transform import get_exportable_transform
from common import data_parser, evaluate, load_data, write_report

from anomalib_reconpatch.tools.predict import compile_options, load_compiled_model, predict, read_rgb


def reference_outputs(engine: Engine, model: torch.nn.Module, datamodule: object) -> dict:
    """``Engine.predict`` over the test split: per file its score and map, with the labels and masks."""
    batches = engine.predict(model=model, dataloaders=datamodule.test_dataloader())
    paths = [str(path) for batch in batches for path in batch.image_path]
    maps = torch.cat(
        [batch.anomaly_map.reshape(len(batch.image_path), *batch.anomaly_map.shape[-2:]) for batch in batches]
    )
    masks = [batch.gt_mask.reshape(len(batch.image_path), *batch.gt_mask.shape[-2:]) for batch in batches]
    return {
        "paths": paths,
        "scores": torch.cat([batch.pred_score.reshape(-1) for batch in batches]).numpy(),
        "maps": maps.numpy(),
        "truth": {"labels": torch.cat([batch.gt_label for batch in batches]), "masks": torch.cat(masks).float()},
    }


def inferencer_outputs(xml: Path, paths: list[str], config: dict) -> tuple[np.ndarray, np.ndarray, str]:
    """Scores and maps of anomalib's ``OpenVINOInferencer`` on each file, and the precision it compiled in."""
    inferencer = OpenVINOInferencer(path=xml, device="CPU", config=config)
    results = [inferencer.predict(path) for path in paths]
    precision = inferencer.model.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    scores = np.array([float(np.asarray(result.pred_score).reshape(-1)[0]) for result in results])
    maps = np.stack(
        [np.asarray(result.anomaly_map).reshape(np.asarray(result.anomaly_map).shape[-2:]) for result in results]
    )
    return scores, maps, precision


def predict_tool_outputs(xml: Path, paths: list[str], out: Path) -> tuple[np.ndarray, np.ndarray]:
    """``reconpatch predict``'s scores (from its CSV) and maps (its reader and compiled model) for each file."""
    folder = out / "input"
    folder.mkdir()
    for index, path in enumerate(paths):  # links, so that equal names in different folders stay apart
        (folder / f"{index:04d}{Path(path).suffix}").symlink_to(Path(path).resolve())
    predict(xml, folder, out / "predictions", log=lambda _: None)
    with (out / "predictions" / "scores.csv").open() as handle:
        scores = {Path(row["image"]).name: float(row["score"]) for row in csv.DictReader(handle)}
    compiled = load_compiled_model(xml)
    maps = [compiled(read_rgb(folder / name))[compiled.output("anomaly_map")][0] for name in sorted(scores)]
    ordered = np.array([scores[f"{index:04d}{Path(path).suffix}"] for index, path in enumerate(paths)])
    return ordered, np.stack([m.reshape(m.shape[-2:]) for m in maps])


def main() -> None:
    """Train, export, score every test file four ways and write the table."""
    parser = data_parser(__doc__)
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--out", type=Path, required=True, help="the Markdown report to write")
    args = parser.parse_args()
    torch.manual_seed(0)
    datamodule, model = load_data(args, coreset_sampling_ratio=args.coreset_ratio)
    work = Path(tempfile.mkdtemp(prefix="export-parity-"))
    engine = Engine(default_root_dir=work / "train", logger=False)
    engine.fit(model=model, datamodule=datamodule)
    xml = engine.export(model=model, export_type=ExportType.OPENVINO, export_root=work / "export")
    exact_transform = model.pre_processor.export_transform
    model.pre_processor.export_transform = get_exportable_transform(model.pre_processor.transform)
    stock_xml = engine.export(model=model, export_type=ExportType.OPENVINO, export_root=work / "export_stock")
    model.pre_processor.export_transform = exact_transform
    reference = reference_outputs(engine, model, datamodule)
    paths = reference["paths"]
    f32_scores, f32_maps, _ = inferencer_outputs(xml, paths, compile_options())
    auto_scores, auto_maps, auto_precision = inferencer_outputs(xml, paths, {})
    tool_scores, tool_maps = predict_tool_outputs(xml, paths, work)
    stock_scores, stock_maps, _ = inferencer_outputs(stock_xml, paths, compile_options())

    score_range = float(reference["scores"].max() - reference["scores"].min())
    map_range = float(reference["maps"].max() - reference["maps"].min())
    rows = [
        ("Engine.predict (reference)", reference["scores"], reference["maps"]),
        ("OpenVINOInferencer, f32 hint", f32_scores, f32_maps),
        (f"OpenVINOInferencer, default precision ({auto_precision} here)", auto_scores, auto_maps),
        ("reconpatch predict", tool_scores, tool_maps),
        ("OpenVINOInferencer, f32 hint, anomalib's export resize (no antialiasing)", stock_scores, stock_maps),
    ]
    sizes = sorted({tuple(read_rgb(Path(path)).shape[-2:]) for path in paths})
    lines = [
        f"# Exported model against PyTorch, from the image files: {args.data.stem}",
        "",
        f"`{shlex.join(['python', *sys.argv])}`",
        "",
        f"{len(paths)} test images, sizes (h, w) {', '.join(f'{h}x{w}' for h, w in sizes)}; model input "
        f"{model.pre_processor.transform.transforms[0].size}; the exported model resizes exactly as training "
        f"(antialiased) unless the row says otherwise; coreset {args.coreset_ratio}, "
        f"bank {tuple(model.model.memory_bank.shape)}.",
        f"Score range {score_range:.4f}, map range {map_range:.4f}.",
        "",
        "| path | max score diff / range | max map diff / range | image AUROC | pixel AUROC | PRO |",
        "|---|---|---|---|---|---|",
    ]
    for name, scores, maps in rows:
        metrics = evaluate(torch.from_numpy(scores), torch.from_numpy(maps), reference["truth"])
        score_diff = np.abs(scores - reference["scores"]).max() / score_range
        map_diff = np.abs(maps - reference["maps"]).max() / map_range
        lines.append(
            f"| {name} | {score_diff:.1e} | {map_diff:.1e} | {metrics['image_AUROC']:.4f} | "
            f"{metrics['pixel_AUROC']:.4f} | {metrics['PRO']:.4f} |"
        )
    write_report("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
