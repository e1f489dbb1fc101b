"""The exact antialiased resize: torchvision's pixels in PyTorch, and the same pixels from an exported graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data.transforms import ExportableCenterCrop
from anomalib.models import Patchcore
from anomalib.pre_processing.utils.transform import get_exportable_transform
from torch.nn import functional
from torchvision.transforms.v2 import CenterCrop, Compose, InterpolationMode, Normalize, Resize

from anomalib_reconpatch import ReConPatch
from anomalib_reconpatch.components.resize import (
    ExactExportPreProcessor,
    ExportableResize,
    antialiased_resize,
    exportable_transform,
    resize_weights,
)

SIZES = [(320, 320), (333, 517), (256, 640), (1000, 37), (128, 128), (256, 256)]
"""Shrunk square and odd sizes, a KolektorSDD-like aspect, a thin strip, an enlarged image and an unchanged one."""


def test_four_pixels_shrink_to_two_with_hand_checked_triangle_weights() -> None:
    # scale 2: output centres at 1 and 3, triangle half-width 2; input centres 0.5, 1.5, 2.5, 3.5
    weights = resize_weights(torch.arange(4.0), 2)
    expected = torch.tensor([[3, 3, 1, 0], [0, 1, 3, 3]]) / 7
    assert torch.allclose(weights, expected)


def test_enlarging_is_plain_bilinear_with_the_border_clamped() -> None:
    weights = resize_weights(torch.arange(2.0), 4)  # output centres 0.25, 0.75, 1.25, 1.75 in input pixels
    expected = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
    assert torch.allclose(weights, expected)


@pytest.mark.parametrize(("in_size", "out_size"), [(7, 3), (320, 256), (37, 256), (1240, 256), (256, 256)])
def test_every_output_pixel_is_a_weighted_mean_of_input_pixels(in_size: int, out_size: int) -> None:
    weights = resize_weights(torch.arange(float(in_size)), out_size)
    assert weights.shape == (out_size, in_size)
    assert (weights >= 0).all()
    assert torch.allclose(weights.sum(dim=1), torch.ones(out_size))


@pytest.mark.parametrize("size", SIZES)
def test_matches_torchvisions_antialiased_resize(size: tuple[int, int]) -> None:
    images = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0))
    expected = Resize((256, 256), antialias=True)(images)
    assert torch.allclose(antialiased_resize(images, (256, 256)), expected, atol=1e-5)
    assert torch.allclose(ExportableResize((256, 256))(images), expected, atol=1e-5)


def test_export_keeps_antialiasing_where_anomalib_drops_it() -> None:
    transform = Compose([Resize((256, 256), antialias=True), CenterCrop(224), Normalize([0.5] * 3, [0.2] * 3)])
    exported = exportable_transform(transform)
    assert isinstance(exported.transforms[0], ExportableResize)
    assert isinstance(exported.transforms[1], ExportableCenterCrop)
    assert isinstance(exported.transforms[2], Normalize)
    assert transform.transforms[0].antialias is True  # the training transform is not touched
    images = torch.rand(1, 3, 333, 517, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(exported(images), transform(images), atol=1e-5)
    assert (get_exportable_transform(transform)(images) - transform(images)).abs().max() > 0.05


def test_resizes_it_cannot_reproduce_are_exported_as_anomalib_exports_them() -> None:
    nearest = Resize((256, 256), interpolation=InterpolationMode.NEAREST)
    shorter_side = Resize(256, antialias=True)
    for resize in (nearest, shorter_side):
        exported = exportable_transform(resize)
        assert isinstance(exported, Resize)
        assert exported.antialias is False
        assert resize.antialias is not False
    assert exportable_transform(None) is None


def test_reconpatch_pre_processor_trains_as_patchcore_and_keeps_the_exact_resize_through_a_checkpoint() -> None:
    pre_processor = ReConPatch.configure_pre_processor((256, 320))
    assert isinstance(pre_processor, ExactExportPreProcessor)
    patchcore = Patchcore.configure_pre_processor((256, 320)).transform
    images = torch.rand(1, 3, 333, 517, generator=torch.Generator().manual_seed(2))
    assert torch.equal(pre_processor.transform(images), patchcore(images))  # training and test pixels unchanged
    restored = ReConPatch.configure_pre_processor()
    restored.load_checkpoint_config(pre_processor.checkpoint_config())
    assert isinstance(restored.export_transform.transforms[0], ExportableResize)
    assert restored.export_transform.transforms[0].size == (256, 320)


def test_one_exported_graph_resizes_every_input_size_as_torch_does(tmp_path: Path) -> None:
    import openvino as ov

    from anomalib_reconpatch.tools.predict import compile_options

    pre_processor = ReConPatch.configure_pre_processor().eval()
    onnx_path = tmp_path / "pre_processor.onnx"
    height, width = torch.export.Dim("height", min=16, max=4096), torch.export.Dim("width", min=16, max=4096)
    torch.onnx.export(
        pre_processor, (torch.rand(1, 3, 320, 320),), str(onnx_path), dynamo=True,
        dynamic_shapes=({2: height, 3: width},), opset_version=18,
    )  # fmt: skip
    compiled = ov.Core().compile_model(str(onnx_path), "CPU", compile_options())
    for size in SIZES:
        images = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(3))
        expected = pre_processor.transform(images).numpy()
        assert np.abs(compiled(images.numpy())[0] - expected).max() <= 1e-5 * np.ptp(expected)


def test_enlarging_matches_torch_interpolate_too() -> None:
    images = torch.rand(1, 1, 5, 9, generator=torch.Generator().manual_seed(4))
    expected = functional.interpolate(images, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    assert torch.allclose(antialiased_resize(images, (16, 16)), expected, atol=1e-6)
