"""What a compare run measures besides the metrics: the latency images and the per-image latency."""

from __future__ import annotations

import gc
from typing import Any

import torch

from ..latency import split_latency_ms


def latency_images(datamodule: Any, count: int) -> list[torch.Tensor]:
    """``count`` test images spread evenly over the test set, read from the dataset itself.

    No dataloader, so no worker processes exist while a model is timed (a live test iterator and its
    workers used to slow down whichever model was timed first).
    """
    dataset = datamodule.test_data
    indices = sorted({round(i * (len(dataset) - 1) / max(count - 1, 1)) for i in range(count)})
    return [dataset[i].image for i in indices]


def image_latency_ms(model: Any, images: list[torch.Tensor]) -> dict[str, float]:
    """Median per-image time of the full forward (pre-processing, model, post-processing) at batch size 1.

    Also split into ``backbone_ms``, ``search_ms`` and ``rest_ms`` (see ``tools/latency.py``), after a warm-up.
    """
    model.eval()
    gc.collect()
    return split_latency_ms(model, model.model, images)
