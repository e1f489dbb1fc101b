"""INT8 post-training quantization of the exported OpenVINO model: the memory-bank search only.

The bank holds FP32 features, so quantizing the backbone moves every test feature off the bank:
measured on the demo data, all image scores then saturate to one value (AUROC 0.5). The search
matmuls against the bank are over 90% of the time at coreset ratio 0.1, and quantizing only them
keeps the backbone's features exact and the distances' ranking.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def search_only_scope(model: Any) -> Any:
    """An NNCF ignored scope holding every op except the matmuls after the representation ``f``.

    The backbone and pre-processing are convolutions; the first MatMul of the graph is ``f``; every
    later MatMul multiplies by memory-bank rows (the chunked search and the score re-weighting).
    """
    import nncf

    ops = model.get_ordered_ops()
    matmuls = [op.get_friendly_name() for op in ops if op.get_type_name() == "MatMul"]
    if len(matmuls) < 2:
        msg = "INT8_PTQ found no memory-bank search in the exported graph: export a fitted ReConPatch model."
        raise ValueError(msg)
    quantized = set(matmuls[1:])
    skipped = {"Parameter", "Constant", "Result"}
    names = [op.get_friendly_name() for op in ops if op.get_type_name() not in skipped]
    return nncf.IgnoredScope(names=[name for name in names if name not in quantized], validate=False)


def quantize_on_training_images(model: Any, datamodule: Any, subset_size: int = 300) -> Any:
    """NNCF INT8 quantization of the bank search, with the datamodule's training images as calibration data.

    Anomalib's default calibrates on the validation split, which holds anomalous images; the
    training images are the distribution the model must represent, and every data set has them.
    """
    if datamodule is None:
        msg = (
            "INT8_PTQ calibrates on the training images: pass the data set "
            "(anomalib export ... --data <datamodule.yaml>, or datamodule= in to_openvino)."
        )
        raise ValueError(msg)
    import nncf

    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    images = len(loader.dataset)
    if images == 0:
        msg = "INT8_PTQ found no training images in the datamodule: check its root and normal_dir."
        raise ValueError(msg)
    logger.info("INT8_PTQ calibration on %d training images", min(images, subset_size))
    dataset = nncf.Dataset(loader, lambda batch: batch.image.numpy())
    return nncf.quantize(model, dataset, subset_size=min(images, subset_size), ignored_scope=search_only_scope(model))
