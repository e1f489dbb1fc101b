"""Trace representation training step by step: the loss, its parts, the pseudo-labels and ``f``'s spectrum.

    python benchmarks/training_trace.py --data configs/data/bottle.yaml --out results/trace/bottle

The backbone runs once over the training images; ``ReConPatch.train_representation`` then trains on
the cached patch features with the model's own settings (``--setting name=value`` overrides them) and
hands every step to this script, which records:

- ``loss`` (what the optimizer saw) and its ``pull`` and ``push`` parts;
- the pseudo-labels: the fraction of pairs with ``w > 0.5``, the mean of ``w``, ``w^P`` and ``w^C``
  over the pairs, their correlation, and the kernel's bandwidth ``s`` (the batch's mean squared
  k-th-neighbour distance in the space the kernel acts in);
- two losses on one fixed probe batch that tell a moving target from a failing optimizer:
  ``fixed_target_loss``, the online network's loss against the pseudo-labels that the step-0 target
  networks gave the probe (the optimizer fitting a fixed objective makes it fall), and
  ``initial_online_loss``, the untrained online network's loss against the current targets (it
  rises when the targets themselves get harder to meet);
- every 25 steps, ``f``'s singular values.

It writes ``trace.json`` (every record) and ``trace.png`` (four panels) into ``--out``.
"""

from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path

import torch
import yaml
from common import cache, data_parser, flat_patches, load_data

from anomalib_reconpatch.reconpatch.loss import relaxed_contrastive_pairs
from anomalib_reconpatch.reconpatch.similarity import (
    bandwidth_of,
    contextual_from_neighbours,
    labelling_space,
    pairwise_similarity,
    pseudo_labels,
)

SPECTRUM_EVERY = 25


def loss_parts(z: torch.Tensor, weights: torch.Tensor, margin: float) -> tuple[float, float]:
    """The pull and push parts of the relaxed contrastive loss; they add up to the loss."""
    pull, push = relaxed_contrastive_pairs(z, weights, margin)
    return float(pull.sum() / len(z)), float(push.sum() / len(z))


def label_statistics(z_target: torch.Tensor, k: int, alpha: float, sigma: float, unit: str) -> dict[str, float]:
    """The pseudo-labels of one batch of target projections, split into their pairwise and contextual parts.

    ``unit`` is the model's ``sigma_unit``: with ``normalized`` the projections are scaled to unit length
    and ``sigma`` is absolute; ``bandwidth`` is the k-th-neighbour scale of the space the kernel acts in.
    """
    sq, nearest, width = labelling_space(z_target, k, sigma, unit)
    bandwidth = bandwidth_of(sq.gather(1, nearest))  # the neighbours' distances, as knn_bandwidth takes them
    pairwise = pairwise_similarity(sq, width)
    contextual = contextual_from_neighbours(nearest[:, :k], sq.dtype)
    weights = alpha * pairwise + (1.0 - alpha) * contextual
    off = ~torch.eye(len(sq), dtype=torch.bool)
    p, c, w = pairwise[off], contextual[off], weights[off]
    correlation = torch.corrcoef(torch.stack([p, c]))[0, 1]
    return {
        "pairs_above_half": float((w > 0.5).float().mean()),
        "mean_w": float(w.mean()),
        "mean_w_pairwise": float(p.mean()),
        "mean_w_contextual": float(c.mean()),
        "corr_pairwise_contextual": float(correlation),
        "bandwidth": float(bandwidth),
    }


def plot(records: list[dict], spectra: list[dict], path: Path, title: str) -> None:
    """Four panels: the loss and its parts, the probe losses, the pseudo-labels, ``f``'s singular values."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    panels = [
        (axes[0, 0], ("loss", "pull", "push"), "training loss and its parts"),
        (axes[0, 1], ("fixed_target_loss", "initial_online_loss"), "probe batch: fixed target vs moving target"),
        (axes[1, 0], ("pairs_above_half", "mean_w", "mean_w_pairwise", "mean_w_contextual"), "pseudo-labels"),
    ]
    for ax, keys, name in panels:
        for key in keys:
            ax.plot(steps, [r[key] for r in records], label=key, linewidth=1)
        ax.set(title=name, xlabel="step")
        ax.legend(fontsize=7)
    ax = axes[1, 1]
    spectrum_steps = [s["step"] for s in spectra]
    for label, pick in (("max", max), ("median", statistics.median), ("min", min)):
        ax.plot(spectrum_steps, [pick(s["singular_values"]) for s in spectra], label=label)
    ax.set(title="singular values of f", xlabel="step")
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    """Train once with the step hook, then write the trace and its figure."""
    parser = data_parser(__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--setting", default="", help="model arguments, e.g. num_steps=3000,learning_rate=1e-4")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    setting = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.setting.split(",") if item)}
    torch.manual_seed(args.seed)  # the training loader's shuffling orders the cached patches
    datamodule, model = load_data(args, **setting)
    train = flat_patches(cache(model, datamodule.train_dataloader(), test=False)["features"])
    torch.manual_seed(args.seed)
    probe = train[torch.randperm(len(train))[: model.patches_per_step]]
    k, alpha, sigma, unit, margin = model.k, model.alpha, model.sigma, model.sigma_unit, model.loss.margin
    records: list[dict] = []
    spectra: list[dict] = []
    fixed: dict[str, object] = {}

    def on_step(state: object) -> None:
        with torch.no_grad():
            z_online = state.online_g(state.online_f(state.batch))
            pull, push = loss_parts(z_online, state.weights, margin)
            if not fixed:
                fixed["weights"] = pseudo_labels(state.target_g(state.target_f(probe)), k, alpha, sigma, unit)
                fixed["online"] = (copy.deepcopy(state.online_f), copy.deepcopy(state.online_g))
            current = pseudo_labels(state.target_g(state.target_f(probe)), k, alpha, sigma, unit)
            initial_f, initial_g = fixed["online"]
            fixed_loss = sum(loss_parts(state.online_g(state.online_f(probe)), fixed["weights"], margin))
            initial_loss = sum(loss_parts(initial_g(initial_f(probe)), current, margin))
            record = {
                "step": state.step + 1,
                "loss": state.loss,
                "pull": pull,
                "push": push,
                "fixed_target_loss": float(fixed_loss),
                "initial_online_loss": float(initial_loss),
            }
            # the batch's labels came from the targets that the previous step's hook saw (the first's from its own)
            labelling_f, labelling_g = fixed.get("labelling", (state.target_f, state.target_g))
            record.update(label_statistics(labelling_g(labelling_f(state.batch)), k, alpha, sigma, unit))
            fixed["labelling"] = (copy.deepcopy(state.target_f), copy.deepcopy(state.target_g))
            records.append(record)
            if state.step % SPECTRUM_EVERY == 0 or state.step + 1 == model.num_steps:
                values = torch.linalg.svdvals(state.online_f.weight.detach()).tolist()
                spectra.append({"step": state.step + 1, "singular_values": values})

    torch.manual_seed(args.seed)
    with torch.enable_grad():
        model.train_representation(train, on_step=on_step)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {
        "data": str(args.data),
        "setting": setting,
        "seed": args.seed,
        "train_patches": list(train.shape),
        "records": records,
        "spectra": spectra,
    }
    (args.out / "trace.json").write_text(json.dumps(summary, indent=1))
    plot(records, spectra, args.out / "trace.png", f"{args.data} {args.setting or 'defaults'} seed {args.seed}")
    for at in sorted({1, 10, 100, len(records) // 2, len(records)} & set(range(1, len(records) + 1))):
        r = records[at - 1]
        print(
            f"step {r['step']:5d} loss {r['loss']:.3f} (pull {r['pull']:.3f}, push {r['push']:.3f}) "
            f"fixed-target {r['fixed_target_loss']:.3f} initial-online {r['initial_online_loss']:.3f} "
            f"w>0.5 {r['pairs_above_half']:.4f} mean w {r['mean_w']:.4f} (P {r['mean_w_pairwise']:.4f}, "
            f"C {r['mean_w_contextual']:.4f}) s {r['bandwidth']:.3g}"
        )
    print(f"wrote {args.out / 'trace.json'} and {args.out / 'trace.png'}")


if __name__ == "__main__":
    main()
