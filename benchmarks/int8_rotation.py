"""INT8 accuracy of a fitted ReConPatch with and without the bank centred and randomly rotated (issue 6 candidate).

    python benchmarks/int8_rotation.py --data configs/data/bottle.yaml --ckpt <fitted ReConPatch model.ckpt>

Folding the bank's mean ``m`` and an orthogonal ``R`` into ``f`` and the bank (``W' = R W``,
``b' = R (b - m)``, ``bank' = (bank - m) R^T``) keeps every distance, hence every FP32 score, but
gives INT8's per-tensor activation scale small values spread evenly over the dimensions. Each
variant is exported with INT8_PTQ through the model's own hook and scored on the whole test set.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from anomalib.deploy import CompressionType
from common import data_parser, evaluate, load_data
from export import run_ir

from anomalib_reconpatch import ReConPatch
from anomalib_reconpatch.compare import image_shape


@torch.no_grad()
def centred_and_rotated(model: ReConPatch, seed: int = 0) -> ReConPatch:
    """A copy whose ``f`` and bank live in coordinates centred on the bank and rotated by a random ``R``."""
    model = copy.deepcopy(model)
    f, bank = model.model.representation, model.model.memory_bank.double()
    gaussian = torch.randn(bank.shape[1], bank.shape[1], generator=torch.Generator().manual_seed(seed))
    q, r = torch.linalg.qr(gaussian.double())
    rotation = q * r.diagonal().sign()
    mean = bank.mean(0)
    f.weight.copy_(rotation @ f.weight.double())
    f.bias.copy_(rotation @ (f.bias.double() - mean))
    model.model.memory_bank = ((bank - mean) @ rotation.T).float()
    return model


def main() -> None:
    """Export FP32, INT8 and centred-and-rotated INT8; print image/pixel AUROC and PRO of each."""
    parser = data_parser(__doc__)
    parser.add_argument("--ckpt", type=Path, required=True, help="a fitted ReConPatch checkpoint")
    args = parser.parse_args()
    datamodule, _ = load_data(args)
    # strict=False: checkpoints written by `reconpatch compare` also hold its evaluator's metric state.
    model = ReConPatch.load_from_checkpoint(args.ckpt, map_location="cpu", strict=False).eval()
    test = list(datamodule.test_dataloader())
    images = torch.cat([b.image for b in test])
    masks = torch.cat([b.gt_mask.float().reshape(len(b.image), 1, *b.gt_mask.shape[-2:]) for b in test])
    truth = {
        "labels": torch.cat([b.gt_label for b in test]),
        "masks": torch.nn.functional.interpolate(masks, size=image_shape(args.image_size), mode="nearest")[:, 0],
    }
    variants = {
        "FP32": (model, None),
        "INT8": (model, CompressionType.INT8_PTQ),
        "INT8, centred and rotated": (centred_and_rotated(model), CompressionType.INT8_PTQ),
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
