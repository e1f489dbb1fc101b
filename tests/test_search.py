"""Memory-bank search: exact torch and faiss against brute force, approximate recall, export stays exact."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from anomalib_reconpatch import ReConPatch, ReConPatchModel
from anomalib_reconpatch.reconpatch import search
from anomalib_reconpatch.reconpatch.search import nearest_bank_distances, nearest_bank_rows, refine_top_patches
from anomalib_reconpatch.tools.predict import load_compiled_model

from .conftest import BACKBONE, LAYERS
from .test_model import demo_images


@pytest.fixture(scope="module")
def real_rows(lite_weights: None, demo_root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(bank, queries): patch features of real demo images, the bank from training images, queries from test."""
    model = ReConPatchModel(BACKBONE, LAYERS).eval()
    bank = model.patch_features(demo_images(demo_root, "train/good", 4)).permute(0, 2, 3, 1).reshape(-1, 152)
    queries = model.patch_features(demo_images(demo_root, "test/scratch", 2)).permute(0, 2, 3, 1).reshape(-1, 152)
    return bank[::2].contiguous(), queries


def brute_force(queries: torch.Tensor, bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cdist(queries.double(), bank.double()).min(dim=1)


def test_exact_search_matches_brute_force_across_chunks(real_rows: tuple) -> None:
    bank, queries = real_rows
    distances, nearest = nearest_bank_rows(queries, bank, chunk=300)
    reference, reference_idx = brute_force(queries, bank)
    assert torch.equal(nearest, reference_idx)
    assert torch.allclose(distances.double(), reference, rtol=1e-4, atol=1e-3)
    assert torch.allclose(nearest_bank_distances(queries, bank, chunk=300), distances, rtol=0, atol=1e-6)


def test_convolution_form_matches_the_matmul_form(real_rows: tuple) -> None:
    """INT8 exports scan the bank as 1x1 convolutions (OpenVINO's fast INT8 op here): the same distances."""
    bank, queries = real_rows
    matmul = nearest_bank_distances(queries, bank, chunk=300)
    convolution = nearest_bank_distances(queries, bank, chunk=300, convolution=True)
    assert torch.allclose(convolution, matmul, rtol=1e-5, atol=1e-3)
    assert torch.allclose(convolution.double(), brute_force(queries, bank)[0], rtol=1e-4, atol=1e-3)


def test_faiss_exact_matches_brute_force(real_rows: tuple) -> None:
    bank, queries = real_rows
    distances, nearest = search.search_index(search.build_index(bank, "flat"), queries)
    reference, reference_idx = brute_force(queries, bank)
    assert nearest.dtype == torch.int64
    assert torch.equal(nearest, reference_idx)
    assert torch.allclose(distances.double(), reference, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_index_recall_is_high_on_real_features(real_rows: tuple, kind: str) -> None:
    bank, queries = real_rows
    distances, nearest = search.search_index(search.build_index(bank, kind), queries)
    reference, reference_idx = brute_force(queries, bank)
    assert (nearest == reference_idx).float().mean() >= 0.95
    assert (distances.double() >= reference - 1e-3).all()  # an approximate neighbour is never closer
    assert (distances.double() / reference.clamp_min(1e-6)).mean() <= 1.01


class LargestOutput(TorchDispatchMode):
    """Records the element count of the largest tensor any torch op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func: object, types: object, args: tuple = (), kwargs: dict | None = None) -> object:
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, tuple) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def test_exact_search_never_materialises_the_query_by_bank_matrix() -> None:
    queries, bank, chunk = torch.randn(64, 16), torch.randn(1000, 16), 128
    with LargestOutput() as recorder:
        nearest_bank_rows(queries, bank, chunk=chunk)
    assert recorder.largest == len(queries) * chunk  # one chunk of distances at a time
    assert recorder.largest * math.ceil(len(bank) / chunk) >= len(queries) * len(bank)


def test_unknown_search_is_rejected_naming_the_option() -> None:
    with pytest.raises(ValueError, match=r"search='annoy'.*one of exact, hnsw, ivf.*--model.search"):
        ReConPatch(backbone="not_built", search="annoy")


def banked_model(bank: torch.Tensor, kind: str) -> ReConPatch:
    # PatchCore's image score: the one that the refinement of each image's top patches keeps exact
    model = ReConPatch(backbone=BACKBONE, layers=LAYERS, search=kind, visualizer=False, image_score="patches")
    model.model.memory_bank = bank.clone()
    return model.eval()


def test_index_is_lazy_unsaved_and_follows_the_bank(real_rows: tuple, demo_root: Path) -> None:
    bank, _ = real_rows
    model = banked_model(bank, "hnsw")
    images = demo_images(demo_root, "test/scratch", 2)
    assert model.model._indexes == {}
    with torch.no_grad():
        approximate = model.model(images).pred_score
        index = model.model.bank_index()
        assert model.model.bank_index() is index  # built once
        assert not any("index" in key for key in model.state_dict())
        model.model.search = "exact"
        exact = model.model(images).pred_score
        assert torch.allclose(approximate, exact, rtol=1e-5)
        model.model.search = "hnsw"
        model.model.load_state_dict({**model.model.state_dict(), "memory_bank": bank[: len(bank) // 2].clone()})
        assert model.model.bank_index() is not index
        assert model.model.bank_index().ntotal == len(bank) // 2
        index = model.model.bank_index()
        model.model.cpu()  # what Lightning's teardown calls: on a CPU model the bank stays, and so does its index
        assert model.model.bank_index() is index
        model.model.double()  # a cast replaces the bank: the index of the old one goes with it
        assert model.model._indexes == {}


@pytest.fixture
def poor_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """A deliberately poor HNSW graph: many patches get a wrong, farther neighbour."""
    monkeypatch.setattr(search, "HNSW_NEIGHBORS", 2)
    monkeypatch.setattr(search, "HNSW_EF_SEARCH", 1)


def test_refinement_certifies_each_images_largest_distance(real_rows: tuple, poor_index: None) -> None:
    bank, queries = real_rows
    distances, _ = search.search_index(search.build_index(bank, "hnsw"), queries)
    exact, _ = brute_force(queries, bank)
    assert (distances.double() > exact + 1e-3).float().mean() > 0.05  # the index alone is often wrong
    refined = refine_top_patches(queries, bank, distances, batch=2)
    per_image = exact.reshape(2, -1).max(dim=1).values
    assert torch.allclose(refined.reshape(2, -1).max(dim=1).values.double(), per_image, rtol=1e-5)
    assert torch.equal(refined.reshape(2, -1).argmax(dim=1), exact.reshape(2, -1).argmax(dim=1))


def test_export_traces_exact_search_whatever_the_setting(
    real_rows: tuple, demo_root: Path, tmp_path: Path, poor_index: None
) -> None:
    bank, _ = real_rows
    model = banked_model(bank, "hnsw")
    raw = demo_images(demo_root, "test/scratch", 2)  # torch and the exported graph get the same input
    with torch.no_grad():
        approximate = model(raw).anomaly_map  # the map keeps approximate distances outside the top patches
        model.model.search = "exact"
        exact = model(raw)
        model.model.search = "hnsw"
    tolerance = 1e-3 * float(exact.anomaly_map.max() - exact.anomaly_map.min())
    assert (approximate - exact.anomaly_map).abs().max() > 100 * tolerance
    onnx_path = model.to_onnx(tmp_path)
    assert model.model.search == "hnsw"
    compiled = load_compiled_model(onnx_path)
    result = compiled(raw.numpy())
    assert np.allclose(result[compiled.output("pred_score")], exact.pred_score.numpy(), rtol=1e-3)
    assert np.abs(result[compiled.output("anomaly_map")] - exact.anomaly_map.numpy()).max() <= tolerance
