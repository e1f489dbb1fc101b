"""Nearest memory-bank row search: exact in torch, or a faiss index for the Python inference path.

Exact search stays in torch (:func:`nearest_bank_distances`, :func:`nearest_bank_rows`): faiss's
exact ``IndexFlatL2`` is no faster, and the torch search is what the ONNX/OpenVINO export traces.
It scans the bank in fixed chunks and keeps distances only. faiss serves the approximate options
(``hnsw``, ``ivf``), which only the Python path uses, each followed by an exact search of every
image's most distant patches (see ``docs/design/distance-only-search.md``).
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
IVF_NPROBE = 8  # inverted lists scanned per query (faiss nprobe): more lists, higher recall, slower search


def exporting() -> bool:
    """Tell whether torch is tracing, exporting or compiling the model.

    Then only the pure-torch search may run: a faiss index cannot be traced.

    Returns:
        bool: True inside ``torch.jit`` tracing, ``torch.export`` or ``torch.compile``.
    """
    return torch.jit.is_tracing() or torch.compiler.is_exporting() or torch.compiler.is_compiling()


def build_index(bank: torch.Tensor, kind: str) -> Any:
    """Build a faiss index over the memory bank.

    Args:
        bank (torch.Tensor): ``M x D`` bank rows, copied to float32 on the CPU.
        kind (str): ``flat`` (exact), ``hnsw`` (graph, ``HNSW_*`` settings) or ``ivf`` (inverted lists,
            about ``IVF_LISTS_PER_SQRT_N * sqrt(M)`` of them, ``IVF_NPROBE`` scanned), the last two
            approximate.

    Returns:
        faiss.Index: The trained index holding every bank row, in bank order.

    Raises:
        ValueError: If ``kind`` is none of the three.
    """
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
    """Find the nearest indexed row of each query, with the same contract as :func:`nearest_bank_rows`.

    Args:
        index (faiss.Index): Index from :func:`build_index`.
        queries (torch.Tensor): ``N x D`` query rows.

    Returns:
        tuple[torch.Tensor, torch.Tensor]: ``N`` Euclidean distances (not squared) and ``N`` bank row
        indices, on the queries' device.
    """
    found = queries.detach().cpu().numpy().astype(np.float32, copy=False)
    squared, nearest = index.search(np.ascontiguousarray(found), 1)
    distances = torch.from_numpy(squared[:, 0]).clamp_min(0).sqrt().to(queries.device)
    return distances, torch.from_numpy(nearest[:, 0]).to(queries.device)


# Bank rows per search chunk: bounds the query-by-bank matrix and keeps the traced chunk count static;
# the size was chosen by timing several (see docs/design/distance-only-search.md).
SEARCH_CHUNK = 1024
REFINE_PATCHES = 16  # patches per image searched exactly first by refine_top_patches; doubled until certified


def chunk_distances(embedding: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """Squared distances less ``|q|^2``: ``|b|^2 - 2 q.b`` for every query and bank row, one fused matmul-add.

    ``|q|^2`` is the same for every bank row, so the callers add it after the minimum.

    Args:
        embedding (torch.Tensor): ``N x D`` query rows ``q``.
        part (torch.Tensor): ``C x D`` bank rows ``b``.

    Returns:
        torch.Tensor: ``N x C`` values ``|b|^2 - 2 q.b``.
    """
    return torch.addmm(part.pow(2).sum(-1)[None, :], embedding, part.T, alpha=-2.0)


def conv_chunk_distances(columns: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """:func:`chunk_distances` as a 1x1 convolution with bias, the bank rows as its filters.

    The INT8 export's form: OpenVINO's INT8 1x1 convolution is fast on CPUs where its INT8 matmul is
    not, and NNCF scales convolution weights per output channel, that is per bank row. FP32 exports
    keep the matmul form, which the convolution does not beat (see
    ``docs/design/int8-convolution-search.md``).

    Args:
        columns (torch.Tensor): ``1 x D x N x 1`` queries, from :func:`as_columns`.
        part (torch.Tensor): ``C x D`` bank rows; weights ``-2 b``, bias ``|b|^2``.

    Returns:
        torch.Tensor: ``1 x C x N x 1`` values ``|b|^2 - 2 q.b``.
    """
    return F.conv2d(columns, -2.0 * part[:, :, None, None], part.pow(2).sum(-1))


def as_columns(queries: torch.Tensor) -> torch.Tensor:
    """Lay query rows out as the input image of :func:`conv_chunk_distances`.

    Args:
        queries (torch.Tensor): ``N x D`` query rows.

    Returns:
        torch.Tensor: ``1 x D x N x 1`` tensor: one image with a channel per feature and a pixel per query.
    """
    return queries.T.reshape(1, queries.shape[1], -1, 1)


def nearest_bank_distances(
    embedding: torch.Tensor, bank: torch.Tensor, chunk: int = SEARCH_CHUNK, convolution: bool = False
) -> torch.Tensor:
    """Exact distance from each query row to its nearest bank row (the scoring path's search).

    The bank is scanned in fixed chunks so the full query-by-bank distance matrix never exists at
    once (the chunk count is static, which keeps the traced graph shape-agnostic). No index: only
    each image's top patch needs its neighbour (``reweighted_image_score`` finds it), and in the
    exported graph a minimum with its index (``TopK``) costs much more than a plain minimum
    (``ReduceMin``; see ``docs/design/distance-only-search.md``).

    Args:
        embedding (torch.Tensor): ``N x D`` query rows.
        bank (torch.Tensor): ``M x D`` memory bank.
        chunk (int): Bank rows per chunk. Defaults to ``SEARCH_CHUNK``.
        convolution (bool): Scan each chunk with :func:`conv_chunk_distances` (the INT8 export's form,
            same distances) instead of :func:`chunk_distances`. Defaults to ``False``.

    Returns:
        torch.Tensor: ``N`` Euclidean distances (not squared).

    Example:
        >>> import torch
        >>> from anomalib_reconpatch.reconpatch.search import nearest_bank_distances
        >>> bank = torch.eye(3)
        >>> queries = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
        >>> nearest_bank_distances(queries, bank)
        tensor([0., 1.])
        >>> nearest_bank_distances(queries, bank, chunk=2, convolution=True)
        tensor([0., 1.])
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
    """Exact nearest bank row of each query row, with its distance, chunked as :func:`nearest_bank_distances`.

    Args:
        embedding (torch.Tensor): ``N x D`` query rows.
        bank (torch.Tensor): ``M x D`` memory bank.
        chunk (int): Bank rows per chunk. Defaults to ``SEARCH_CHUNK``.

    Returns:
        tuple[torch.Tensor, torch.Tensor]: ``N`` Euclidean distances and ``N`` bank row indices.
    """
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
    """Find the ``size`` nearest bank rows of each query row, nearest first.

    Used for the support of PatchCore's image-score re-weighting, and for the support table of every
    bank row that exports look up.

    Args:
        queries (torch.Tensor): ``Q x D`` query rows.
        bank (torch.Tensor): ``M x D`` memory bank.
        size (int): Neighbours per query, at most ``M``.
        chunk (int): Queries per chunk, so at most ``chunk x M`` distances exist at once. Defaults to
            ``SEARCH_CHUNK``.

    Returns:
        torch.Tensor: ``Q x size`` bank row indices.
    """
    parts = queries.split(chunk)
    return torch.cat([chunk_distances(part, bank).topk(size, dim=1, largest=False).indices for part in parts])


@torch.no_grad()
def refine_top_patches(queries: torch.Tensor, bank: torch.Tensor, distances: torch.Tensor, batch: int) -> torch.Tensor:
    """Exact search for each image's most distant patches until its largest distance is certified exact.

    An approximate neighbour is never closer than the true one, so once the largest exact distance among
    the refined patches is at least the largest approximate distance left unrefined, no other patch can
    hold the image's maximum: the image score (the maximum and its re-weighting) is the exact search's,
    up to float rounding. Without the refinement, the few neighbours an approximate index misses change
    image scores and rankings (see ``docs/design/distance-only-search.md``). The anomaly map keeps the
    approximate distances of the other patches. Each image starts with its ``REFINE_PATCHES`` most
    distant patches and doubles the count until certified.

    Args:
        queries (torch.Tensor): ``N x D`` patch embeddings of ``batch`` images, image by image.
        bank (torch.Tensor): ``M x D`` memory bank.
        distances (torch.Tensor): ``N`` approximate nearest-bank distances of ``queries``.
        batch (int): Number of images; each holds ``N // batch`` patches.

    Returns:
        torch.Tensor: ``N`` distances: exact for the refined patches, the input's elsewhere.
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
