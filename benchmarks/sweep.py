"""Hyper-parameter sweep for ReConPatch on cached backbone features (a tuning tool, not the report).

The backbone runs once over the training and test images; every setting then trains f, builds
the coreset and scores the cached test images, with anomalib's AUROC and AUPRO metrics. The
published numbers come from ``reconpatch compare``; this script only finds where to look.

    python benchmarks/sweep.py --data configs/data/kolektorsdd.yaml --coreset-ratio 0.01 \
        --setting num_steps=0 --setting learning_rate=1e-3 --setting learning_rate=1e-4,num_steps=2000

A ``seed=N`` item (default 0) seeds that setting's run, to see the spread over seeds; ``--seeds 0 1 2``
runs every setting once per seed and ends with a table of mean ± sd over the seeds, which ``--out``
also writes as Markdown (with the command that made it); a
``coreset=SPACE`` item chooses where the bank is selected (``select_bank``); ``passes=X`` trains for X passes
over the training patches (``num_steps`` from the data, as the default length does); ``num_steps=0,scale_top=X``
scales the 10 strongest principal directions by X instead of training; ``init=default`` starts ``f`` from
PyTorch's default (random) initialisation instead of the identity; ``bank_f=target`` builds the bank and
scores with the EMA copy of ``f`` (the target that labels the batches) as training leaves it; ``train_on=R``
trains ``f`` only on a greedy k-center coreset of ratio R of the untrained features, for as many steps as
the whole training set would take, so that rare normal patches weigh as much as common ones; ``loss_on=both``
puts the relaxed contrastive loss on ``f(x)`` as well as on ``g(f(x))`` and averages the two, as STML's reference
code does for its two heads, and ``loss_on=f`` on ``f(x)`` alone (``g`` then goes unused). Each line
ends with the range of the trained ``f``'s singular values (1-1 is the untrained identity) and its
gain along the training features' strongest and weakest principal directions.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from anomalib.models.components.dimensionality_reduction import SparseRandomProjection
from common import (
    METRIC_COLUMNS,
    cache,
    data_parser,
    evaluate,
    flat_patches,
    load_data,
    mean_sd_table,
    score,
    write_report,
)

from anomalib_reconpatch import ReConPatch
from anomalib_reconpatch.components.coreset import FastKCenterGreedy, greedy_k_center
from anomalib_reconpatch.reconpatch.lightning_model import (
    RepresentationNetworks,
    RepresentationStep,
    representation_steps,
)


def parse_setting(text: str) -> dict:
    """``a=1,b=2`` -> ``{"a": 1, "b": 2}`` (YAML values); ``defaults`` (or nothing) -> ``{}``."""
    items = [item for item in text.split(",") if item and item != "defaults"]
    return {k: number(yaml.safe_load(v)) for k, v in (item.split("=", 1) for item in items)}


def number(value: object) -> object:
    """YAML 1.1 reads ``1e-5`` as text: give such a value back as the float it means."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def select_bank(embedded: torch.Tensor, raw: torch.Tensor, ratio: float, space: str) -> torch.Tensor:
    """Greedy k-center bank of the embedded rows, chosen in one of four spaces.

    ``features``: the embedded rows (ReConPatch's fit); ``projected``: anomalib's random projection of
    them (stock PatchCore's); ``raw``: the backbone features before ``f``, which separates what ``f``
    does to the distances from what it does to the coreset's choice; ``all``: every row, no coreset.
    """
    if space == "features":
        return FastKCenterGreedy(embedded, ratio).sample_coreset()
    if space == "raw":
        return embedded[FastKCenterGreedy(raw, ratio).select_coreset_idxs()]
    if space == "all":
        return embedded
    projection = SparseRandomProjection(eps=0.9).fit(embedded)
    start = int(torch.randint(high=len(embedded), size=(1,)))
    return embedded[greedy_k_center(projection.transform(embedded), int(len(embedded) * ratio), start)]


def defect_groups(datamodule: object) -> dict[str, torch.Tensor]:
    """Test-image indices per defect folder, each with the good images, whose false positives bound PRO's FPR."""
    samples = datamodule.test_data.samples
    folders = samples["image_path"].map(lambda path: Path(path).parent.name)
    good = samples["label_index"] == 0
    return {
        name: torch.tensor(((folders == name) | good).to_numpy()).nonzero()[:, 0]
        for name in sorted(set(folders[~good]))
    }


def principal_gains(weight: torch.Tensor, directions: torch.Tensor, count: int = 10) -> tuple[float, float]:
    """Mean gain of ``f`` along the ``count`` strongest and weakest of ``principal_directions``.

    Tells whether training whitens (compresses the dominant directions, stretches the weak ones).
    """
    gains = (weight.double() @ directions).norm(dim=0)
    return float(gains[-count:].mean()), float(gains[:count].mean())


def principal_directions(features: torch.Tensor) -> torch.Tensor:
    """Columns: the features' principal directions, weakest first."""
    centred = features - features.mean(0)
    return torch.linalg.eigh(centred.T.double() @ centred.double())[1]


def scaled_top_directions(directions: torch.Tensor, factor: float, count: int = 10) -> torch.Tensor:
    """An untrained ``f`` weight: the identity, with the ``count`` strongest principal directions scaled by ``factor``.

    Mimics what training does to bottle (``principal_gains``) without the rest of the training.
    """
    gains = torch.ones(len(directions), dtype=torch.float64)
    gains[-count:] = factor
    return (directions * gains @ directions.T).float()


def summary_table(rows: dict[str, list[dict[str, float]]]) -> str:
    """Markdown table of each setting's mean ± sd over its runs, with the training time."""
    columns = (*METRIC_COLUMNS, ("training s", "train_s", 0))
    return mean_sd_table("setting", {f"`{text or 'defaults'}`": runs for text, runs in rows.items()}, columns)


def main() -> None:
    """Run each setting (for each of ``--seeds``) and print image AUROC, pixel AUROC and PRO."""
    parser = data_parser(__doc__)
    parser.add_argument("--coreset-ratio", type=float, default=0.01)
    parser.add_argument("--setting", action="append", default=[])
    parser.add_argument("--seeds", type=int, nargs="+", help="run every setting with each seed and summarise")
    parser.add_argument("--out", type=Path, help="write the summary table here (Markdown)")
    parser.add_argument("--by-type", action="store_true", help="also print PRO per defect folder")
    args = parser.parse_args()
    datamodule, base = load_data(args, coreset_sampling_ratio=args.coreset_ratio)
    train_flat = flat_patches(cache(base, datamodule.train_dataloader(), test=False)["features"])
    test = cache(base, datamodule.test_dataloader(), test=True)
    size = tuple(test["masks"].shape[-2:])
    print(f"train patches {tuple(train_flat.shape)}, test images {len(test['labels'])}")
    directions = principal_directions(train_flat)
    groups = defect_groups(datamodule) if args.by_type else {}
    rows: dict[str, list[dict[str, float]]] = {}
    for text in args.setting or [""]:
        for seed in args.seeds or [None]:
            run = text if seed is None else ",".join(item for item in (text, f"seed={seed}") if item)
            rows.setdefault(text, []).append(
                run_setting(run, args, base, train_flat, test, size, directions, groups, datamodule)
            )
    if args.seeds:
        command = "python " + shlex.join(sys.argv)
        header = (
            f"{args.data.stem}, {args.backbone}, {'x'.join(map(str, args.image_size))} px, "
            f"coreset ratio {args.coreset_ratio}"
        )
        write_report(f"`{command}`\n\n{header}\n\n{summary_table(rows)}", args.out)


# Which outputs the relaxed contrastive loss is put on: the model's (g), f's alone, or the mean of both.
LOSS_HEADS = ("g", "f", "both")


def head_loss(
    model: ReConPatch, networks: RepresentationNetworks, x: torch.Tensor, weights: torch.Tensor, on: str
) -> torch.Tensor:
    """The relaxed contrastive loss on ``f(x)`` (``on="f"``) or the mean of it and the model's loss on ``g(f(x))``."""
    represented = networks.online_f(x)
    on_f = model.loss(represented, weights)
    return on_f if on == "f" else 0.5 * (on_f + model.loss(networks.online_g(represented), weights))


def run_setting(
    text: str,
    args: argparse.Namespace,
    base: ReConPatch,
    train_flat: torch.Tensor,
    test: dict,
    size: tuple[int, int],
    directions: torch.Tensor,
    groups: dict[str, torch.Tensor],
    datamodule: object,
) -> dict[str, float]:
    """Train, select the bank and score the cached test split for one setting; print and return its metrics."""
    setting = parse_setting(text)
    seed = setting.pop("seed", 0)
    torch.manual_seed(seed)
    np.random.seed(seed)  # anomalib's random projection (coreset=projected) draws from numpy's global generator
    coreset_space = setting.pop("coreset", "features")
    top_factor = setting.pop("scale_top", None)
    random_init = setting.pop("init", "identity") == "default"
    passes = setting.pop("passes", None)
    bank_f = setting.pop("bank_f", "online")
    if bank_f not in ("online", "target"):
        raise SystemExit(f"bank_f={bank_f} in --setting {text!r}: use bank_f=online or bank_f=target.")
    train_on = setting.pop("train_on", None)
    if train_on is not None and not (isinstance(train_on, int | float) and 0 < train_on <= 1):
        raise SystemExit(f"train_on={train_on} in --setting {text!r}: use a coreset ratio in (0, 1].")
    loss_on = setting.pop("loss_on", "g")
    if loss_on not in LOSS_HEADS:
        raise SystemExit(f"loss_on={loss_on} in --setting {text!r}: use one of {', '.join(LOSS_HEADS)}.")
    model = ReConPatch(backbone=args.backbone, layers=args.layers, coreset_sampling_ratio=args.coreset_ratio, **setting)
    if loss_on != "g":
        model.representation_loss = lambda networks, x, weights: head_loss(model, networks, x, weights, loss_on)
    if passes is not None:
        model.num_steps = math.ceil(passes * len(train_flat) / model.patches_per_step)
    training_rows = train_flat
    if train_on is not None:
        model.num_steps = representation_steps(len(train_flat), model.patches_per_step, model.num_steps)
        training_rows = train_flat[FastKCenterGreedy(train_flat, train_on).select_coreset_idxs()]
    model.model.feature_extractor = base.model.feature_extractor
    if random_init:
        model.model.representation.reset_parameters()
    targets: dict[str, torch.nn.Module] = {}

    def keep_target(step: RepresentationStep) -> None:
        targets.setdefault("f", step.target_f)  # one module all along, moved by every step's EMA

    start = time.perf_counter()
    with torch.enable_grad():
        model.train_representation(training_rows, on_step=keep_target if bank_f == "target" else None)
    trained = time.perf_counter() - start
    if "f" in targets:
        model.model.representation.load_state_dict(targets["f"].state_dict())
    if top_factor is not None:
        model.model.representation.weight.data = scaled_top_directions(directions, top_factor)
    with torch.no_grad():
        embedded = model.model.embed(train_flat)
        model.model.memory_bank = select_bank(embedded, train_flat, args.coreset_ratio, coreset_space)
    scores, maps = score(model, test["features"], size)
    metrics = evaluate(scores, maps, test)
    weight = model.model.representation.weight.detach()
    singular = torch.linalg.svdvals(weight)
    top, bottom = principal_gains(weight, directions)
    print(
        f"{text or 'defaults':60s} image_AUROC {metrics['image_AUROC']:.4f} "
        f"pixel_AUROC {metrics['pixel_AUROC']:.4f} PRO {metrics['PRO']:.4f} train {trained:.0f}s "
        f"f singular values {singular.min():.2f}-{singular.max():.2f}, "
        f"gain on top/bottom 10 principal directions {top:.2f}/{bottom:.2f}",
        flush=True,
    )
    if groups:
        pro = {
            name: evaluate(scores[rows], maps[rows], {"labels": test["labels"][rows], "masks": test["masks"][rows]})
            for name, rows in groups.items()
        }
        print("    PRO by defect folder: " + ", ".join(f"{k} {v['PRO']:.4f}" for k, v in pro.items()), flush=True)
    return {**metrics, "train_s": trained}


if __name__ == "__main__":
    main()
