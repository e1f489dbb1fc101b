"""INT8 post-training quantization of the exported OpenVINO model: the memory-bank search only.

The bank holds FP32 features, so quantizing the backbone moves every test feature off the bank and
all image scores collapse to one value. The search convolutions against the bank are most of the
inference time at coreset ratio 0.1, and quantizing only them keeps the backbone's features exact and
the distances' ranking (see ``docs/design/int8-convolution-search.md``).
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def _consumers(op: Any) -> list[Any]:
    """List the nodes that read any output of the OpenVINO node ``op``."""
    return [target.get_node() for output in op.outputs() for target in output.get_target_inputs()]


def _searches_bank(op: Any) -> bool:
    """Tell whether ``op`` is a bank-search convolution: its output (or its bias ``Add``) goes into a minimum.

    That is ``ReduceMin`` for the patch search and ``TopK`` (argmin) for the top patch's neighbour.
    """
    after = _consumers(op)
    bias_adds = [node for node in after if node.get_type_name() == "Add"]
    after += [node for add in bias_adds for node in _consumers(add)]
    return any(node.get_type_name() in {"ReduceMin", "TopK"} for node in after)


def search_only_scope(model: Any) -> Any:
    """Build an NNCF ignored scope holding every op except the bank-search convolutions.

    The exported search is one 1x1 convolution per bank chunk followed by a minimum over the bank
    rows (``search.conv_chunk_distances``), and one over the whole bank for the top patch's
    neighbour; the backbone's convolutions and the anomaly map's blur feed no minimum, and stay FP32.

    Args:
        model (openvino.Model): The exported model, traced with the convolution search
            (``ReConPatchModel.export_form(convolution=True)``).

    Returns:
        nncf.IgnoredScope: Every op by name except the ``Convolution`` ops that feed a minimum
        (``Parameter``, ``Constant`` and ``Result`` are not listed), with validation off.

    Raises:
        ValueError: If the graph holds no bank-search convolution, as for a model exported before
            fitting or in the matmul form.
    """
    import nncf

    ops = model.get_ordered_ops()
    quantized = {op.get_friendly_name() for op in ops if op.get_type_name() == "Convolution" and _searches_bank(op)}
    if not quantized:
        msg = "INT8_PTQ found no memory-bank search in the exported graph: export a fitted ReConPatch model."
        raise ValueError(msg)
    skipped = {"Parameter", "Constant", "Result"}
    names = [op.get_friendly_name() for op in ops if op.get_type_name() not in skipped]
    return nncf.IgnoredScope(names=[name for name in names if name not in quantized], validate=False)


def quantize_on_training_images(model: Any, datamodule: Any, subset_size: int = 300) -> Any:
    """Quantize the bank search to INT8 with NNCF, calibrated on the datamodule's training images.

    Anomalib's default calibrates on the validation split, which holds anomalous images; the
    training images are the distribution the model must represent, and every data set has them.

    Args:
        model (openvino.Model): The exported model with the convolution search.
        datamodule (AnomalibDataModule | None): Source of the training images; ``setup("fit")`` is
            called on it.
        subset_size (int): Most calibration images. Defaults to ``300``.

    Returns:
        openvino.Model: The model with its bank-search convolutions in INT8 and all else in FP32.

    Raises:
        ValueError: If ``datamodule`` is None, its training split is empty, or the graph holds no
            bank-search convolution.
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
