"""What ReConPatch refuses, and how it says so: settings, precision, training-set size and checkpoints.

Each check runs before the work it protects (construction, feature extraction, loading) and raises
one ``ValueError`` that names the setting or file and says what to pass instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..components.preflight import ImageScan
from .sampling import BATCH_SAMPLINGS
from .search import SEARCH_OPTIONS
from .similarity import SIGMA_UNITS

OPTIMIZERS = ("adamw", "adamp")
"""The representation training's optimizers, by ``optimizer`` setting."""


def _check_range(name: str, value: float, ok: bool, expected: str) -> None:
    """Raise the one out-of-range message for setting ``name`` unless ``ok``, saying what is expected."""
    if not ok:
        msg = f"ReConPatch: {name}={value!r} is out of range; expected {expected} (set --model.{name})."
        raise ValueError(msg)


def validate_hyperparameters(params: dict[str, Any]) -> None:
    """Reject out-of-range settings at construction, before any backbone is built.

    Args:
        params (dict[str, Any]): ``ReConPatch.__init__``'s arguments by name (its ``locals()``).

    Raises:
        ValueError: For the first setting out of range, naming it and the range expected.
    """
    _check_range("k", params["k"], isinstance(params["k"], int) and params["k"] >= 1, "an integer >= 1")
    _check_range("alpha", params["alpha"], 0.0 <= params["alpha"] <= 1.0, "0 <= alpha <= 1")
    _check_range("margin", params["margin"], params["margin"] > 0, "margin > 0")
    sigma = params["sigma"]
    _check_range("sigma", sigma, sigma is None or sigma > 0, "sigma > 0, or null for the unit's default")
    _check_range("momentum", params["momentum"], 0.0 <= params["momentum"] < 1.0, "0 <= momentum < 1")
    ratio = params["coreset_sampling_ratio"]
    _check_range("coreset_sampling_ratio", ratio, 0.0 < ratio <= 1.0, "0 < ratio <= 1")
    steps = params["num_steps"]
    _check_range("num_steps", steps, steps is None or steps >= 0, "an integer >= 0, or null to follow the data")
    batch = params["patches_per_step"]
    _check_range("patches_per_step", batch, batch > params["k"], f"an integer > k ({params['k']})")
    _check_range("learning_rate", params["learning_rate"], params["learning_rate"] > 0, "learning_rate > 0")
    _check_range("weight_decay", params["weight_decay"], params["weight_decay"] >= 0, "weight_decay >= 0")
    _check_range("projection_dim", params["projection_dim"], params["projection_dim"] >= 1, "an integer >= 1")
    _check_range("num_neighbors", params["num_neighbors"], params["num_neighbors"] >= 1, "an integer >= 1")
    _check_range("search", params["search"], params["search"] in SEARCH_OPTIONS, "one of " + ", ".join(SEARCH_OPTIONS))
    unit, sampling = params["sigma_unit"], params["batch_sampling"]
    _check_range("sigma_unit", unit, unit in SIGMA_UNITS, "one of " + ", ".join(SIGMA_UNITS))
    _check_range("batch_sampling", sampling, sampling in BATCH_SAMPLINGS, "one of " + ", ".join(BATCH_SAMPLINGS))
    optimizer = params["optimizer"]
    _check_range("optimizer", optimizer, optimizer in OPTIMIZERS, "one of " + ", ".join(OPTIMIZERS))
    budget = params["feature_memory_mb"]
    _check_range("feature_memory_mb", budget, budget is None or budget >= 0, "null (no limit) or megabytes >= 0")


def check_image_score(value: str, own: tuple[str, ...], model: str, others: tuple[str, ...], other_model: str) -> None:
    """Refuse an ``image_score`` that ``model`` does not know, naming the model it belongs to if any.

    The single model and the ensemble score images differently (``patches`` and ``members``), and
    ``load_from_checkpoint`` passes a checkpoint's settings to the constructor before the checkpoint's own
    check can say whose it is; so the other model's value gets that message here.

    Args:
        value (str): The ``image_score`` asked for.
        own (tuple[str, ...]): The values ``model`` takes.
        model (str): The model being built.
        others (tuple[str, ...]): The values the other model takes.
        other_model (str): The other model's name.

    Raises:
        ValueError: If ``value`` is not one of ``own``.
    """
    if value in own:
        return
    if value in others:
        msg = (
            f"{model}: image_score={value!r} is {other_model}'s (one of {', '.join(own)} here); a checkpoint with "
            f"it is not a {model}'s but a {other_model}'s: load it with --model {other_model}."
        )
        raise ValueError(msg)
    _check_range("image_score", value, False, "one of " + ", ".join(own))


def check_image_score_matches(module: Any, checkpoint: dict[str, Any], before: str) -> None:
    """Keep a checkpoint's image score with the image threshold that was calibrated on it.

    ``load_from_checkpoint`` writes its overrides into the checkpoint's ``hyper_parameters`` before this
    hook runs, so the two differ only when the model was built apart from the checkpoint, as ``anomalib
    test --ckpt_path`` builds it from the command line: scoring with another ``image_score`` would compare
    the new scores with the old score's threshold, and every image label would follow the wrong scale.
    A checkpoint written before the setting existed scored images as ``before``, and the model takes that.

    Args:
        module (Any): The Lightning module (``ReConPatch`` or ``ReConPatchEnsemble``) being loaded.
        checkpoint (dict[str, Any]): The loaded checkpoint dictionary.
        before (str): The score of checkpoints without an ``image_score`` setting.

    Raises:
        ValueError: If the checkpoint's ``image_score`` differs from the model's; the message gives the flag.
    """
    params = checkpoint.get("hyper_parameters") or {}
    saved = params.get("image_score", before)
    if "image_score" not in params:
        module.model.image_score = saved
        module.hparams["image_score"] = saved
    own = module.hparams["image_score"]
    if saved != own:
        name = type(module).__name__
        msg = (
            f"This checkpoint scores images by image_score={saved!r} and its image threshold was calibrated on "
            f"that score, but the model it is loaded into has image_score={own!r}: pass --model.image_score "
            f"{saved} (or rescore it on purpose with {name}.load_from_checkpoint(path, image_score={own!r}) "
            "and calibrate its threshold again)."
        )
        raise ValueError(msg)


def check_training_size(module: Any, datamodule: Any, scan: ImageScan) -> None:
    """Stop before feature extraction when the training set cannot give ``k + 1`` patches or one coreset point.

    The patch grid is found by running the backbone once on a blank image of the model's input size
    (else the first training image's size, else 256 x 256). Datamodules without a sized
    ``train_data`` are not checked.

    Args:
        module (ReConPatch): The Lightning module, for its backbone, input size and ``hparams``.
        datamodule (AnomalibDataModule): The datamodule, set up for fitting.
        scan (ImageScan): The pre-flight scan of the images, for the first image's size.

    Raises:
        ValueError: If there are no training images, no more than ``k`` training patches, or
            ``coreset_sampling_ratio`` keeps no patch; the message says what to change.
    """
    train = getattr(datamodule, "train_data", None)
    if train is None or not hasattr(train, "__len__"):
        return
    n_images = len(train)
    if n_images == 0:
        root = Path(getattr(datamodule, "root", None) or ".") / str(getattr(datamodule, "category", None) or "")
        msg = (
            f"No training images found under {root}: add normal images to its training folder "
            "(train/good in the MVTec layout) or point the datamodule at the right folder."
        )
        raise ValueError(msg)
    height, width = module.input_size or scan.first_size or (256, 256)
    with torch.no_grad():
        grid = module.model.patch_features(torch.zeros(1, 3, int(height), int(width), device=module.device)).shape[-2:]
    n_patches = n_images * grid[0] * grid[1]
    k, ratio = module.hparams["k"], module.hparams["coreset_sampling_ratio"]
    if n_patches <= k:
        msg = (
            f"ReConPatch needs more than k={k} training patches, the {n_images} training image(s) give "
            f"{n_patches}: add images or lower --model.k."
        )
        raise ValueError(msg)
    if int(n_patches * ratio) == 0:
        msg = (
            f"--model.coreset_sampling_ratio={ratio} keeps no memory-bank point of the {n_patches} training patches "
            f"({n_images} image(s) x {grid[0]}x{grid[1]} patches): set it to at least 1/{n_patches} "
            "or add training images."
        )
        raise ValueError(msg)


def check_precision(precision: str) -> None:
    """Refuse a Lightning precision other than float32, before any image is read.

    The memory bank, the thresholds and the exported graph all measure patch distances in float32. Under
    a mixed precision the backbone's features would come in half precision and the search's
    ``|q|^2 - 2 q.b + |b|^2`` would cancel in it; under a true half or double precision ``f`` and the bank
    would change type. Either way the validation scores, and the thresholds set on them, would not be
    those of the exported model.

    Args:
        precision (str): The trainer's precision (``trainer.precision``), e.g. ``32-true`` or ``bf16-mixed``.

    Raises:
        ValueError: If it is not ``32-true``.

    Example:
        >>> check_precision("32-true")
        >>> check_precision("bf16-mixed")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: --trainer.precision bf16-mixed: ReConPatch computes ... in float32, ... its default, 32.
    """
    if str(precision) != "32-true":  # Lightning spells 32, "32" and its default this way
        msg = (
            f"--trainer.precision {precision}: ReConPatch computes its features and distances in float32, "
            "as its exported model does; leave the precision at its default, 32."
        )
        raise ValueError(msg)


# Checkpoint key of the architecture record written by ReConPatch.on_save_checkpoint.
ARCHITECTURE_KEY = "reconpatch_architecture"
ENSEMBLE_KEY = "reconpatch_ensemble_architecture"
"""The ensemble's own record (``ReConPatchEnsemble.on_save_checkpoint``), named here to recognise its checkpoints."""


def architecture(module: Any) -> dict[str, Any]:
    """Describe what a checkpoint must match to load into ``module``.

    Args:
        module (ReConPatch): The Lightning module.

    Returns:
        dict[str, Any]: ``backbone``, ``layers`` (a list), ``embedding_dim`` and ``feature_dim`` (the
        input size of ``f``, None when the module has no representation weight).
    """
    weight = module.state_dict().get("model.representation.weight")
    return {
        "backbone": module.hparams.get("backbone"),
        "layers": _normalise(module.hparams.get("layers")),
        "embedding_dim": module.hparams.get("embedding_dim"),
        "feature_dim": int(weight.shape[1]) if weight is not None else None,
    }


def _describe(arch: dict[str, Any]) -> str:
    """Render an :func:`architecture` record as the command-line settings a user would recognise."""
    return (
        f"backbone={arch.get('backbone')}, layers={arch.get('layers')}, embedding_dim={arch.get('embedding_dim')} "
        f"(feature dim {arch.get('feature_dim')})"
    )


def check_checkpoint_matches(module: Any, checkpoint: dict[str, Any]) -> None:
    """Refuse a checkpoint whose backbone, layers or feature size differ from the model it is loaded into.

    Without this, a different feature size fails deep in ``load_state_dict`` with bare tensor
    shapes, and a different backbone fails with hundreds of missing keys (or, with the same size
    and keys, loads silently and scores nonsense). The checkpoint's own record (written by
    ``on_save_checkpoint``) is used because ``load_from_checkpoint(path, layers=...)`` overwrites
    the checkpoint's ``hyper_parameters`` with the overrides before this hook runs. Checkpoints
    without the record are compared on their hyper-parameters and weight shape; an unknown feature
    size is not compared.

    Args:
        module (ReConPatch): The Lightning module the checkpoint is loaded into.
        checkpoint (dict[str, Any]): The loaded checkpoint dictionary.

    Raises:
        ValueError: If any of the architecture differs; the message gives the settings to pass.
    """
    saved = checkpoint.get(ARCHITECTURE_KEY)
    state = checkpoint.get("state_dict") or {}
    if saved is None and "model.representation.weight" not in state:
        if ENSEMBLE_KEY in checkpoint:
            found = "; it is a ReConPatchEnsemble's: load it with --model ReConPatchEnsemble"
        elif "model.memory_bank" in state:
            found = "; a memory bank without f is what Patchcore saves: load it with --model Patchcore"
        else:
            found = ": load it with the model that trained it"
        msg = (
            f"This checkpoint is not a {type(module).__name__} checkpoint (it holds no representation f){found}, "
            f"or train {type(module).__name__} to get a checkpoint of its own."
        )
        raise ValueError(msg)
    if saved is None:  # written before the record existed: hyper-parameters and the weight shape
        params = checkpoint.get("hyper_parameters") or {}
        weight = (checkpoint.get("state_dict") or {}).get("model.representation.weight")
        saved = {name: _normalise(params.get(name)) for name in ("backbone", "layers", "embedding_dim")}
        saved["feature_dim"] = int(weight.shape[1]) if weight is not None else None
    own = architecture(module)
    unknown = {name for name in ("feature_dim",) if saved.get(name) is None or own.get(name) is None}
    differs = [name for name in own if name not in unknown and _normalise(saved.get(name)) != own[name]]
    if not differs:
        return
    layers = ", ".join(str(layer) for layer in saved.get("layers") or [])
    msg = (
        f"This checkpoint was trained with {_describe(saved)}, but the model it is loaded into has "
        f"{_describe(own)} ({', '.join(differs)} differ). Build the model as it was trained: "
        f"pass --model.backbone {saved.get('backbone')} --model.layers '[{layers}]' "
        f"--model.embedding_dim {cli_value(saved.get('embedding_dim'))} "
        "(or call ReConPatch.load_from_checkpoint(path) without overriding them)."
    )
    raise ValueError(msg)


def cli_value(value: Any) -> str:
    """Write a setting as the anomalib CLI reads it: ``None`` is YAML's ``null``, which the CLI accepts.

    Args:
        value (Any): The setting's value.

    Returns:
        str: The text to put after the flag.
    """
    return "null" if value is None else str(value)


def _normalise(value: Any) -> Any:
    """Lists and tuples compare equal (a checkpoint stores ``layers`` as either)."""
    return list(value) if isinstance(value, list | tuple) else value
