"""ReConPatch as an anomalib model (Hyun et al., WACV 2024).

ReConPatch learns, on the normal images alone, a linear representation ``f`` of PatchCore's patch
features in which similar patches sit closer, and scores test patches by their distance to a
coreset memory bank of ``f(features)``.

Training has three phases inside one Lightning epoch:

1. ``training_step`` runs the frozen backbone once over every training image and keeps the
   PatchCore patch features (the backbone never runs again).
2. ``fit`` trains the linear representation ``f`` and projection ``g`` on random mini-batches of
   those patches with the relaxed contrastive loss; pseudo-labels come from EMA copies of f and g.
3. ``fit`` then builds the memory bank: a greedy k-center coreset of ``f(patch features)``, and folds
   the bank's mean and a random rotation into ``f`` and the bank (same distances, less FP32 cancellation).

Paper: https://arxiv.org/abs/2305.16713

Example:
    >>> from anomalib.data import MVTecAD
    >>> from anomalib.engine import Engine
    >>> from anomalib_reconpatch.reconpatch import ReConPatch
    >>> datamodule = MVTecAD(root="datasets/MVTecAD", category="bottle")  # doctest: +SKIP
    >>> model = ReConPatch(backbone="tf_efficientnet_lite0", layers=["blocks.2", "blocks.4"])  # doctest: +SKIP
    >>> engine = Engine()  # doctest: +SKIP
    >>> engine.fit(model=model, datamodule=datamodule)  # doctest: +SKIP
    >>> predictions = engine.predict(model=model, datamodule=datamodule)  # doctest: +SKIP

See Also:
    - :class:`anomalib_reconpatch.reconpatch.torch_model.ReConPatchModel`: the torch model, whose
      eval forward is what exports trace.
    - ``docs/design/``: one page per design decision, with its evidence.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anomalib.models as anomalib_models
import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.deploy import CompressionType
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule, MemoryBankMixin
from anomalib.models.image.patchcore import Patchcore
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch import Callback
from lightning.pytorch.utilities.types import STEP_OUTPUT
from timm.optim import AdamP
from torch import nn

from ..components.coreset import FastKCenterGreedy
from ..components.distributed import (
    all_sum,
    average_gradients,
    broadcast_parameters,
    coreset_agreement,
    first_sightings,
    shard_datamodule,
    world,
)
from ..components.failures import (
    CHECKPOINT_READ_ERRORS,
    ExplainFailures,
    checkpoint_message,
    checkpoint_problem,
    warn_skipped_links,
)
from ..components.metrics import SyncSafePostProcessor, default_evaluator
from ..components.preflight import preflight
from ..components.progress import fit_progress, stop_if_terminated
from ..components.resize import ExactExportPreProcessor
from ..components.spill import FeatureSpill, SpilledFeatures, remove_orphaned_spills
from ..components.threads import ThreadChooser, single_threaded, split_over_threads, torch_threads
from .loss import RelaxedContrastiveLoss
from .quantize import quantize_on_training_images
from .sampling import NEIGHBOR_POOL, neighbor_groups
from .similarity import DEFAULT_SIGMA, pseudo_labels
from .torch_model import ENSEMBLE_IMAGE_SCORES, IMAGE_SCORES, ReConPatchModel, ema_update, ieee_float32
from .validation import (
    ARCHITECTURE_KEY,
    architecture,
    check_checkpoint_matches,
    check_image_score,
    check_image_score_matches,
    check_precision,
    check_training_size,
    validate_hyperparameters,
)

logger = logging.getLogger(__name__)

REPRESENTATION_EPOCHS = 2.4
"""Passes over the training patches that representation training makes by default, at the default learning
rate 4e-5: AdamP's steps have a nearly fixed size, so ``f`` moves about as far as in 9.6 passes at 1e-5 (the
paper reimplementations' rate), at a quarter of the cost; level with that recipe on three real data sets
(``docs/design/training-analysis.md``)."""

MAX_REPRESENTATION_STEPS = 20_000
"""Cap of the default step count, so that a very large data set does not train for hours (about 9 minutes
at 26 ms a step); beyond it the coreset, not training, is what grows with the data."""


def representation_steps(num_patches: int, patches_per_step: int, num_steps: int | None) -> int:
    """Optimizer steps of representation training: ``num_steps`` when given, else ``REPRESENTATION_EPOCHS`` passes.

    Following the data keeps small data sets from paying a large data set's price: 60 images (61,440
    patches at 256 px) train for 288 steps, 209 images for 1,004 and five images for 24.

    Args:
        num_patches (int): Training patches.
        patches_per_step (int): Patches per step.
        num_steps (int | None): An explicit step count, which wins; None follows the data.

    Returns:
        int: ``num_steps``, or ``ceil(REPRESENTATION_EPOCHS * num_patches / patches_per_step)`` capped at
        ``MAX_REPRESENTATION_STEPS`` (at least 1).

    Example:
        >>> representation_steps(214_016, 512, None), representation_steps(61_440, 512, None)
        (1004, 288)
        >>> representation_steps(61_440, 512, 300)
        300
    """
    if num_steps is not None:
        return num_steps
    return max(1, min(MAX_REPRESENTATION_STEPS, math.ceil(REPRESENTATION_EPOCHS * num_patches / patches_per_step)))


REPRESENTATION_THREADS: int | None = None
"""Threads for representation training: None times all threads against one as training runs and keeps
the faster (:class:`~anomalib_reconpatch.components.threads.ThreadChooser`); a number fixes the count.
One thread runs the next batch's labels on a second thread beside each step wherever torch has more
than one thread to give."""


ONNX_OPSET = 18
"""The opset that torch's ONNX exporter writes. anomalib asks for 14, and the conversion down fails on ``Pad``
with a logged traceback, leaving the model at 18 anyway; asking for 18 writes the same graph without it."""

NON_FINITE = "The backbone produced NaN or inf patch features: check the training images and normalisation."


@dataclass(frozen=True)
class RepresentationStep:
    """What one step of :meth:`ReConPatch.train_representation` saw, before its update.

    Attributes:
        step (int): Zero-based step index.
        batch (torch.Tensor): The ``B x D`` patch features of the step.
        weights (torch.Tensor): Their ``B x B`` pseudo-labels from the target networks as they were before
            the previous step's EMA move.
        loss (float): The online networks' loss on them.
        online_f (nn.Module): The representation being trained.
        online_g (nn.Module): The projection being trained.
        target_f (nn.Module): The EMA copy of ``f`` at the step's start, which labels the next batch (this
            batch's labels came from it one EMA move earlier).
        target_g (nn.Module): The EMA copy of ``g``, likewise.
    """

    step: int
    batch: torch.Tensor
    weights: torch.Tensor
    loss: float
    online_f: nn.Module
    online_g: nn.Module
    target_f: nn.Module
    target_g: nn.Module


@dataclass
class RepresentationNetworks:
    """What representation training's steps read and update (:meth:`ReConPatch.representation_networks`).

    Attributes:
        online_f (nn.Linear): The representation being trained (the model's own).
        online_g (nn.Linear): The projection being trained (discarded after training).
        target_f (nn.Linear): The EMA copy of ``f``, which computes the pseudo-labels.
        target_g (nn.Linear): The EMA copy of ``g``.
        optimizer (torch.optim.Optimizer): The online networks' optimizer.
        scheduler (torch.optim.lr_scheduler.LRScheduler): Its learning-rate schedule.
    """

    online_f: nn.Linear
    online_g: nn.Linear
    target_f: nn.Linear
    target_g: nn.Linear
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler

    def modules(self) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
        """The online ``f`` and ``g``, then the target ``f`` and ``g``."""
        return self.online_f, self.online_g, self.target_f, self.target_g

    def parameters(self) -> list[nn.Parameter]:
        """The online networks' parameters: those the optimizer updates."""
        return [parameter for group in self.optimizer.param_groups for parameter in group["params"]]


class ReConPatch(MemoryBankMixin, AnomalibModule):
    """ReConPatch: contrastive patch representation learning on top of PatchCore features.

    A frozen backbone's patch features are mapped by a linear representation ``f``, trained with the
    relaxed contrastive loss on pseudo-labels from EMA copies of ``f`` and a projection ``g``; a
    coreset of ``f(features)`` is the memory bank, and a test patch scores its distance to the nearest
    bank row. All settings are checked at construction, before the backbone is built.

    Args:
        backbone (str): timm backbone (frozen). ``tf_efficientnet_lite0`` works offline after
            ``reconpatch weights``. Defaults to ``"wide_resnet50_2"``.
        layers (Sequence[str]): Backbone layers whose features are concatenated.
            Defaults to ``("layer2", "layer3")``.
        pre_trained (bool): Load ImageNet weights for the backbone. Defaults to ``True``.
        embedding_dim (int | None): Adaptive-average-pool patch features to this size (the paper uses
            1024); None keeps all. Defaults to ``None``.
        projection_dim (int): Output size of the projection ``g``, used only by the loss. Defaults to ``128``.
        num_steps (int | None): Optimizer steps of representation training (0 gives PatchCore in ``f``'s
            identity space); None follows the data, ``REPRESENTATION_EPOCHS`` passes over the training
            patches (see :func:`representation_steps`). Defaults to ``None``.
        patches_per_step (int): Patches in each training mini-batch, drawn from all training images; more
            than ``k``. Defaults to ``512``.
        learning_rate (float): The optimizer's learning rate, cosine-annealed to 0 over the steps.
            Defaults to ``4e-5``.
        weight_decay (float): The optimizer's decoupled weight decay. Defaults to ``1e-2``.
        k (int): Neighbourhood size of the contextual similarity and of the pairwise kernel's unit.
            Defaults to ``5``.
        alpha (float): Weight of the pairwise similarity; ``1 - alpha`` goes to the contextual one.
            Defaults to ``0.5``.
        margin (float): Margin ``m`` of the relaxed contrastive loss, on relative distances.
            Defaults to ``1.0``.
        sigma (float | None): Gaussian kernel width of the pairwise similarity, in the unit that
            ``sigma_unit`` names; ``None`` takes that unit's measured width: 0.1 for ``normalized``, 1 for
            ``knn`` (see ``docs/design/sigma-units.md``). Defaults to ``None``.
        momentum (float): EMA momentum ``gamma`` of the target networks. Defaults to ``0.999``.
        sigma_unit (str): Unit of ``sigma``: ``normalized`` (absolute, on unit-length target
            projections, as STML's code does) or ``knn`` (the batch's mean squared distance to the k-th
            neighbour). Defaults to ``"normalized"``.
        batch_sampling (str): How training batches are drawn: ``uniform`` (independent patches) or
            ``neighbors`` (groups of ``k`` nearest patches, as STML's code does; see
            :mod:`~anomalib_reconpatch.reconpatch.sampling`). Defaults to ``"uniform"``.
        optimizer (str): ``adamw`` (torch's AdamW) or ``adamp`` (timm's AdamP, which the paper's
            reimplementations use; it removes the radial part of the update of scale-invariant weights).
            Defaults to ``"adamp"``.
        coreset_sampling_ratio (float): Fraction of training patches kept in the memory bank.
            Defaults to ``0.1``.
        num_neighbors (int): Support size of PatchCore's image-score re-weighting. Defaults to ``9``.
        image_score (str): How an image is scored: ``map`` (the largest pixel of the anomaly map, so a
            patch counts with its neighbours: higher image AUROC on KolektorSDD, level or higher on
            bottle and MPDD; see ``docs/design/image-score.md``) or ``patches`` (PatchCore's: the
            largest patch distance, re-weighted). Defaults to ``"map"``.
        search (str): Nearest-neighbour search of the Python inference path: ``exact`` (torch) or an
            approximate faiss index, ``hnsw`` or ``ivf`` (built from the bank on first use, never saved,
            each image's top patches refined exactly). Exported models always use the exact search.
            Defaults to ``"exact"``.
        feature_memory_mb (int | None): Most megabytes of training patch features held in RAM; beyond it
            they are appended to a temporary memory-mapped file (under ``TMPDIR``, removed after fit). The
            default, 2048, keeps usual data sets in RAM (MVTec AD bottle with tf_efficientnet_lite0 needs
            130 MB) and bounds larger ones instead of failing; ``null`` never spills (see
            ``docs/design/feature-spill.md``). Defaults to ``2048``.
        pre_processor (nn.Module | bool): Pre-processor instance or flag; ``True`` builds
            :meth:`configure_pre_processor`'s. Defaults to ``True``.
        post_processor (nn.Module | bool): Post-processor instance or flag. Defaults to ``True``.
        evaluator (Evaluator | bool): Evaluator instance or flag. Defaults to ``True``.
        visualizer (Visualizer | bool): Visualizer instance or flag. Defaults to ``True``.

    Raises:
        ValueError: If a setting is out of range; the message names it and the range expected.

    Example:
        >>> from anomalib.data import MVTecAD
        >>> from anomalib.engine import Engine
        >>> from anomalib_reconpatch.reconpatch import ReConPatch
        >>> datamodule = MVTecAD(root="datasets/MVTecAD", category="bottle")  # doctest: +SKIP
        >>> model = ReConPatch(  # doctest: +SKIP
        ...     backbone="tf_efficientnet_lite0",
        ...     layers=["blocks.2", "blocks.4"],
        ...     coreset_sampling_ratio=0.1,
        ... )
        >>> engine = Engine()  # doctest: +SKIP
        >>> engine.fit(model=model, datamodule=datamodule)  # doctest: +SKIP
        >>> engine.test(model=model, datamodule=datamodule)  # doctest: +SKIP

        Export for OpenVINO, INT8 in the bank search only, calibrated on the training images:

        >>> from anomalib.deploy import CompressionType
        >>> model.to_openvino(  # doctest: +SKIP
        ...     "results/export", compression_type=CompressionType.INT8_PTQ, datamodule=datamodule
        ... )
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] = ("layer2", "layer3"),
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
        image_score: str = "map",
        search: str = "exact",
        feature_memory_mb: int | None = 2048,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        validate_hyperparameters(locals())
        check_image_score(image_score, IMAGE_SCORES, "ReConPatch", ENSEMBLE_IMAGE_SCORES, "ReConPatchEnsemble")
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.model: ReConPatchModel = ReConPatchModel(
            backbone=backbone,
            layers=layers,
            pre_trained=pre_trained,
            embedding_dim=embedding_dim,
            num_neighbors=num_neighbors,
            search=search,
            image_score=image_score,
        )
        self.feature_memory_mb = feature_memory_mb
        self.projection_dim = projection_dim
        self.num_steps = num_steps
        self.patches_per_step = patches_per_step
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.k = k
        self.alpha = alpha
        self.sigma = DEFAULT_SIGMA[sigma_unit] if sigma is None else sigma
        self.momentum = momentum
        self.sigma_unit = sigma_unit
        self.batch_sampling = batch_sampling
        self.optimizer = optimizer
        self.coreset_sampling_ratio = coreset_sampling_ratio
        self.loss = RelaxedContrastiveLoss(margin)
        self.feature_store: list[torch.Tensor] = []
        self.feature_spill: FeatureSpill | None = None
        self.spilled_rows = 0
        self.fit_timings: dict[str, float] = {}
        self._epoch_start = 0.0
        self._seen_paths: set[str] = set()

    @classmethod
    def configure_pre_processor(
        cls,
        image_size: tuple[int, int] | None = None,
        center_crop_size: tuple[int, int] | None = None,
    ) -> PreProcessor:
        """Configure the pre-processor as PatchCore does: resize, optional centre crop, ImageNet normalisation.

        The exported graph resizes exactly as training does (``components.resize``): anomalib's own export
        drops the resize's antialiasing, which moves the scores of every image larger than the input size.

        Args:
            image_size (tuple[int, int] | None): ``(height, width)`` to resize to; None gives 256 x 256.
                Defaults to ``None``.
            center_crop_size (tuple[int, int] | None): ``(height, width)`` of the centre crop, or None for
                no crop. Defaults to ``None``.

        Returns:
            PreProcessor: PatchCore's pre-processor, exported with an exact resize.
        """
        return ExactExportPreProcessor(Patchcore.configure_pre_processor(image_size, center_crop_size).transform)

    @staticmethod
    def configure_evaluator() -> Evaluator:
        """Configure anomalib's default test metrics, with an AUROC that is NaN, with the reason, when undefined.

        On a test set with one class only (no defective image, or no defective pixel) anomalib's AUROC
        prints 0.0; there is no such area, so this one says what the test set lacks.

        Returns:
            Evaluator: Image and pixel AUROC and F1, named as anomalib names them.
        """
        return default_evaluator()

    def configure_callbacks(self) -> list[Callback]:
        """Add :class:`ExplainFailures` to anomalib's component callbacks.

        It names the files behind failures that happen before the model's own checks: broken links and
        unpaired masks in the data folders, and empty or truncated checkpoints.

        Returns:
            list[Callback]: The callbacks Lightning attaches for this model.
        """
        callbacks = super().configure_callbacks()
        return [*(callbacks if isinstance(callbacks, Sequence) else [callbacks]), ExplainFailures()]

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path, *args: Any, **kwargs: Any) -> ReConPatch:
        """Load a checkpoint as Lightning does; an empty or truncated file also gets a note naming it.

        Args:
            checkpoint_path (str | Path): The checkpoint file.
            *args: Passed to Lightning's ``load_from_checkpoint``.
            **kwargs: Passed to Lightning's ``load_from_checkpoint``.

        Returns:
            ReConPatch: The loaded model.
        """
        try:
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        except CHECKPOINT_READ_ERRORS as error:
            reason = checkpoint_problem(Path(checkpoint_path)) if isinstance(checkpoint_path, str | Path) else None
            if reason is not None:
                error.add_note(checkpoint_message(Path(checkpoint_path), reason))
            raise

    @staticmethod
    def configure_optimizers() -> None:
        """Configure no Lightning-managed optimizer: ``fit`` trains f and g on cached features.

        See :meth:`configure_representation_optimizer` for the optimizer it uses.
        """
        return

    def configure_representation_optimizer(
        self, parameters: list[nn.Parameter], steps: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """Build the representation training's optimizer (``optimizer``) with a cosine schedule over ``steps``.

        Args:
            parameters (list[nn.Parameter]): Parameters of ``f`` and ``g``.
            steps (int): The training's step count (:func:`representation_steps`).

        Returns:
            tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]: The optimizer, with
            ``learning_rate`` and ``weight_decay``, and its cosine-annealing schedule.
        """
        optimizer_class = AdamP if self.optimizer == "adamp" else torch.optim.AdamW
        optimizer = optimizer_class(parameters, lr=self.learning_rate, weight_decay=self.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
        return optimizer, scheduler

    def on_train_epoch_start(self) -> None:
        """Start the feature-extraction clock and drop features of an earlier, interrupted fit.

        Also removes spill files that killed runs left in ``TMPDIR`` (:func:`remove_orphaned_spills`).
        """
        remove_orphaned_spills()
        self._seen_paths.clear()
        self.feature_store.clear()
        if self.feature_spill is not None:
            self.feature_spill.close()
            self.feature_spill = None
        self._epoch_start = time.perf_counter()

    def training_step(self, batch: Batch, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Run the frozen backbone once on the batch and keep its patch features for ``fit``.

        Features stay in ``feature_store`` until they would exceed ``feature_memory_mb``; from then on
        all of them go to a ``FeatureSpill`` file (see ``docs/design/feature-spill.md``).

        Args:
            batch (Batch): Training batch; only its images are read.
            *args: Unused (Lightning's batch index).
            **kwargs: Unused.

        Returns:
            torch.Tensor: A dummy zero loss that requires grad, as Lightning expects from a training step.

        Raises:
            FloatingPointError: If spilled features hold NaN or inf (in-memory ones are checked in ``fit``).
        """
        del args, kwargs
        stop_if_terminated(self._trainer)  # Lightning alone would finish the epoch and the fit first
        images = self.new_images(batch)
        if len(images):
            self.store_features(split_over_threads(self.model, images))
        return torch.tensor(0.0, requires_grad=True, device=self.device)

    def on_train_batch_end(self, outputs: STEP_OUTPUT, batch: Batch, batch_idx: int) -> None:
        """Fit right after the last training batch, before Lightning starts the validation loader.

        anomalib's memory-bank models fit in ``on_validation_start``, which runs after the validation
        loader's workers have started decoding test images, which on a small CPU then compete with
        representation training for the cores. ``on_validation_start`` still fits when Lightning cannot
        tell the last batch.

        Args:
            outputs (STEP_OUTPUT): Unused.
            batch (Batch): Unused.
            batch_idx (int): Unused.
        """
        del outputs, batch, batch_idx
        if self.trainer.is_last_batch and not self._is_fitted:
            self.fit()
            self._is_fitted = torch.tensor([True], device=self.device)

    def new_images(self, batch: Batch) -> torch.Tensor:
        """The batch's images that this fit has not seen yet, so that no image counts twice.

        Under DDP a rank's part repeats a few images to run as many batches as the others
        (``components.distributed.Shard``).

        Args:
            batch (Batch): Training batch.

        Returns:
            torch.Tensor: The images, without those seen before in this epoch.
        """
        keep = first_sightings(getattr(batch, "image_path", None), self._seen_paths)
        return batch.image if keep is None else batch.image[torch.tensor(keep, device=batch.image.device)]

    def store_features(self, rows: torch.Tensor) -> None:
        """Keep a batch's flat patch features for ``fit``: in memory, or in the spill file past ``feature_memory_mb``.

        Args:
            rows (torch.Tensor): ``R x D`` patch features of one training batch.

        Raises:
            FloatingPointError: If spilled features hold NaN or inf (in-memory ones are checked in ``fit``).
        """
        rows = rows.detach().cpu()
        budget = self.feature_memory_mb
        if self.feature_spill is None and budget is not None:
            held = sum(stored.nbytes for stored in self.feature_store) + rows.nbytes
            if held > budget * 2**20:
                self.feature_spill = FeatureSpill(rows.shape[1])
                logger.info("ReConPatch: features exceed %s MB, spilling to %s", budget, self.feature_spill.path)
                for stored in self.feature_store:
                    self.feature_spill.append(stored)
                self.feature_store.clear()
        if self.feature_spill is None:
            self.feature_store.append(rows)
        else:
            if not torch.isfinite(rows).all():
                raise FloatingPointError(NON_FINITE)
            self.feature_spill.append(rows)

    def fit(self) -> None:
        """Train the representation on the stored patch features, then build the coreset memory bank.

        Spilled features are read from their file (mini-batches, then the embedding pass in chunks) and
        the file is deleted at the end, also when training fails. The bank is then folded into its
        centred, rotated frame (see ``docs/design/bank-fold.md``), and the phases' durations are kept in
        ``fit_timings``. On a GPU it all runs in full float32 (:func:`ieee_float32`).

        Raises:
            ValueError: If no training features were stored, or there are no more than ``k`` of them.
            FloatingPointError: If the features hold NaN or inf, or training diverges.
        """
        features_s = time.perf_counter() - self._epoch_start
        with ieee_float32(self.device):  # a GPU fit's bank as the float32 export computes it
            spill, self.feature_spill = self.feature_spill, None
            try:
                features: torch.Tensor | SpilledFeatures
                if spill is not None:
                    features = spill.features()
                elif self.feature_store:
                    features = torch.cat(self.feature_store)
                    self.feature_store.clear()
                    if not torch.isfinite(features).all():
                        raise FloatingPointError(NON_FINITE)
                else:
                    msg = "ReConPatch has no training features: the training dataloader yielded no images."
                    raise ValueError(msg)
                self.spilled_rows = len(features) if spill is not None else 0
                start = time.perf_counter()
                with torch.inference_mode(False), torch.enable_grad():
                    threads = self.train_representation(features)
                representation_s = time.perf_counter() - start
                start = time.perf_counter()
                with torch.no_grad(), torch_threads():
                    if threads is not None:  # the count training just found faster, as the coreset's start
                        torch.set_num_threads(threads)
                    embedded = torch.cat([self.model.embed(chunk.to(self.device)) for chunk in features.split(65536)])
                del features
            finally:
                if spill is not None:
                    spill.close()
            sampler = FastKCenterGreedy(
                embedded, self.coreset_sampling_ratio, agreement=coreset_agreement(), threads=threads
            )
            with fit_progress(self._trainer, "ReConPatch coreset", sampler.coreset_size) as update:
                self.model.memory_bank = sampler.sample_coreset(progress=update)
            self.on_memory_bank(embedded)
            self.model.fold_bank_frame()
        self.fit_timings = {
            "features_s": features_s,
            "representation_s": representation_s,
            "coreset_s": time.perf_counter() - start,
        }
        logger.info("ReConPatch fit: %s, memory bank %s", self.fit_timings, tuple(self.model.memory_bank.shape))

    def on_memory_bank(self, embedded: torch.Tensor) -> None:
        """Called by ``fit`` once the memory bank is chosen, before its fold, with every embedded training patch.

        Does nothing here; the members of :class:`~anomalib_reconpatch.reconpatch.ensemble.ReConPatchEnsemble`
        score their training images with it.

        Args:
            embedded (torch.Tensor): ``N x D`` training patches ``f(x)``, in the bank's frame, image by image.
        """

    def train_representation(
        self,
        features: torch.Tensor | SpilledFeatures,
        on_step: Callable[[RepresentationStep], None] | None = None,
    ) -> int | None:
        """Train ``f`` (kept) and ``g`` (discarded) with the relaxed contrastive loss on random patch mini-batches.

        Each step takes the online networks' loss (:meth:`representation_loss`) on a batch of
        ``patches_per_step`` patches (:meth:`draw_batch`; ``batch_sampling``: independently, with
        replacement, or in nearest-neighbour groups) against its pseudo-labels, takes one optimizer step
        (:meth:`representation_update`) and then moves the EMA targets by ``momentum``
        (:meth:`representation_ema`). The next batch and its pseudo-labels (:meth:`representation_labels`)
        come from the targets as they are before that move, one step behind the online networks, so that
        on a busy CPU they are computed on a second thread beside the step's own work, each thread
        meeting no barrier but the step's end (``docs/design/busy-cpu.md``); a quiet CPU computes the
        same numbers in turn on all threads, and which of the two runs a step never changes the result.
        The parts are methods so that ``benchmarks/step_phases.py`` can time the very step the model
        runs. ``f`` is frozen at the end.

        Args:
            features (torch.Tensor | SpilledFeatures): ``N x D`` training patch features, in memory or
                spilled to a file.
            on_step (Callable[[RepresentationStep], None] | None): Called at every step, after the loss and
                before the update, with what the step saw; for diagnostics (``benchmarks/training_trace.py``).
                It must not draw random numbers, or the training changes. Defaults to ``None``.

        Returns:
            int | None: The thread count that the training's last probe found faster on this CPU, which the
            embedding and the coreset start on; None when training was too short to probe, or ran on a GPU,
            whose steps say nothing of the CPU's threads.

        Raises:
            ValueError: If ``N`` is not more than ``k``.
            FloatingPointError: If the loss becomes NaN or inf.
        """
        n = features.shape[0]
        if n <= self.k:
            msg = f"ReConPatch needs more than k={self.k} training patches, got {n}: add images or lower --model.k."
            raise ValueError(msg)
        ranks = world()[1]
        total = int(all_sum(torch.tensor([n]))[0])
        steps = representation_steps(total, self.patches_per_step * ranks, self.num_steps)
        networks = self.representation_networks(steps)
        batch_size = min(self.patches_per_step, n)
        tick = time.perf_counter()
        chooser = ThreadChooser(torch.get_num_threads())
        # a second thread for the next step's labels only where there is a second core to run it
        side_by_side = chooser.all_threads > 1 and self.device.type == "cpu"
        # the pool is left (its last task awaited) before torch's thread count is restored
        with (
            torch_threads(),
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="reconpatch-labels") as labeller,
            fit_progress(self._trainer, "ReConPatch representation", steps) as update,
        ):
            for step in range(steps):
                threads = REPRESENTATION_THREADS or chooser.threads(step)
                if threads != torch.get_num_threads():
                    torch.set_num_threads(threads)
                step_start, cpu_start = time.perf_counter(), time.thread_time()
                if step == 0:
                    x = self.draw_batch(features, batch_size, networks.target_f)
                    weights = self.representation_labels(networks, x)
                following = self.draw_batch(features, batch_size, networks.target_f) if step + 1 < steps else None
                labels = (
                    labeller.submit(single_threaded, self.representation_labels, networks, following)
                    if following is not None and threads == 1 and side_by_side
                    else None
                )
                loss = self.representation_loss(networks, x, weights)
                value = loss.item() if ranks == 1 else all_sum(loss.detach()).item() / ranks
                if not math.isfinite(value):
                    msg = (
                        f"ReConPatch representation training diverged at step {step + 1}/{steps} "
                        f"(loss {value}): lower --model.learning_rate or check the training images."
                    )
                    raise FloatingPointError(msg)
                if on_step is not None:
                    on_step(RepresentationStep(step, x, weights, value, *networks.modules()))
                self.representation_update(networks, loss)
                if following is not None:
                    weights = self.representation_labels(networks, following) if labels is None else labels.result()
                    x = following
                self.representation_ema(networks)
                chooser.record(step, time.perf_counter() - step_start, time.thread_time() - cpu_start)
                update(step + 1, loss=value)
                if time.perf_counter() - tick > 10 or step + 1 == steps:
                    logger.info("ReConPatch representation step %d/%d, loss %.4f", step + 1, steps, value)
                    tick = time.perf_counter()
        networks.online_f.requires_grad_(False)
        if self.device.type != "cpu":
            return None
        return REPRESENTATION_THREADS or chooser.verdict

    def representation_networks(self, steps: int) -> RepresentationNetworks:
        """The online ``f`` (the model's own) and a new ``g``, their EMA targets, optimizer and schedule.

        Every rank starts from rank 0's ``g`` (and ``f``), whose random initialisations may differ.

        Args:
            steps (int): The training's step count, over which the learning rate is annealed.

        Returns:
            RepresentationNetworks: What a training step reads and updates.
        """
        online_f = self.model.representation
        online_g = nn.Linear(online_f.out_features, self.projection_dim).to(self.device)
        parameters = [*online_f.parameters(), *online_g.parameters()]
        broadcast_parameters(parameters)
        optimizer, scheduler = self.configure_representation_optimizer(parameters, steps)
        return RepresentationNetworks(
            online_f=online_f,
            online_g=online_g,
            target_f=copy.deepcopy(online_f).requires_grad_(False),
            target_g=copy.deepcopy(online_g).requires_grad_(False),
            optimizer=optimizer,
            scheduler=scheduler,
        )

    @torch.no_grad()
    def representation_labels(self, networks: RepresentationNetworks, x: torch.Tensor) -> torch.Tensor:
        """A batch's pseudo-labels, from the target networks (no gradient).

        Args:
            networks (RepresentationNetworks): The training's networks.
            x (torch.Tensor): ``B x D`` patch features.

        Returns:
            torch.Tensor: ``B x B`` pseudo-labels.
        """
        z_target = networks.target_g(networks.target_f(x))
        return pseudo_labels(z_target, self.k, self.alpha, self.sigma, self.sigma_unit)

    def representation_loss(
        self, networks: RepresentationNetworks, x: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """The online networks' relaxed contrastive loss on a batch, with its graph for the update.

        Args:
            networks (RepresentationNetworks): The training's networks.
            x (torch.Tensor): ``B x D`` patch features.
            weights (torch.Tensor): Their ``B x B`` pseudo-labels.

        Returns:
            torch.Tensor: The scalar loss.
        """
        return self.loss(networks.online_g(networks.online_f(x)), weights)

    def representation_update(self, networks: RepresentationNetworks, loss: torch.Tensor) -> None:
        """One optimizer step on the online networks, with the gradients averaged over ranks.

        Args:
            networks (RepresentationNetworks): The training's networks.
            loss (torch.Tensor): The step's loss, from :meth:`representation_loss`.
        """
        networks.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(networks.parameters())
        networks.optimizer.step()
        networks.scheduler.step()

    def representation_ema(self, networks: RepresentationNetworks) -> None:
        """Move the target networks towards the online ones by ``1 - momentum``: the step's last act.

        Args:
            networks (RepresentationNetworks): The training's networks.
        """
        ema_update(networks.target_f, networks.online_f, self.momentum)
        ema_update(networks.target_g, networks.online_g, self.momentum)

    def draw_batch(
        self, features: torch.Tensor | SpilledFeatures, batch_size: int, target_f: nn.Module
    ) -> torch.Tensor:
        """Draw one training batch of patch features, as ``batch_sampling`` says.

        Args:
            features (torch.Tensor | SpilledFeatures): ``N x D`` training patch features.
            batch_size (int): Patches in the batch.
            target_f (nn.Module): The EMA representation, in whose space ``neighbors`` groups patches.

        Returns:
            torch.Tensor: ``batch_size x D`` features on the model's device.
        """
        n = features.shape[0]
        if self.batch_sampling == "uniform":
            return features[torch.randint(n, (batch_size,))].to(self.device)
        pool = features[torch.randperm(n)[:NEIGHBOR_POOL]].to(self.device)
        with torch.no_grad():
            return pool[neighbor_groups(target_f(pool), batch_size, self.k)]

    def setup(self, stage: str) -> None:
        """Decode every image (and mask) of the stage's splits and check the data size, before any dataloader.

        A bad file is named here, not minutes later in a dataloader worker; ``setup`` is the last hook
        before Lightning builds the dataloaders, so 16-bit images can still be read correctly (see
        ``docs/design/preflight-and-predict.md``).

        Args:
            stage (str): Lightning stage (``fit``, ``validate``, ``test`` or ``predict``).

        Raises:
            ValueError: If the trainer's precision is not float32, an image or mask cannot be read
                (``UnreadableImageError``, every such file named), 16-bit images meet augmentations other
                than resizes, or (when fitting) the training set is empty or too small for ``k`` or the
                coreset ratio.
        """
        super().setup(stage)
        if self._trainer is not None:
            check_precision(self._trainer.precision)
        scan = preflight(self, stage)
        if scan is not None and stage == "fit":
            warn_skipped_links(self.trainer.datamodule)
            check_training_size(self, self.trainer.datamodule, scan)
        if scan is not None:
            shard_datamodule(self.trainer.datamodule)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the architecture apart from ``hyper_parameters``, which loading with overrides rewrites.

        Args:
            checkpoint (dict[str, Any]): Checkpoint being saved, updated in place.
        """
        super().on_save_checkpoint(checkpoint)
        checkpoint[ARCHITECTURE_KEY] = architecture(self)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint from another backbone, layer set, feature size or image score, saying what to pass.

        Args:
            checkpoint (dict[str, Any]): Checkpoint being loaded.

        Raises:
            ValueError: If the checkpoint's architecture or image score differs from the model's.
        """
        check_checkpoint_matches(self, checkpoint)
        check_image_score_matches(self, checkpoint, before="patches")
        super().on_load_checkpoint(checkpoint)

    def validation_step(self, batch: Batch, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        """Score a batch: anomaly maps and image scores from nearest memory-bank distances.

        Args:
            batch (Batch): Validation batch.
            *args: Unused (Lightning's batch index).
            **kwargs: Unused.

        Returns:
            STEP_OUTPUT: The batch with ``pred_score`` and ``anomaly_map`` filled in.
        """
        del args, kwargs
        predictions = self.model(batch.image)
        return batch.update(**predictions._asdict())

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """Trainer settings: one pass over the images (the representation trains inside ``fit``), any devices.

        Unlike PatchCore, the devices are left to the user: with ``--trainer.devices N --trainer.strategy
        ddp`` each process reads its own part of every split (``setup`` splits them, without the repeated
        images of Lightning's sampler, so Lightning's sampler is off) and ``fit`` trains and selects the
        bank together with the others (see ``docs/design/distributed.md``).

        Returns:
            dict[str, Any]: No gradient clipping, one epoch, no sanity validation, no distributed sampler.
        """
        return {"gradient_clip_val": 0, "max_epochs": 1, "num_sanity_val_steps": 0, "use_distributed_sampler": False}

    @property
    def learning_type(self) -> LearningType:
        """Learning type: one-class, trained on normal images only.

        Returns:
            LearningType: ``LearningType.ONE_CLASS``.
        """
        return LearningType.ONE_CLASS

    @staticmethod
    def configure_post_processor() -> PostProcessor:
        """Configure anomalib's one-class post-processor (adaptive thresholds, min-max normalisation).

        Its thresholds check the validation classes in a way that also holds after a distributed sync.

        Returns:
            PostProcessor: anomalib's default post-processor, with sync-safe thresholds.
        """
        return SyncSafePostProcessor()

    def to_onnx(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        **kwargs: Any,
    ) -> Path:
        """Export to ONNX with anomalib's exporter, tracing ``ReConPatchModel.export_form``'s graph.

        This is also ``to_openvino``'s first step; the search form already set by ``to_openvino`` is kept.

        Args:
            export_root (Path | str): Output folder.
            model_file_name (str): Name of the exported model. Defaults to ``"model"``.
            input_size (tuple[int, int] | None): Fixed ``(height, width)``, or None for dynamic shapes.
                Defaults to ``None``.
            **kwargs: Passed on to anomalib's ``to_onnx`` (and on to ``torch.onnx.export``); ``opset_version``
                defaults to ``ONNX_OPSET``.

        Returns:
            Path: Path of the exported ``.onnx`` file.
        """
        kwargs.setdefault("opset_version", ONNX_OPSET)
        with self.model.export_form(convolution=self.model.convolution_search):
            return super().to_onnx(export_root, model_file_name, input_size, **kwargs)

    def to_openvino(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        compression_type: CompressionType | None = None,
        **kwargs: Any,
    ) -> Path:
        """Export to OpenVINO with anomalib's exporter; INT8 exports trace the bank searches as 1x1 convolutions.

        ``INT8_PTQ`` quantizes only the bank search, in the convolution form that OpenVINO runs fast in
        INT8, calibrated on the training images; other exports keep the matmul search (see
        ``docs/design/int8-convolution-search.md``). Compile the result in float32 (see
        ``docs/design/float32-hint.md``).

        Args:
            export_root (Path | str): Output folder.
            model_file_name (str): Name of the exported model. Defaults to ``"model"``.
            input_size (tuple[int, int] | None): Fixed ``(height, width)``, or None for dynamic shapes.
                Defaults to ``None``.
            compression_type (CompressionType | None): ``None`` (FP32), ``FP16``, ``INT8`` or ``INT8_PTQ``;
                ``INT8_ACQ`` is refused. Defaults to ``None``.
            **kwargs: Passed on to anomalib's ``to_openvino``: ``INT8_PTQ`` needs ``datamodule``.

        Returns:
            Path: Path of the exported ``.xml`` file.

        Raises:
            ValueError: For ``INT8_ACQ``, which would quantize the backbone too, or for ``INT8_PTQ``
                without a datamodule with training images.
        """
        if compression_type == CompressionType.INT8_ACQ:
            msg = (
                "ReConPatch does not support --compression_type INT8_ACQ: NNCF's accuracy control quantizes the "
                "whole graph, backbone included, whose shifted features no longer match the FP32 memory bank. "
                "Use INT8_PTQ (with --data), which quantizes only the memory-bank search, and check its accuracy "
                "on your test images."
            )
            raise ValueError(msg)
        with self.model.export_form(convolution=compression_type == CompressionType.INT8_PTQ):
            return super().to_openvino(export_root, model_file_name, input_size, compression_type, **kwargs)

    def _post_training_quantization_ov(self, model: Any, datamodule: Any = None) -> Any:
        """Quantize only the bank search, calibrated on training images (anomalib's ``INT8_PTQ`` hook)."""
        return quantize_on_training_images(model, datamodule)


# ``anomalib benchmark`` resolves a bare ``class_path: ReConPatch`` as an attribute of anomalib.models.
anomalib_models.ReConPatch = ReConPatch
