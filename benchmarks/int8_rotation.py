"""INT8 accuracy of ReConPatch with and without the bank frame that ``fit`` folds into ``f`` and the bank.

    python benchmarks/int8_rotation.py --data configs/data/bottle.yaml --coreset-ratio 0.1

``fit`` ends with ``fold_bank_frame``: the bank's mean ``m`` and a random orthogonal ``R`` go into
``f`` and the bank (``W' = R W``, ``b' = R (b - m)``, ``bank' = (bank - m) R^T``). That keeps every
distance, hence every FP32 score, but gives a per-tensor INT8 scale small values spread evenly over
the dimensions (it rescued the earlier matmul INT8 export; the convolution search scales each bank
row and no longer needs it). Here one fit runs with the fold skipped, and a copy is then folded, so
the two variants share f and the bank; each is exported with INT8_PTQ through the model's own hook
and scored on the whole test set.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from unittest import mock

import torch
from anomalib.deploy import CompressionType
from anomalib.engine import Engine
from common import data_parser, evaluate, load_data, load_test_split
from export import run_ir

from anomalib_reconpatch import ReConPatchModel


def main() -> None:
    """Fit without the fold; export FP32, INT8 and folded INT8; print image/pixel AUROC and PRO of each."""
    parser = data_parser(__doc__)
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    args = parser.parse_args()
    torch.manual_seed(0)
    datamodule, model = load_data(args, coreset_sampling_ratio=args.coreset_ratio)
    with tempfile.TemporaryDirectory() as root, mock.patch.object(ReConPatchModel, "fold_bank_frame"):
        Engine(default_root_dir=root, logger=False).fit(model=model, datamodule=datamodule)
    model.eval()
    folded = copy.deepcopy(model)
    folded.model.fold_bank_frame()
    images, truth = load_test_split(datamodule, args.image_size)
    variants = {
        "FP32, as fitted without the fold": (model, None),
        "FP32, folded": (folded, None),
        "INT8, without the fold": (model, CompressionType.INT8_PTQ),
        "INT8, folded (what fit gives)": (folded, CompressionType.INT8_PTQ),
    }
    print("| variant | bank max abs | image AUROC | pixel AUROC | PRO |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as root:
        for i, (name, (variant, compression)) in enumerate(variants.items()):
            xml = variant.to_openvino(Path(root) / str(i), compression_type=compression, datamodule=datamodule)
            out = run_ir(xml, images.numpy())
            metrics = evaluate(torch.from_numpy(out["pred_score"]), torch.from_numpy(out["anomaly_map"]), truth)
            bank_max = float(variant.model.memory_bank.abs().max())
            print(f"| {name} | {bank_max:.1f} | " + " | ".join(f"{v:.3f}" for v in metrics.values()) + " |", flush=True)


if __name__ == "__main__":
    main()
