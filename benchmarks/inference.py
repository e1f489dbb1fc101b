"""CPU inference at batch 1: stock PatchCore's torch model against ReConPatch's, and each search option.

    python benchmarks/inference.py --data configs/data/bottle.yaml --ratio 0.1
    python benchmarks/inference.py --data configs/data/kolektorsdd.yaml --ratio 0.1 --auroc-only

One run, one process: the backbone runs once over the training and test images; ReConPatch trains ``f``
(its defaults) and builds its bank with our greedy k-center on ``f(features)``. Stock PatchCore's torch
model (``PatchcoreModel``) gets a bank of the same size from the same greedy k-center on its own raw
features (``common.patchcore_bank``).

Latency is the median per-image time of the torch model's forward on fixed pre-processed test images,
over ``--rounds`` rounds that each time every configuration in turn, split into backbone / search /
rest (``anomalib_reconpatch/tools/latency.py``). ``flat`` is faiss's exact ``IndexFlatL2`` (measured to
decide between faiss and torch for exact search). Image AUROC is anomalib's, on all test images, with
each search; recall@1 is the share of test patches for which the faiss index itself (before the exact
refinement of each image's top patches) returns the exact nearest bank row.
"""

from __future__ import annotations

import time
from functools import partial

import torch
from anomalib.models.image.patchcore.torch_model import PatchcoreModel
from common import cache, data_parser, evaluate, flat_patches, load_data, patchcore_bank, score

from anomalib_reconpatch import ReConPatch
from anomalib_reconpatch.components.coreset import FastKCenterGreedy
from anomalib_reconpatch.reconpatch.search import build_index, nearest_bank_rows, search_index
from anomalib_reconpatch.tools.compare import latency_images
from anomalib_reconpatch.tools.latency import interleaved_medians, split_latency_ms

OPTIONS = ("exact", "flat", "hnsw", "ivf")


def time_one(torch_model: torch.nn.Module, search: str | None, images: list[torch.Tensor]) -> dict[str, float]:
    """One model's per-image split, with ``search`` set first when it is a ReConPatch search option."""
    if search is not None:
        torch_model.search = search
    return split_latency_ms(torch_model, torch_model, images)


def index_nearest(model: ReConPatch, queries: torch.Tensor) -> torch.Tensor:
    """The faiss index's own answer, before the exact refinement of the top patches."""
    return search_index(model.model.bank_index(), queries)[1]


def main() -> None:
    """Build both banks, then print the latency split, search speed-ups, recall and image AUROC per search."""
    parser = data_parser(__doc__)
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--images", type=int, default=20, help="fixed test images timed at batch 1")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--auroc-only", action="store_true", help="skip PatchCore and the timing; AUROC per search")
    args = parser.parse_args()
    torch.manual_seed(0)
    datamodule, model = load_data(args, coreset_sampling_ratio=args.ratio)
    train = flat_patches(cache(model, datamodule.train_dataloader(), test=False)["features"])
    test = cache(model, datamodule.test_dataloader(), test=True)
    size = tuple(test["masks"].shape[-2:])
    print(f"{args.data}: {len(train)} training patches x {train.shape[1]}, {len(test['labels'])} test images")

    start = time.perf_counter()
    with torch.enable_grad():
        model.train_representation(train)
    trained_s = time.perf_counter() - start
    with torch.no_grad():
        embedded = model.model.embed(train)
    start = time.perf_counter()
    model.model.memory_bank = FastKCenterGreedy(embedded, args.ratio).sample_coreset()
    bank = model.model.memory_bank
    coreset_s = time.perf_counter() - start
    print(f"ReConPatch: f trained in {trained_s:.0f} s, bank {tuple(bank.shape)} in {coreset_s:.0f} s")
    del embedded
    model.model.eval()
    build_s = {}
    for kind in OPTIONS[1:]:
        start = time.perf_counter()
        model.model.search = kind
        model.model.bank_index()
        build_s[kind] = time.perf_counter() - start

    with torch.no_grad():
        queries = [model.model.embed(test["features"][i].permute(1, 2, 0).reshape(-1, bank.shape[1])) for i in range(8)]
    exact_nearest = torch.cat([nearest_bank_rows(q, bank)[1] for q in queries])
    recall, auroc, scores = {}, {}, {}
    for kind in OPTIONS:
        model.model.search = kind
        found = exact_nearest if kind == "exact" else torch.cat([index_nearest(model, q) for q in queries])
        recall[kind] = float((found == exact_nearest).float().mean())
        scores[kind], maps = score(model, test["features"], size)
        auroc[kind] = evaluate(scores[kind], maps, test, pixel=False)["image_AUROC"]
    for kind in OPTIONS:
        error = float(((scores[kind] - scores["exact"]) / scores["exact"]).abs().max())
        print(
            f"search {kind}: recall@1 {recall[kind]:.3f}, image AUROC {auroc[kind]:.4f} "
            f"({auroc[kind] - auroc['exact']:+.4f}), largest image-score error {100 * error:.2f}%"
        )
    if args.auroc_only:
        return

    patchcore = PatchcoreModel(layers=args.layers, backbone=args.backbone, num_neighbors=9).eval()
    patchcore.memory_bank = patchcore_bank(train, args.ratio)
    del train
    transform = model.pre_processor.transform
    images = [transform(image[None])[0] for image in latency_images(datamodule, args.images)]
    configs = {"PatchCore (stock torch model)": (patchcore, None)}
    configs.update({f"ReConPatch {kind}": (model.model, kind) for kind in OPTIONS})
    split = interleaved_medians(
        {name: partial(time_one, *config, images) for name, config in configs.items()}, args.rounds
    )

    flat = build_index(bank, "flat")
    same = all(torch.equal(search_index(flat, q)[1], nearest_bank_rows(q, bank)[1]) for q in queries)
    print(f"faiss IndexFlatL2 returns the exact indices of torch on 8 test images: {same}\n")

    exact = split["ReConPatch exact"]["search_ms"]
    print(
        f"Per image at batch 1, {bank.shape[0]:,} x {bank.shape[1]} bank, median of {args.images} test images "
        f"x {args.rounds} rounds; threads torch {torch.get_num_threads()}"
    )
    print("| model, search | latency ms | backbone ms | search ms | rest ms | search speed-up | recall@1 | image AUROC")
    print("|---|---|---|---|---|---|---|---")
    for name, numbers in split.items():
        kind = configs[name][1]
        extra = f"{recall[kind]:.3f} | {auroc[kind]:.4f}" if kind else "- | -"
        build = f" (index built in {build_s[kind]:.1f} s)" if kind in build_s else ""
        print(
            f"| {name}{build} | {numbers['latency_ms']:.1f} | {numbers['backbone_ms']:.1f} | "
            f"{numbers['search_ms']:.1f} | {numbers['rest_ms']:.1f} | {exact / numbers['search_ms']:.2f}x | {extra}"
        )
    for kind in ("hnsw", "ivf"):
        speedup, delta = exact / split[f"ReConPatch {kind}"]["search_ms"], auroc[kind] - auroc["exact"]
        verdict = "meets" if speedup >= 3 and abs(delta) <= 0.002 else "misses"
        print(f"{kind}: search {speedup:.1f}x faster than exact, image AUROC {delta:+.4f}: {verdict} the target")


if __name__ == "__main__":
    main()
