"""ReConPatch in pure torch: patch features, the linear representation ``f`` and the scoring path.

Only ``f`` and the memory bank are kept after training; the projection ``g``, its EMA
copies and the loss live in the Lightning module's training phase. The eval forward is
plain tensor operations with symbolic shapes, so the stock ONNX/OpenVINO export traces it.

Paper: Hyun et al., WACV 2024, https://arxiv.org/abs/2305.16713

Example:
    >>> import torch
    >>> from anomalib_reconpatch.reconpatch import ReConPatchModel
    >>> model = ReConPatchModel("tf_efficientnet_lite0", ["blocks.2", "blocks.4"])  # doctest: +SKIP
    >>> features = model.train()(torch.rand(1, 3, 256, 256))  # doctest: +SKIP
    >>> model.memory_bank = features[::10]  # doctest: +SKIP
    >>> model.eval()(torch.rand(1, 3, 256, 256)).anomaly_map.shape  # doctest: +SKIP
    torch.Size([1, 256, 256])

See Also:
    - :class:`anomalib_reconpatch.reconpatch.lightning_model.ReConPatch`: the Lightning module
      that trains ``f`` and builds the memory bank.
    - :mod:`anomalib_reconpatch.reconpatch.search`: the memory-bank search.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from anomalib.data import InferenceBatch
from anomalib.models.components import DynamicBufferMixin
from torch import nn
from torch.nn import functional as F  # noqa: N812

from ..components.backbone import build_feature_extractor
from .anomaly_map import AnomalyMapGenerator, largest_pixel
from .search import (
    as_columns,
    build_index,
    chunk_distances,
    conv_chunk_distances,
    exporting,
    nearest_bank_distances,
    nearest_rows,
    refine_top_patches,
    search_index,
)

NOT_FITTED = "ReConPatch has no memory bank yet: train it (engine.fit) or load a fitted checkpoint before testing."
"""What scoring without a memory bank says."""

IMAGE_SCORES = ("patches", "map")
"""How a single model scores an image: PatchCore's re-weighted largest patch distance, or the largest pixel
of its anomaly map (measured in ``docs/design/image-score.md``)."""

ENSEMBLE_IMAGE_SCORES = ("members", "map", "member_peaks")
"""How an ensemble of these models scores an image: the mean of its members' standardised image scores, the
largest pixel of its averaged map, or the mean of its members' largest map pixels, each standardised by its
training images' largest pixels (measured in ``docs/design/ensemble.md``)."""


class FullFloat32Switch:
    """Torch's process-wide float32 settings for CUDA matmuls and cuDNN convolutions, held at ``ieee`` while used.

    The settings are global, so uses are counted across threads and nesting: the first user saves the
    settings and sets them, the last one restores them. Two threads' CUDA forwards that overlap thus never
    leave TF32 behind, nor run one of them in it.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0
        self.saved: tuple[str, str] = ("", "")

    @staticmethod
    def settings() -> tuple[Any, Any]:
        """The per-backend settings: CUDA matmuls and cuDNN convolutions.

        Returns:
            tuple[Any, Any]: ``torch.backends.cuda.matmul`` and ``torch.backends.cudnn.conv``.
        """
        return torch.backends.cuda.matmul, torch.backends.cudnn.conv

    def enter(self) -> None:
        """Count a user; the first one saves the settings and sets both to ``ieee``."""
        with self.lock:
            if self.users == 0:
                matmul, convolution = self.settings()
                self.saved = matmul.fp32_precision, convolution.fp32_precision
                matmul.fp32_precision = convolution.fp32_precision = "ieee"
            self.users += 1

    def leave(self) -> None:
        """Count a user out; the last one restores the saved settings."""
        with self.lock:
            self.users -= 1
            if self.users == 0:
                matmul, convolution = self.settings()
                matmul.fp32_precision, convolution.fp32_precision = self.saved


FULL_FLOAT32 = FullFloat32Switch()


@contextmanager
def ieee_float32(device: torch.device) -> Iterator[None]:
    """On a CUDA device, run cuDNN convolutions and CUDA matmuls in full float32 (no TF32) while active.

    cuDNN allows TF32 convolutions by default, and Lightning suggests TF32 matmuls on GPUs with tensor
    cores; TF32 keeps 10 mantissa bits, so a GPU fit's features, bank and thresholds would sit about 1e-3
    away from what the float32 export computes on a CPU. The settings are restored when the last user
    leaves (:class:`FullFloat32Switch`), so the user's own choice holds outside the model; being global,
    they also hold for other CUDA work that runs meanwhile. Nothing changes on other devices. Torch's
    per-backend ``fp32_precision`` settings are used, since its legacy getters raise once a user has set
    those.

    Args:
        device (torch.device): The device the work runs on.

    Yields:
        None: Control, with full float32 on CUDA.
    """
    if device.type != "cuda":
        yield
        return
    FULL_FLOAT32.enter()
    try:
        yield
    finally:
        FULL_FLOAT32.leave()


def identity_linear(dim: int) -> nn.Linear:
    """Build a ``dim -> dim`` linear layer that starts as the identity.

    Training then starts from PatchCore's metric, and with no training steps the model is PatchCore
    (see ``docs/design/identity-init.md``).

    Args:
        dim (int): Input and output size.

    Returns:
        nn.Linear: Layer with weight ``I`` and bias 0.
    """
    layer = nn.Linear(dim, dim)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(dim))
        layer.bias.zero_()
    return layer


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """Move the target network's parameters towards the online network's, in place.

    ``theta_target <- momentum * theta_target + (1 - momentum) * theta_online`` for every parameter.

    Args:
        target (nn.Module): EMA copy, updated in place.
        online (nn.Module): Trained network with the same parameters in the same order.
        momentum (float): EMA momentum ``gamma`` in ``[0, 1)``.
    """
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        t.lerp_(o, 1.0 - momentum)


@torch.no_grad()
def centred_rotated_frame(
    weight: torch.Tensor, bias: torch.Tensor, bank: torch.Tensor, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Re-express ``f``'s weight and bias and the bank about the bank's mean, turned by a random rotation.

    With ``m`` the bank's mean and ``R`` orthogonal: ``W' = R W``, ``b' = R (b - m)``, ``bank' = (bank - m) R^T``,
    so every distance between ``f(x)`` and a bank row is kept, and FP32's ``|q|^2 - 2 q.b + |b|^2``
    cancels less. An INT8 matmul search with one scale per tensor needs the fold; the exported INT8
    search scales each bank row and does not (see ``docs/design/bank-fold.md``).
    ``R`` comes from its own seeded generator (float64 QR, signs fixed), so the global RNG is untouched.

    Args:
        weight (torch.Tensor): ``D x D`` weight ``W`` of ``f``.
        bias (torch.Tensor): ``D`` bias ``b`` of ``f``.
        bank (torch.Tensor): ``M x D`` memory bank in ``f``'s output space.
        seed (int): Seed of the rotation. Defaults to ``0``.

    Returns:
        tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ``W'``, ``b'`` and ``bank'``, each in its input's
        dtype (computed in float64).
    """
    dim = bank.shape[1]
    gaussian = torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    rotation = q * r.diagonal().sign()
    # on the CPU, in float64 (which some GPUs lack), so that every device gets the same fold
    weight_64, bias_64, bank_64 = (tensor.detach().to("cpu", torch.float64) for tensor in (weight, bias, bank))
    mean = bank_64.mean(0)
    return (
        (rotation @ weight_64).to(weight.device, weight.dtype),
        (rotation @ (bias_64 - mean)).to(bias.device, bias.dtype),
        ((bank_64 - mean) @ rotation.T).to(bank.device, bank.dtype),
    )


def reweighted_image_score(
    patch_scores: torch.Tensor,
    embedding: torch.Tensor,
    memory_bank: torch.Tensor,
    num_neighbors: int,
    support_table: torch.Tensor | None = None,
    convolution: bool = False,
) -> torch.Tensor:
    """PatchCore's image score: the largest patch distance, damped when its bank neighbour is isolated.

    The top patch's nearest bank row is searched here, for that patch alone (the patch search returns
    distances only); its support is that row's ``num_neighbors`` nearest bank rows. Exports look the
    support up in ``support_table`` (every bank row's, :func:`nearest_rows`), which spares a pass over the
    bank and a top-k per image; ``convolution`` finds the neighbour with ``conv_chunk_distances``, so
    INT8 quantizes it with the patch search. The damping factor is ``1 - softmax(d)[0]`` over the top
    patch's distances ``d`` to its support rows, its own neighbour first.

    Args:
        patch_scores (torch.Tensor): ``B x P`` nearest-neighbour distances.
        embedding (torch.Tensor): ``B x P x D`` patch embeddings.
        memory_bank (torch.Tensor): ``M x D`` bank.
        num_neighbors (int): Support size; 1 returns the plain maximum.
        support_table (torch.Tensor | None): ``M x min(num_neighbors, M)`` support of every bank row, or
            None to search it. Defaults to ``None``.
        convolution (bool): Search the neighbour as a 1x1 convolution (the INT8 export's form).
            Defaults to ``False``.

    Returns:
        torch.Tensor: ``B`` image scores.
    """
    max_scores, max_patches = patch_scores.max(dim=1)
    if num_neighbors <= 1:
        return max_scores
    batch = torch.arange(patch_scores.shape[0], device=patch_scores.device)
    max_features = embedding[batch, max_patches]
    if convolution:
        neighbour = conv_chunk_distances(as_columns(max_features), memory_bank).argmin(dim=1).reshape(-1)
    else:
        neighbour = chunk_distances(max_features, memory_bank).argmin(dim=1)
    if support_table is None:
        support = nearest_rows(memory_bank[neighbour], memory_bank, min(num_neighbors, memory_bank.shape[0]))
    else:
        support = support_table[neighbour]
    support_dist = (max_features[:, None, :] - memory_bank[support]).pow(2).sum(-1).clamp_min(0).sqrt()
    weights = 1.0 - F.softmax(support_dist, dim=1)[:, 0]
    return weights * max_scores


class ReConPatchModel(DynamicBufferMixin, nn.Module):
    """ReConPatch's torch model: frozen backbone -> PatchCore patch features -> ``f`` -> nearest bank distance.

    In training mode the forward returns the raw patch features that the Lightning module trains
    ``f`` on and builds the memory bank from; in eval mode it returns image scores and anomaly maps.

    Args:
        backbone (str): timm model name.
        layers (Sequence[str]): Feature layers, each 3x3 average-pooled, concatenated at the first
            layer's resolution.
        pre_trained (bool): Load ImageNet weights (needed for meaningful features). Defaults to ``True``.
        embedding_dim (int | None): If set, adaptive-average-pool the concatenated channels to this size.
            Defaults to ``None``.
        num_neighbors (int): PatchCore's image-score re-weighting support size. Defaults to ``9``.
        search (str): Nearest-neighbour search of the Python path: ``exact`` (torch) or a faiss index
            (``hnsw``, ``ivf``), built lazily from the bank and never saved. Export always traces exact.
            Defaults to ``"exact"``.
        image_score (str): One of ``IMAGE_SCORES``: ``map`` is the largest pixel of the anomaly map,
            ``patches`` PatchCore's score (the largest patch distance, re-weighted by its bank neighbour's
            isolation). Defaults to ``"map"``.

    Example:
        >>> import torch
        >>> from anomalib_reconpatch.reconpatch import ReConPatchModel
        >>> model = ReConPatchModel(  # doctest: +SKIP
        ...     "tf_efficientnet_lite0", ["blocks.2", "blocks.4"], pre_trained=False
        ... )
        >>> images = torch.rand(2, 3, 256, 256)
        >>> features = model.train()(images)  # doctest: +SKIP
        >>> features.shape  # one row per patch of the 32 x 32 grid  # doctest: +SKIP
        torch.Size([2048, 152])
        >>> model.memory_bank = features[::10]  # f is the identity before training  # doctest: +SKIP
        >>> output = model.eval()(images)  # doctest: +SKIP
        >>> output.pred_score.shape, output.anomaly_map.shape  # doctest: +SKIP
        (torch.Size([2]), torch.Size([2, 256, 256]))
    """

    def __init__(
        self,
        backbone: str,
        layers: Sequence[str],
        pre_trained: bool = True,
        embedding_dim: int | None = None,
        num_neighbors: int = 9,
        search: str = "exact",
        image_score: str = "map",
    ) -> None:
        super().__init__()
        self.search = search
        self.image_score = image_score
        self.convolution_search = False  # both set only inside export_form
        self.support_table: torch.Tensor | None = None
        self._indexes: dict[str, tuple[torch.Tensor, object]] = {}
        self.backbone = backbone
        self.layers = list(layers)
        self.num_neighbors = num_neighbors
        self.feature_extractor = build_feature_extractor(backbone, self.layers, pre_trained)
        for parameter in self.feature_extractor.parameters():
            parameter.requires_grad_(False)
        self.feature_pooler = nn.AvgPool2d(3, 1, 1)
        raw_dim = sum(self.feature_extractor.out_dims)
        self.embedding_dim = embedding_dim or raw_dim
        self.representation = identity_linear(self.embedding_dim)
        self.anomaly_map_generator = AnomalyMapGenerator()
        self.memory_bank: torch.Tensor
        self.register_buffer("memory_bank", torch.empty(0))

    def train(self, mode: bool = True) -> ReConPatchModel:
        """Set the training mode, but keep the frozen backbone (and its batch norms) in eval mode always.

        Args:
            mode (bool): Training mode for everything but the backbone. Defaults to ``True``.

        Returns:
            ReConPatchModel: ``self``.
        """
        super().train(mode)
        self.feature_extractor.eval()
        return self

    @torch.no_grad()
    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """Extract PatchCore patch features (before ``f``), without gradient, in full float32 on a GPU.

        Each layer's map is 3x3 average-pooled, bilinearly resized to the first layer's grid and
        concatenated; ``embedding_dim`` then pools the channels when it is smaller.

        Args:
            images (torch.Tensor): ``B x 3 x H x W`` normalised images.

        Returns:
            torch.Tensor: ``B x D x h x w`` patch features, ``D`` being ``embedding_dim``.
        """
        with ieee_float32(images.device):
            features = self.feature_extractor(images)
            pooled = [self.feature_pooler(features[layer]) for layer in self.layers]
            size = pooled[0].shape[-2:]
            resized = [pooled[0]] + [F.interpolate(f, size=size, mode="bilinear") for f in pooled[1:]]
            embedding = torch.cat(resized, dim=1)
            if self.embedding_dim != embedding.shape[1]:
                embedding = F.adaptive_avg_pool1d(
                    embedding.permute(0, 2, 3, 1).flatten(0, 2)[:, None, :], self.embedding_dim
                )
                embedding = embedding.reshape(resized[0].shape[0], size[0], size[1], -1).permute(0, 3, 1, 2)
            return embedding

    def embed(self, patch_features: torch.Tensor) -> torch.Tensor:
        """Apply the learned representation ``f``.

        Args:
            patch_features (torch.Tensor): ``... x D`` patch features.

        Returns:
            torch.Tensor: ``... x D`` embeddings ``f(x)``.
        """
        return self.representation(patch_features)

    @torch.no_grad()
    def fold_bank_frame(self) -> None:
        """Move ``f`` and the bank into :func:`centred_rotated_frame`, in place; every score stays the same.

        Called at the end of ``fit``, once the memory bank is built (see ``docs/design/bank-fold.md``).
        """
        f = self.representation
        weight, bias, self.memory_bank = centred_rotated_frame(f.weight, f.bias, self.memory_bank)
        f.weight.copy_(weight)
        f.bias.copy_(bias)

    @contextmanager
    def export_form(self, convolution: bool) -> Iterator[None]:
        """Make the forward the exported graph's while active: the support table, and 1x1-convolution searches if asked.

        Nested uses keep the outer table; leaving restores the previous form. The table holds every
        bank row's ``num_neighbors`` nearest rows, built by one pass of the bank against itself on
        entry when the image score re-weights, so an exported graph looks the image score's support
        up instead of searching it (see ``docs/design/distance-only-search.md``).

        Args:
            convolution (bool): Trace the bank searches as 1x1 convolutions (the INT8 export's form).

        Yields:
            None: Control, with the export form in place.
        """
        previous = self.support_table, self.convolution_search
        reweights = self.image_score == "patches" and self.num_neighbors > 1
        if self.support_table is None and self.memory_bank.numel() and reweights:
            size = min(self.num_neighbors, self.memory_bank.shape[0])
            self.support_table = nearest_rows(self.memory_bank, self.memory_bank, size)
        self.convolution_search = convolution
        try:
            yield
        finally:
            self.support_table, self.convolution_search = previous

    def search_bank(self, queries: torch.Tensor, batch: int = 1) -> torch.Tensor:
        """Find the distance from each query to its nearest bank row.

        Torch exact search; or, outside of tracing and export, the faiss index followed by the exact
        refinement of each image's top patches (``refine_top_patches``), so PatchCore's image score
        (``image_score="patches"``) stays exact; the map, and the map's largest pixel, keep the index's error.

        Args:
            queries (torch.Tensor): ``N x D`` embedded patches of ``batch`` images, image by image.
            batch (int): Number of images in ``queries``. Defaults to ``1``.

        Returns:
            torch.Tensor: ``N`` Euclidean distances.
        """
        if self.search == "exact" or exporting():
            return nearest_bank_distances(queries, self.memory_bank, convolution=self.convolution_search)
        distances, _ = search_index(self.bank_index(), queries)
        return refine_top_patches(queries, self.memory_bank, distances, batch)

    def bank_index(self) -> object:
        """Return the faiss index of ``search`` over the current bank, built on first use and when the bank changes.

        Each entry holds the bank tensor itself, so a new bank can never be mistaken for the indexed one.

        Returns:
            object: The faiss index (see ``search.build_index``).
        """
        bank, index = self._indexes.get(self.search, (None, None))
        if bank is not self.memory_bank:
            index = build_index(self.memory_bank, self.search)
            self._indexes[self.search] = (self.memory_bank, index)
        return index

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> ReConPatchModel:
        """Move or cast the module (``.to``, ``.cpu``), dropping the indexes of a bank that this replaced.

        Otherwise an index would keep the former bank alive, on the GPU after Lightning's teardown moves the
        model to the CPU, and ``torch.save`` of the model would write it. A move that keeps the bank (a CPU
        model's ``.cpu()``) keeps its index.
        """
        module = super()._apply(fn, recurse)
        self._indexes = {kind: entry for kind, entry in self._indexes.items() if entry[0] is self.memory_bank}
        return module

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object) -> None:
        """Loading copies into the bank in place: drop the index so the next search rebuilds it."""
        self._indexes.clear()
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, images: torch.Tensor) -> torch.Tensor | InferenceBatch:
        """Extract patch features in training mode; score the images in eval mode.

        Args:
            images (torch.Tensor): ``B x 3 x H x W`` normalised images.

        Returns:
            torch.Tensor | InferenceBatch: In training mode, ``(B * h * w) x D`` raw patch features
            (before ``f``) for the fit; in eval mode, ``pred_score`` (``B``) and ``anomaly_map``
            (``B x H x W``).

        Raises:
            RuntimeError: In eval mode, if the memory bank is empty (the model is not fitted).
        """
        features = self.patch_features(images)
        if self.training:
            return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
        if self.memory_bank.numel() == 0:
            raise RuntimeError(NOT_FITTED)
        return self.score_features(features, images.shape[-2:])

    def score_features(self, features: torch.Tensor, image_size: tuple[int, int] | torch.Size) -> InferenceBatch:
        """Score patch features: the eval path after the backbone, in full float32 on a GPU.

        The benchmarks call it on cached features, so they score exactly as the model does.

        Args:
            features (torch.Tensor): ``B x D x h x w`` patch features from :meth:`patch_features`.
            image_size (tuple[int, int] | torch.Size): ``(H, W)`` of the anomaly maps.

        Returns:
            InferenceBatch: ``pred_score`` (``B``) and ``anomaly_map`` (``B x H x W``).
        """
        with ieee_float32(features.device):
            return self.score_embedding(self.embed(features.permute(0, 2, 3, 1)), image_size)

    def score_embedding(self, embedding: torch.Tensor, image_size: tuple[int, int] | torch.Size) -> InferenceBatch:
        """Score embedded patches against the memory bank: image scores and anomaly maps.

        Args:
            embedding (torch.Tensor): ``B x h x w x D`` patches ``f(x)``, in the bank's frame.
            image_size (tuple[int, int] | torch.Size): ``(H, W)`` of the anomaly maps.

        Returns:
            InferenceBatch: ``pred_score`` (``B``) and ``anomaly_map`` (``B x H x W``).
        """
        batch, height, width, dim = embedding.shape
        queries = embedding.reshape(-1, dim)
        patch_scores = self.search_bank(queries, batch).reshape(batch, -1)
        anomaly_map = self.anomaly_map_generator(patch_scores.reshape(batch, 1, height, width), image_size)
        if self.image_score == "map":
            pred_score = largest_pixel(anomaly_map)
        else:
            pred_score = reweighted_image_score(
                patch_scores,
                queries.reshape(batch, -1, dim),
                self.memory_bank,
                self.num_neighbors,
                self.support_table,
                self.convolution_search,
            )
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)
