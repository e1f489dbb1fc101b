"""Nearest memory-bank row search for the Python (torch) inference path: exact, or a faiss index.

Exact search stays in torch (``torch_model.nearest_bank_rows``): at batch 1 on a 21,400-row bank it
measured faster than faiss ``IndexFlatL2`` here (``benchmarks/inference.py``), and it is what the
ONNX/OpenVINO export traces. faiss serves the approximate options, which only the Python path uses.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812

SEARCH_OPTIONS = ("exact", "hnsw", "ivf")
HNSW_NEIGHBORS = 32  # graph degree M: the usual accuracy/size trade-off for ~100-dim features
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 64
IVF_LISTS_PER_SQRT_N = 4  # nlist = 4 sqrt(N): about 37 rows a list for a 21,400-row bank
IVF_NPROBE = 8  # lists scanned per query: 4.0x faster than exact on bottle at recall@1 0.983 (16: 3.0x, 0.995)


def exporting() -> bool:
    """True while torch traces or exports the model: then only the pure-torch search may run."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting() or torch.compiler.is_compiling()


def build_index(bank: torch.Tensor, kind: str) -> Any:
    """A faiss index over the ``M x D`` bank: ``flat`` (exact), ``hnsw`` or ``ivf`` (approximate)."""
    import faiss

    rows = np.ascontiguousarray(bank.detach().cpu().numpy(), dtype=np.float32)
    dim = rows.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatL2(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_NEIGHBORS)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = HNSW_EF_SEARCH
    elif kind == "ivf":
        nlist = max(1, min(len(rows) // 8, round(IVF_LISTS_PER_SQRT_N * math.sqrt(len(rows)))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, nlist)
        index.train(rows)
        index.nprobe = min(IVF_NPROBE, nlist)
    else:
        msg = f"Unknown faiss index kind '{kind}': use flat, hnsw or ivf."
        raise ValueError(msg)
    index.add(rows)
    return index


def search_index(index: Any, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest indexed row per query as ``(distance, index)``, the same contract as ``nearest_bank_rows``."""
    found = queries.detach().cpu().numpy().astype(np.float32, copy=False)
    squared, nearest = index.search(np.ascontiguousarray(found), 1)
    distances = torch.from_numpy(squared[:, 0]).clamp_min(0).sqrt().to(queries.device)
    return distances, torch.from_numpy(nearest[:, 0]).to(queries.device)


# Eager torch at bottle's shapes: 1.2-1.3x faster than 4096 in 5 of 7 runs of benchmarks/search_chunk.py.
SEARCH_CHUNK = 1024
REFINE_PATCHES = 16


def chunk_distances(embedding: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """``|b|^2 - 2 q.b`` for every query row and bank row of ``part``: one fused matmul-add.

    ``|q|^2`` is the same for every bank row, so the callers add it after the minimum.
    """
    return torch.addmm(part.pow(2).sum(-1)[None, :], embedding, part.T, alpha=-2.0)


def conv_chunk_distances(columns: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """``chunk_distances`` as a 1x1 convolution with bias, bank rows as filters, on ``1 x D x N x 1`` queries.

    The INT8 export's form: on this AVX2 CPU without VNNI, OpenVINO ran this graph 1.61x faster in
    INT8 than in FP32, where quantized matmuls had run at 0.78x FP32; in FP32 the matmul is the
    faster form (1.02x and 1.10x in two runs of benchmarks/export.py).
    """
    return F.conv2d(columns, -2.0 * part[:, :, None, None], part.pow(2).sum(-1))


def as_columns(queries: torch.Tensor) -> torch.Tensor:
    """``N x D`` query rows as the ``1 x D x N x 1`` input of ``conv_chunk_distances``."""
    return queries.T.reshape(1, queries.shape[1], -1, 1)


def nearest_bank_distances(
    embedding: torch.Tensor, bank: torch.Tensor, chunk: int = SEARCH_CHUNK, convolution: bool = False
) -> torch.Tensor:
    """Exact distance from each query row to its nearest bank row (the scoring path's search).

    The bank is scanned in fixed chunks so the full query-by-bank distance matrix never exists at
    once (the chunk count is static, which keeps the traced graph shape-agnostic). No index: only
    each image's top patch needs its neighbour (``reweighted_image_score`` finds it), and in the
    exported graph a minimum with its index (TopK) cost as much as the chunk's matmul, a plain
    minimum (ReduceMin) a tenth of it (OpenVINO's per-op profile, benchmarks/export.py's model).
    ``convolution`` scans each chunk with ``conv_chunk_distances`` (same distances).
    """
    parts = [bank[start : start + chunk] for start in range(0, bank.shape[0], chunk)]
    if convolution:
        columns = as_columns(embedding)
        minima = [conv_chunk_distances(columns, part).amin(dim=1).reshape(-1) for part in parts]
    else:
        minima = [chunk_distances(embedding, part).amin(dim=1) for part in parts]
    best = functools.reduce(torch.minimum, minima)
    return (best + embedding.pow(2).sum(-1)).clamp_min(0).sqrt()


def nearest_bank_rows(
    embedding: torch.Tensor, bank: torch.Tensor, chunk: int = SEARCH_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact nearest bank row for each query row: (distance, index), chunked as ``nearest_bank_distances``."""
    best = best_idx = None
    for start in range(0, bank.shape[0], chunk):
        value, index = chunk_distances(embedding, bank[start : start + chunk]).min(dim=1)
        index = index + start
        if best is None:
            best, best_idx = value, index
        else:
            closer = value < best
            best = torch.where(closer, value, best)
            best_idx = torch.where(closer, index, best_idx)
    best = (best + embedding.pow(2).sum(-1)).clamp_min(0)
    return best.sqrt(), best_idx


def nearest_rows(queries: torch.Tensor, bank: torch.Tensor, size: int, chunk: int = SEARCH_CHUNK) -> torch.Tensor:
    """Indices of the ``size`` nearest bank rows of each query row, nearest first (``chunk`` queries at a time)."""
    parts = queries.split(chunk)
    return torch.cat([chunk_distances(part, bank).topk(size, dim=1, largest=False).indices for part in parts])


@torch.no_grad()
def refine_top_patches(queries: torch.Tensor, bank: torch.Tensor, distances: torch.Tensor, batch: int) -> torch.Tensor:
    """Exact search for each image's most distant patches until its largest distance is certified exact.

    An approximate neighbour is never closer than the true one, so once the largest exact distance among
    the refined patches is at least the largest approximate distance left unrefined, no other patch can
    hold the image's maximum: the image score (the maximum and its re-weighting) is the exact search's,
    up to float rounding. Without it, HNSW at 98% recall@1 took bottle's image AUROC from 1.000 to 0.580
    (benchmarks/inference.py). The anomaly map keeps the approximate distances of the other patches.
    """
    distances = distances.clone()
    per_image = distances.shape[0] // batch
    for image, approximate in enumerate(distances.reshape(batch, per_image).clone()):
        order = approximate.argsort(descending=True)
        start, stop, best = 0, min(REFINE_PATCHES, per_image), 0.0
        while True:
            rows = order[start:stop] + image * per_image
            distances[rows] = nearest_bank_distances(queries[rows], bank)
            best = max(best, float(distances[rows].max()))
            if stop == per_image or best >= float(approximate[order[stop]]):
                break
            start, stop = stop, min(2 * stop, per_image)
    return distances
