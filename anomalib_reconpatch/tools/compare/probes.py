"""What a compare run measures besides the metrics: the latency images and the per-image latency."""

from __future__ import annotations

import gc
from typing import Any

import torch

from ..latency import split_latency_ms


def latency_images(datamodule: Any, count: int) -> list[torch.Tensor]:
    """Pick ``count`` test images spread evenly over the test set, read from the dataset itself.

    No dataloader, so no worker processes exist while a model is timed (a live test iterator and its
    workers would slow down whichever model is timed first).

    Args:
        datamodule (Any): The set-up anomalib datamodule.
        count (int): Number of images; fewer for a smaller test set.

    Returns:
        list[torch.Tensor]: The ``C x H x W`` image tensors, as the dataset returns them.
    """
    dataset = datamodule.test_data
    indices = sorted({round(i * (len(dataset) - 1) / max(count - 1, 1)) for i in range(count)})
    return [dataset[i].image for i in indices]


def image_latency_ms(model: Any, images: list[torch.Tensor]) -> dict[str, float]:
    """Measure the median per-image time of the full forward (pre-processing, model, post-processing) at batch 1.

    Also split into ``backbone_ms``, ``search_ms`` and ``rest_ms`` (see ``tools/latency.py``), after a warm-up.

    Args:
        model (Any): The fitted Lightning model, put in eval mode.
        images (list[torch.Tensor]): ``C x H x W`` images, from :func:`latency_images`.

    Returns:
        dict[str, float]: ``latency_ms``, ``backbone_ms``, ``search_ms`` and ``rest_ms``.
    """
    model.eval()
    gc.collect()
    return split_latency_ms(model, model.model, images)
