"""The data side of ``reconpatch compare``: stock-CLI datamodule YAMLs, categories, and download failures."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any
from urllib.error import URLError

import yaml


def load_datamodule_config(path: Path) -> dict[str, Any]:
    """Read a stock-CLI datamodule YAML (``class_path`` + ``init_args``), with errors that name the file.

    Args:
        path (Path): The YAML file, e.g. one of ``configs/data/``.

    Returns:
        dict[str, Any]: The config, with at least ``class_path``.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it is not valid YAML or has no top-level ``class_path``.
    """
    if not path.is_file():
        msg = f"Data config {path} does not exist: pass a YAML file with class_path and init_args (see configs/data/)."
        raise FileNotFoundError(msg)
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        msg = f"Data config {path} is not valid YAML: {error}"
        raise ValueError(msg) from error
    if not isinstance(config, dict) or "class_path" not in config:
        msg = f"Data config {path} needs a top-level 'class_path' (e.g. anomalib.data.MVTecAD) and 'init_args'."
        raise ValueError(msg)
    return config


def datamodule_class(class_path: str) -> type:
    """Import the anomalib datamodule class that ``class_path`` names.

    Args:
        class_path (str): Dotted path such as ``anomalib.data.MVTecAD``; a bare class name is looked up
            in ``anomalib.data``.

    Returns:
        type: The datamodule class.

    Raises:
        ValueError: If the name is not an anomalib datamodule class.
    """
    from anomalib.data import AnomalibDataModule

    module_name, _, class_name = class_path.rpartition(".")
    found = getattr(importlib.import_module(module_name or "anomalib.data"), class_name, None)
    if not (isinstance(found, type) and issubclass(found, AnomalibDataModule)):
        msg = f"class_path '{class_path}' is not an anomalib datamodule (for example anomalib.data.MVTecAD or Folder)."
        raise ValueError(msg)
    return found


def several_categories(category: Any) -> bool:
    """Whether ``init_args.category`` names several categories: a list, or ``all``.

    Args:
        category (Any): The value of ``init_args.category``.

    Returns:
        bool: True for a list or ``"all"``.
    """
    return isinstance(category, list) or category == "all"


def build_datamodule(config: dict[str, Any], seed: int) -> Any:
    """Instantiate the datamodule of a stock-CLI data config, for one category.

    Args:
        config (dict[str, Any]): The data config (``class_path`` + ``init_args``).
        seed (int): The datamodule's seed, unless ``init_args`` sets one.

    Returns:
        Any: The datamodule.

    Raises:
        ValueError: If the class is not an anomalib datamodule or ``init_args.category`` names several.
    """
    cls = datamodule_class(config["class_path"])
    init_args = dict(config.get("init_args") or {})
    if several_categories(init_args.get("category")):
        msg = (
            f"init_args.category {init_args['category']!r} names several categories; this command takes one "
            "(`reconpatch compare` runs each of a list, or all)."
        )
        raise ValueError(msg)
    init_args.setdefault("seed", seed)
    return cls(**init_args)


def split_categories(config: dict[str, Any], data: Path) -> dict[str, dict[str, Any]] | None:
    """One data config per category when ``init_args.category`` is a list or ``all``; None for a single one.

    ``all`` means the data set's own category list (``CATEGORIES`` of its anomalib dataset module), so
    MVTec AD gives its 15 categories whether or not they are all on disk yet.

    Args:
        config (dict[str, Any]): The data config.
        data (Path): Its file, named in the errors.

    Returns:
        dict[str, dict[str, Any]] | None: One config per category name, in order, or None when
        ``init_args.category`` names one category (or none).

    Raises:
        ValueError: If ``all`` has no known list, or the names are empty, repeated or not plain folder names.
    """
    init_args = config.get("init_args") or {}
    category = init_args.get("category")
    if not several_categories(category):
        return None
    if category == "all":
        cls = datamodule_class(config["class_path"])
        dataset_module = importlib.import_module(cls.__module__.replace(".datamodules.", ".datasets."))
        category = list(getattr(dataset_module, "CATEGORIES", []))
        if not category:
            msg = f"{data}: {cls.__name__} has no known category list for 'category: all'; list them instead."
            raise ValueError(msg)
    named = all(isinstance(c, str) and c not in {".", ".."} and Path(c).name == c for c in category)
    if not category or len(set(category)) != len(category) or not named:  # each name is a folder under --out
        msg = f"{data}: init_args.category {category!r} should list different category names, e.g. [bottle, cable]."
        raise ValueError(msg)
    return {name: {**config, "init_args": {**init_args, "category": name}} for name in category}


def download_failure(error: URLError, data_config: dict[str, Any], data: Path) -> str:
    """Explain what to do when anomalib tried to download a data set that is not on disk, and could not.

    Args:
        error (URLError): The download's error.
        data_config (dict[str, Any]): The data config, whose ``init_args.root`` is named.
        data (Path): The data config's file.

    Returns:
        str: The message: where the data was looked for, and how to point there or write the demo data.
    """
    root = (data_config.get("init_args") or {}).get("root", "the data root")
    return (
        f"The data set is not under {root} (init_args.root in {data}), and anomalib's attempt to download it "
        f"failed ({error.reason}). Point root at the folder that holds your data set; for the demo data, "
        f"write it first with `reconpatch demo-data {root}`."
    )
