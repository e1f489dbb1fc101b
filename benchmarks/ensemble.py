"""The ensemble against each of its backbones alone, trained and untrained, on cached features.

Each backbone runs once over the training and test images. For every seed and every
``--num-steps`` value, each backbone's member trains ``f``, builds its coreset bank, records its
training images' score statistics (as ``ReConPatchEnsemble.fit`` does) and scores the test images;
the ensemble is the mean of the standardised members, exactly as ``ReConPatchEnsembleModel``
combines them. ``num_steps=0`` is the untrained ensemble, which tells the ensemble's gain from the
training's; ``default`` trains as long as the model's default does. More rows score images otherwise,
with the same maps: each backbone by the largest pixel of its map, and the ensemble by the largest
standardised member score, by the largest pixel of its map and by the mean of the members' largest
map pixels (each standardised by its training images' largest pixels). With three or more backbones, every
pair of them is a two-backbone ensemble too, combined from the same fitted members (each member
trains under the seed itself, whatever trained before it). Ends with a mean ± sd table over the seeds;
``--out`` writes it as Markdown.

    python benchmarks/ensemble.py --data configs/data/kolektorsdd.yaml --seeds 0 1 2 \
        --num-steps default 0 --out docs/results/ensemble/kolektorsdd.md
"""

from __future__ import annotations

import itertools
import shlex
import sys
import time
from pathlib import Path

import torch
from common import (
    cache,
    data_parser,
    evaluate,
    flat_patches,
    load_data,
    mean_sd_table,
    score,
    short_names,
    write_report,
)

from anomalib_reconpatch.components.coreset import FastKCenterGreedy
from anomalib_reconpatch.reconpatch.anomaly_map import largest_pixel
from anomalib_reconpatch.reconpatch.ensemble import DEFAULT_BACKBONES, EnsembleMember, standardise


def fitted_member(
    backbone: str, args: object, steps: int | None, cached: dict, size: tuple[int, int]
) -> EnsembleMember:
    """A member on ``backbone`` trained and banked on its cached training features, with its training statistics."""
    member = EnsembleMember(
        backbone=backbone, layers=args.layers, num_steps=steps, coreset_sampling_ratio=args.coreset_ratio
    )
    train = cached["train"]
    with torch.enable_grad():
        member.train_representation(flat_patches(train))
    with torch.no_grad():
        embedded = member.model.embed(flat_patches(train))
        member.model.memory_bank = FastKCenterGreedy(embedded, args.coreset_ratio).sample_coreset()
        member.grid = tuple(train.shape[-2:])
        member.image_size = size
        member.on_memory_bank(embedded)
    return member


def cached_features(backbone: str, args: object, base: object, datamodule: object) -> tuple[dict, dict]:
    """A member's raw patch features on ``backbone`` for the training and test images, and the test labels and masks.

    Returns:
        tuple[dict, dict]: ``{"train": ..., "test": ...}`` features, and the test split's ``labels`` and ``masks``.
    """
    extractor = EnsembleMember(backbone=backbone, layers=args.layers)
    extractor.pre_processor = base.pre_processor
    features = {"train": cache(extractor, datamodule.train_dataloader(), test=False)["features"]}
    test = cache(extractor, datamodule.test_dataloader(), test=True)
    features["test"] = test.pop("features")
    return features, test


def main() -> None:
    """Score every backbone alone and the ensemble, for each seed and training length."""
    parser = data_parser(__doc__)
    parser.add_argument("--backbones", nargs="+", default=list(DEFAULT_BACKBONES))
    parser.add_argument("--coreset-ratio", type=float, default=0.01)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--num-steps", type=steps_value, nargs="+", default=[None, 0], help="step counts, or 'default'")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    datamodule, base = load_data(args, coreset_sampling_ratio=args.coreset_ratio)
    features, test = {}, None
    for backbone in args.backbones:
        features[backbone], test = cached_features(backbone, args, base, datamodule)
        print(f"{backbone}: train features {tuple(features[backbone]['train'].shape)}", flush=True)
    size = tuple(test["masks"].shape[-2:])
    rows: dict[str, list[dict[str, float]]] = {}
    for steps in args.num_steps:
        label = "default" if steps is None else steps
        for seed in args.seeds:
            standardised_scores, standardised_maps, standardised_peaks = [], [], []
            for backbone in args.backbones:
                torch.manual_seed(seed)
                start = time.perf_counter()
                member = fitted_member(backbone, args, steps, features[backbone], size)
                scores, maps = score(member, features[backbone]["test"], size)
                metrics = evaluate(scores, maps, test)
                rows.setdefault(f"{backbone}, num_steps={label}", []).append(metrics)
                peaks = largest_pixel(maps)
                by_map = evaluate(peaks, maps, test, pixel=False)
                rows.setdefault(f"{backbone} (image score: largest map pixel), num_steps={label}", []).append(by_map)
                print(f"seed {seed} num_steps {label} {backbone:24s} {fmt(metrics)} {time.perf_counter() - start:.0f}s")
                standardised_scores.append(standardise(scores, *map(torch.tensor, member.score_statistics)))
                standardised_maps.append(standardise(maps, *map(torch.tensor, member.map_statistics)))
                standardised_peaks.append(standardise(peaks, *map(torch.tensor, member.peak_statistics)))
            everyone = tuple(range(len(args.backbones)))
            pairs = list(itertools.combinations(everyone, 2)) if len(everyone) > 2 else []
            for members in [everyone, *pairs]:
                whole = members == everyone
                ensemble_map = torch.stack([standardised_maps[i] for i in members]).mean(0)
                member_scores = torch.stack([standardised_scores[i] for i in members])
                combinations = {"": member_scores.mean(0)}
                if whole:
                    combinations[" (image score: largest member score)"] = member_scores.amax(0)
                combinations[" (image score: largest map pixel)"] = largest_pixel(ensemble_map)
                member_peaks = torch.stack([standardised_peaks[i] for i in members])
                combinations[" (image score: mean of members' largest map pixels)"] = member_peaks.mean(0)
                short = short_names(args.backbones[i] for i in members)
                label_of = f"ensemble of {len(members)}" if whole else f"ensemble of {short}"
                for name, image_scores in combinations.items():
                    metrics = evaluate(image_scores, ensemble_map, test, pixel=not name)
                    rows.setdefault(f"{label_of}{name}, num_steps={label}", []).append(metrics)
                    print(f"seed {seed} num_steps {label} {label_of}{name} {fmt(metrics)}", flush=True)
    command = f"`python {shlex.join(sys.argv)}`"
    header = f"{args.data.stem}, coreset ratio {args.coreset_ratio}, seeds {args.seeds}"
    write_report(f"{command}\n\n{header}\n\n{mean_sd_table('model', rows)}", args.out)


def steps_value(text: str) -> int | None:
    """A ``--num-steps`` value: a step count, or ``default`` (None) for the model's own length."""
    return None if text == "default" else int(text)


def fmt(metrics: dict[str, float]) -> str:
    """One line of the three metrics."""
    return " ".join(f"{name} {value:.4f}" for name, value in metrics.items())


if __name__ == "__main__":
    main()
