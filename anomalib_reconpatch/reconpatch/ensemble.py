"""ReConPatch ensemble: several backbones, each with its own ``f`` and memory bank, scored together.

The paper's headline results come from an ensemble of backbones. Each member is a complete
ReConPatch (frozen backbone, trained ``f``, coreset bank). Its image scores and anomaly maps are
standardised with their mean and standard deviation over the member's own training images (never
the test set), so members on different feature scales count equally, and the ensemble averages
them. The eval forward runs every member in one graph, so ``anomalib export`` writes one model.

Paper: https://arxiv.org/abs/2305.16713

Example:
    >>> from anomalib.data import MVTecAD
    >>> from anomalib.engine import Engine
    >>> from anomalib_reconpatch.reconpatch import ReConPatchEnsemble
    >>> datamodule = MVTecAD(root="datasets/MVTecAD", category="bottle")  # doctest: +SKIP
    >>> model = ReConPatchEnsemble(coreset_sampling_ratio=0.01)  # doctest: +SKIP
    >>> engine = Engine()  # doctest: +SKIP
    >>> engine.fit(model=model, datamodule=datamodule)  # doctest: +SKIP
    >>> engine.test(model=model, datamodule=datamodule)  # doctest: +SKIP

    From the command line: ``anomalib train --model ReConPatchEnsemble --data ...``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import anomalib.models as anomalib_models
import torch
from anomalib.data import Batch, InferenceBatch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.visualization import Visualizer
from torch import nn

from ..components.distributed import all_sum
from ..components.progress import stop_if_terminated
from ..components.threads import split_over_threads
from .anomaly_map import largest_pixel
from .lightning_model import ReConPatch
from .torch_model import ENSEMBLE_IMAGE_SCORES, IMAGE_SCORES, ReConPatchModel
from .validation import (
    ENSEMBLE_KEY,
    _check_range,
    check_image_score,
    check_image_score_matches,
    validate_hyperparameters,
)

DEFAULT_BACKBONES = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2")


def standardise(values: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Standardise ``values`` by a mean and standard deviation measured elsewhere (the training images).

    Args:
        values (torch.Tensor): Scores or maps of one member.
        mean (torch.Tensor): Scalar mean of the member's training scores or maps.
        std (torch.Tensor): Scalar standard deviation of the same; must be positive.

    Returns:
        torch.Tensor: ``(values - mean) / std``.

    Example:
        >>> import torch
        >>> from anomalib_reconpatch.reconpatch.ensemble import standardise
        >>> standardise(torch.tensor([1.0, 3.0]), torch.tensor(2.0), torch.tensor(0.5))
        tensor([-2.,  2.])
    """
    return (values - mean) / std


class TrainingStatistics:
    """Running float64 mean and standard deviation of a stream of tensors (every element counts once)."""

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.squares = 0.0

    def add(self, values: torch.Tensor) -> None:
        """Add every element of ``values``.

        Args:
            values (torch.Tensor): Any shape.
        """
        values = values.detach().to("cpu", torch.float64)  # float64 on the CPU: not every GPU has it
        self.count += values.numel()
        self.total += float(values.sum())
        self.squares += float(values.pow(2).sum())

    def mean_std(self) -> tuple[float, float]:
        """Return the mean and the (population) standard deviation, floored at float32's smallest normal.

        In a distributed fit the sums of every rank count, so each rank gets the statistics of all
        training images.

        Returns:
            tuple[float, float]: Mean and standard deviation of everything added.

        Raises:
            ValueError: If nothing was added.
        """
        count, total, squares = all_sum(torch.tensor([self.count, self.total, self.squares], dtype=torch.float64))
        if count == 0:
            msg = "no training scores were recorded"
            raise ValueError(msg)
        mean = float(total / count)
        variance = max(float(squares / count) - mean * mean, 0.0)
        return mean, max(variance**0.5, float(torch.finfo(torch.float32).tiny))


class EnsembleMember(ReConPatch):
    """One backbone of the ensemble: a ReConPatch that also scores its training images after choosing its bank.

    It has no pre- or post-processor, evaluator or visualizer of its own: the ensemble's apply. Its image
    score is PatchCore's, whose standardised mean over the members is the ensemble's default score.
    """

    def __init__(self, **kwargs: Any) -> None:
        quiet = {"pre_processor": False, "post_processor": False, "evaluator": False, "visualizer": False}
        super().__init__(**quiet, image_score="patches", **kwargs)
        self.grid: tuple[int, int] | None = None
        self.image_size: tuple[int, int] | None = None
        self.score_statistics = (0.0, 1.0)
        self.map_statistics = (0.0, 1.0)
        self.peak_statistics = (0.0, 1.0)

    def training_step(self, batch: Batch, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Keep the batch's patch features, and the patch grid and image size that the training scores need.

        Args:
            batch (Batch): Training batch, already pre-processed by the ensemble.
            *args: Unused.
            **kwargs: Unused.

        Returns:
            torch.Tensor: A dummy zero loss, as :meth:`ReConPatch.training_step`'s.
        """
        del args, kwargs
        images = self.new_images(batch)
        if len(images):
            features = split_over_threads(self.model.patch_features, images)
            self.grid = (int(features.shape[-2]), int(features.shape[-1]))
            self.image_size = (int(images.shape[-2]), int(images.shape[-1]))
            self.store_features(features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]))
        return torch.tensor(0.0, requires_grad=True, device=self.device)

    @torch.no_grad()
    def on_memory_bank(self, embedded: torch.Tensor) -> None:
        """Score every training image against the new bank; keep its scores', maps' and map peaks' mean and deviation.

        Args:
            embedded (torch.Tensor): ``N x D`` training patches ``f(x)``, image by image.
        """
        height, width = self.grid
        scores, maps, peaks = TrainingStatistics(), TrainingStatistics(), TrainingStatistics()
        for chunk in embedded.split(16 * height * width):
            output = self.model.score_embedding(chunk.reshape(-1, height, width, chunk.shape[1]), self.image_size)
            scores.add(output.pred_score)
            maps.add(output.anomaly_map)
            peaks.add(largest_pixel(output.anomaly_map))
        self.score_statistics = scores.mean_std()
        self.map_statistics = maps.mean_std()
        self.peak_statistics = peaks.mean_std()


class ReConPatchEnsembleModel(nn.Module):
    """Torch model of the ensemble: every member's score and map, standardised, then averaged.

    Args:
        members (Sequence[ReConPatchModel]): The members' torch models.
        image_score (str): One of ``ENSEMBLE_IMAGE_SCORES``: ``members`` averages the members' standardised
            image scores, ``map`` takes the largest pixel of the averaged map, ``member_peaks`` averages the
            members' largest map pixels, each standardised by its training images' largest pixels.
            Defaults to ``"members"``.
    """

    def __init__(self, members: Sequence[ReConPatchModel], image_score: str = "members") -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.image_score = image_score
        count = len(members)
        self.score_mean: torch.Tensor
        self.score_std: torch.Tensor
        self.map_mean: torch.Tensor
        self.map_std: torch.Tensor
        self.peak_mean: torch.Tensor
        self.peak_std: torch.Tensor
        self.register_buffer("score_mean", torch.zeros(count))
        self.register_buffer("score_std", torch.ones(count))
        self.register_buffer("map_mean", torch.zeros(count))
        self.register_buffer("map_std", torch.ones(count))
        self.register_buffer("peak_mean", torch.zeros(count))
        self.register_buffer("peak_std", torch.ones(count))
        self.convolution_search = False

    def train(self, mode: bool = True) -> ReConPatchEnsembleModel:
        """Set the training mode; each member keeps its frozen backbone in eval mode.

        Args:
            mode (bool): Training mode. Defaults to ``True``.

        Returns:
            ReConPatchEnsembleModel: ``self``.
        """
        super().train(mode)
        for member in self.members:
            member.train(mode)
        return self

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """Return the first member's patch features (the training-size check counts its patches).

        Args:
            images (torch.Tensor): ``B x 3 x H x W`` normalised images.

        Returns:
            torch.Tensor: ``B x D x h x w`` patch features of the first member.
        """
        return self.members[0].patch_features(images)

    @contextmanager
    def export_form(self, convolution: bool) -> Iterator[None]:
        """Put every member in its export form (:meth:`ReConPatchModel.export_form`) while active.

        Args:
            convolution (bool): Trace the bank searches as 1x1 convolutions (the INT8 export's form).

        Yields:
            None: Control, with every member in export form.
        """
        previous = self.convolution_search
        with ExitStack() as stack:
            for member in self.members:
                stack.enter_context(member.export_form(convolution))
            self.convolution_search = convolution
            try:
                yield
            finally:
                self.convolution_search = previous

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        """Score images with every member and average the standardised scores and maps.

        Args:
            images (torch.Tensor): ``B x 3 x H x W`` normalised images.

        Returns:
            InferenceBatch: ``pred_score`` (``B``) and ``anomaly_map`` (``B x H x W``), in units of the
            members' training-score deviations.

        Raises:
            RuntimeError: In training mode (the ensemble trains through its members) or when a member is
                not fitted.
        """
        if self.training:
            msg = "ReConPatchEnsembleModel scores in eval mode only: it trains through its members."
            raise RuntimeError(msg)
        scores, maps = [], []
        for index, member in enumerate(self.members):
            output = member(images)
            if self.image_score == "member_peaks":
                peak = largest_pixel(output.anomaly_map)
                scores.append(standardise(peak, self.peak_mean[index], self.peak_std[index]))
            else:
                scores.append(standardise(output.pred_score, self.score_mean[index], self.score_std[index]))
            maps.append(standardise(output.anomaly_map, self.map_mean[index], self.map_std[index]))
        anomaly_map = torch.stack(maps).mean(0)
        pred_score = largest_pixel(anomaly_map) if self.image_score == "map" else torch.stack(scores).mean(0)
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)


class ReConPatchEnsemble(ReConPatch, AnomalibModule):
    """An ensemble of ReConPatch models on several backbones, trained and exported as one anomalib model.

    Every member trains its own ``f`` and coreset bank on the same images with the same settings;
    see :class:`~anomalib_reconpatch.reconpatch.lightning_model.ReConPatch` for each one. Members'
    scores and maps are standardised by their training images' statistics and averaged.
    ``AnomalibModule`` is listed as a direct base so that anomalib's ``get_model`` finds the class by name.

    Args:
        backbones (Sequence[str]): timm backbones, one member each. The default three work offline
            after ``reconpatch weights``. Defaults to ``DEFAULT_BACKBONES``.
        layers (Sequence[str]): Feature layers, the same names in every backbone.
            Defaults to ``("blocks.2", "blocks.4")``.
        pre_trained (bool): Load ImageNet weights. Defaults to ``True``.
        embedding_dim (int | None): As ReConPatch's, for every member. Defaults to ``None``.
        projection_dim (int): As ReConPatch's. Defaults to ``128``.
        num_steps (int | None): As ReConPatch's, per member; 0 gives the untrained ensemble, None follows
            the data. Defaults to ``None``.
        patches_per_step (int): As ReConPatch's. Defaults to ``512``.
        learning_rate (float): As ReConPatch's. Defaults to ``4e-5``.
        weight_decay (float): As ReConPatch's. Defaults to ``1e-2``.
        k (int): As ReConPatch's. Defaults to ``5``.
        alpha (float): As ReConPatch's. Defaults to ``0.5``.
        margin (float): As ReConPatch's. Defaults to ``1.0``.
        sigma (float | None): As ReConPatch's; ``None`` takes ``sigma_unit``'s default. Defaults to ``None``.
        momentum (float): As ReConPatch's. Defaults to ``0.999``.
        sigma_unit (str): As ReConPatch's. Defaults to ``"normalized"``.
        batch_sampling (str): As ReConPatch's. Defaults to ``"uniform"``.
        optimizer (str): As ReConPatch's. Defaults to ``"adamp"``.
        coreset_sampling_ratio (float): As ReConPatch's, per member. Defaults to ``0.1``.
        num_neighbors (int): As ReConPatch's. Defaults to ``9``.
        search (str): As ReConPatch's. Defaults to ``"exact"``.
        feature_memory_mb (int | None): Most megabytes of training features held in RAM by all members
            together (each gets an equal share); ``null`` never spills. Defaults to ``2048``.
        image_score (str): How an image is scored: ``members`` (the mean of the members' standardised image
            scores), ``map`` (the largest pixel of the ensemble's map) or ``member_peaks`` (the mean of the
            members' largest map pixels, each standardised by its training images'). Defaults to ``"members"``.
        pre_processor (nn.Module | bool): Pre-processor instance or flag. Defaults to ``True``.
        post_processor (nn.Module | bool): Post-processor instance or flag. Defaults to ``True``.
        evaluator (Evaluator | bool): Evaluator instance or flag. Defaults to ``True``.
        visualizer (Visualizer | bool): Visualizer instance or flag. Defaults to ``True``.

    Raises:
        ValueError: If a setting is out of range, or ``backbones`` is empty or repeats a name.
    """

    def __init__(
        self,
        backbones: Sequence[str] = DEFAULT_BACKBONES,
        layers: Sequence[str] = ("blocks.2", "blocks.4"),
        pre_trained: bool = True,
        embedding_dim: int | None = None,
        projection_dim: int = 128,
        num_steps: int | None = None,
        patches_per_step: int = 512,
        learning_rate: float = 4e-5,
        weight_decay: float = 1e-2,
        k: int = 5,
        alpha: float = 0.5,
        margin: float = 1.0,
        sigma: float | None = None,
        momentum: float = 0.999,
        sigma_unit: str = "normalized",
        batch_sampling: str = "uniform",
        optimizer: str = "adamp",
        coreset_sampling_ratio: float = 0.1,
        num_neighbors: int = 9,
        search: str = "exact",
        feature_memory_mb: int | None = 2048,
        image_score: str = "members",
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        settings = dict(locals())
        validate_hyperparameters(settings)
        names = list(backbones)
        _check_range(
            "backbones", names, bool(names) and len(set(names)) == len(names), "a non-empty list of distinct backbones"
        )
        check_image_score(image_score, ENSEMBLE_IMAGE_SCORES, "ReConPatchEnsemble", IMAGE_SCORES, "ReConPatch")
        # Skip ReConPatch.__init__ (one backbone); MemoryBankMixin and AnomalibModule set up the rest.
        super(ReConPatch, self).__init__(
            pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator, visualizer=visualizer
        )
        shared = {
            name: settings[name]
            for name in (
                "layers", "pre_trained", "embedding_dim", "projection_dim", "num_steps", "patches_per_step",
                "learning_rate", "weight_decay", "k", "alpha", "margin", "sigma", "momentum", "sigma_unit",
                "batch_sampling", "optimizer", "coreset_sampling_ratio", "num_neighbors", "search",
            )
        }  # fmt: skip
        share = None if feature_memory_mb is None else feature_memory_mb // len(names)
        self.members = [EnsembleMember(backbone=name, feature_memory_mb=share, **shared) for name in names]
        self.model: ReConPatchEnsembleModel = ReConPatchEnsembleModel(
            [member.model for member in self.members], image_score
        )
        self.k = k
        self.fit_timings: dict[str, float] = {}
        self._epoch_start = 0.0

    def on_train_epoch_start(self) -> None:
        """Start the feature-extraction clock and clear each member's features of an earlier fit."""
        for member in self.members:
            member.to(self.device)
            member.on_train_epoch_start()
        self._epoch_start = time.perf_counter()

    def training_step(self, batch: Batch, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Let every member run its backbone on the batch and keep its patch features.

        Args:
            batch (Batch): Training batch; only its images are read.
            *args: Unused.
            **kwargs: Unused.

        Returns:
            torch.Tensor: A dummy zero loss that requires grad, as Lightning expects from a training step.
        """
        stop_if_terminated(self._trainer)
        for member in self.members:
            member.training_step(batch, *args, **kwargs)
        return torch.tensor(0.0, requires_grad=True, device=self.device)

    def fit(self) -> None:
        """Fit every member in turn, then keep each member's training-score statistics for standardising.

        ``fit_timings`` sums the members' representation and coreset times.
        """
        features_s = time.perf_counter() - self._epoch_start
        totals = {"representation_s": 0.0, "coreset_s": 0.0}
        for index, member in enumerate(self.members):
            member._trainer = self._trainer
            member.fit()
            for name in totals:
                totals[name] += member.fit_timings[name]
            with torch.no_grad():
                self.model.score_mean[index], self.model.score_std[index] = member.score_statistics
                self.model.map_mean[index], self.model.map_std[index] = member.map_statistics
                self.model.peak_mean[index], self.model.peak_std[index] = member.peak_statistics
        self.fit_timings = {"features_s": features_s, **totals}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the backbones and layers apart from ``hyper_parameters``.

        Args:
            checkpoint (dict[str, Any]): Checkpoint being saved, updated in place.
        """
        AnomalibModule.on_save_checkpoint(self, checkpoint)
        checkpoint[ENSEMBLE_KEY] = self.architecture()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another model, other backbones or another image score, saying how to load it.

        Args:
            checkpoint (dict[str, Any]): Checkpoint being loaded.

        Raises:
            ValueError: If the checkpoint is not an ensemble's, or its backbones, layers or image score differ.
        """
        saved = checkpoint.get(ENSEMBLE_KEY)
        if saved is None:
            msg = (
                "This checkpoint is not a ReConPatchEnsemble's: load it with the model that wrote it "
                "(for a single backbone, ReConPatch.load_from_checkpoint or --model ReConPatch)."
            )
            raise ValueError(msg)
        own = self.architecture()
        if saved != own:
            msg = (
                f"This checkpoint was trained with backbones={saved['backbones']}, layers={saved['layers']}, "
                f"embedding_dim={saved['embedding_dim']}, but the model has backbones={own['backbones']}, "
                f"layers={own['layers']}, embedding_dim={own['embedding_dim']}: build it as trained "
                "(or call ReConPatchEnsemble.load_from_checkpoint(path) without overriding them)."
            )
            raise ValueError(msg)
        check_image_score_matches(self, checkpoint, before="members")
        # Checkpoints from before ``member_peaks`` lack its statistics, which their image scores never read.
        state = checkpoint.get("state_dict", {})
        for name in ("peak_mean", "peak_std"):
            state.setdefault(f"model.{name}", getattr(self.model, name).clone())
        AnomalibModule.on_load_checkpoint(self, checkpoint)

    def architecture(self) -> dict[str, Any]:
        """Describe what a checkpoint must match: backbones, layers and embedding size.

        Returns:
            dict[str, Any]: ``backbones`` and ``layers`` as lists, and ``embedding_dim``.
        """
        return {
            "backbones": [str(name) for name in self.hparams["backbones"]],
            "layers": [str(layer) for layer in self.hparams["layers"]],
            "embedding_dim": self.hparams["embedding_dim"],
        }


# ``anomalib benchmark`` resolves a bare ``class_path`` as an attribute of anomalib.models.
anomalib_models.ReConPatchEnsemble = ReConPatchEnsemble
