"""The figures of a comparison: image-level ROC curves and a grid of anomaly maps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .callbacks import MAP_SIZE, TestRecorder


def plot_roc(recorders: dict[str, TestRecorder], path: Path) -> None:
    """Draw the image-level ROC curves of all models in one figure, each labelled with its AUROC.

    A model whose test set has a single label is left out (its curve is undefined).

    Args:
        recorders (dict[str, TestRecorder]): Each model's recorded test outputs.
        path (Path): The PNG to write.
    """
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(5, 5))
    for name, rec in recorders.items():
        if len(set(rec.labels)) < 2:
            continue
        fpr, tpr, _ = roc_curve(rec.labels, rec.scores)
        ax.plot(fpr, tpr, label=f"{name} (AUROC {roc_auc_score(rec.labels, rec.scores):.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="Image-level ROC")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pick_examples(rec: TestRecorder, count: int = 6) -> list[int]:
    """Pick the test images shown in the heatmap figure, the same ones every time.

    Args:
        rec (TestRecorder): A model's recorded test outputs.
        count (int): Largest number of images.

    Returns:
        list[int]: Indices into the recorder: the first anomalous image (by path) of each folder, up to
        ``count - 2`` of them, then the first two normal images.
    """
    by_folder: dict[str, list[int]] = {}
    for i in sorted(range(len(rec.paths)), key=lambda i: rec.paths[i]):
        by_folder.setdefault(Path(rec.paths[i]).parent.name, []).append(i)
    normal = [i for i in range(len(rec.labels)) if rec.labels[i] == 0]
    anomalous = [ids[0] for ids in by_folder.values() if rec.labels[ids[0]] == 1]
    picked = anomalous[: count - 2] + sorted(normal, key=lambda i: rec.paths[i])[:2]
    return picked[:count]


def find_mask(image_path: str) -> Path | None:
    """Find the MVTec-style ground-truth mask of a test image.

    Args:
        image_path (str): The test image, ``<category>/test/<defect>/<name>``.

    Returns:
        Path | None: ``<category>/ground_truth/<defect>/<name>_mask.png`` or ``<name>.png``, whichever
        exists, or None.
    """
    path = Path(image_path)
    for candidate in (
        path.parents[2] / "ground_truth" / path.parent.name / f"{path.stem}_mask.png",
        path.parents[2] / "ground_truth" / path.parent.name / f"{path.stem}.png",
    ):
        if candidate.is_file():
            return candidate
    return None


def heatmap_figure(recorders: dict[str, TestRecorder]) -> Any:
    """Grid: each row one test image, then each model's anomaly map, then the ground-truth mask.

    Each model's maps share one colour scale, its lowest to its highest value over the whole test
    set, so a good image's map looks as cool as it is (per-image scaling would paint good images red).

    Args:
        recorders (dict[str, TestRecorder]): Each model's recorded test outputs; the images are picked
            from the first one's (:func:`pick_examples`).

    Returns:
        Any: The matplotlib figure.
    """
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    first = next(iter(recorders.values()))
    rows = pick_examples(first)
    names = list(recorders)
    scales = {
        name: (float(min(m.min() for m in rec.maps)), float(max(m.max() for m in rec.maps)))
        for name, rec in recorders.items()
    }
    fig, axes = plt.subplots(
        len(rows), len(names) + 2, figsize=(2.2 * (len(names) + 2), 2.2 * len(rows)), squeeze=False
    )
    for r, index in enumerate(rows):
        image_path = first.paths[index]
        axes[r, 0].imshow(Image.open(image_path).convert("RGB").resize((MAP_SIZE, MAP_SIZE)))
        axes[r, 0].set_title(f"{Path(image_path).parent.name}/{Path(image_path).name}", fontsize=7)
        for c, name in enumerate(names, start=1):
            rec = recorders[name]
            j = rec.paths.index(image_path)
            low, high = scales[name]
            axes[r, c].imshow(rec.maps[j], cmap="jet", vmin=low, vmax=high)
            axes[r, c].set_title(f"{name} {rec.scores[j]:.2f}", fontsize=7)
        mask = find_mask(image_path)
        blank = Image.new("L", (MAP_SIZE, MAP_SIZE))
        axes[r, -1].imshow(Image.open(mask).convert("L").resize((MAP_SIZE, MAP_SIZE)) if mask else blank, cmap="gray")
        axes[r, -1].set_title("ground truth", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return fig


def plot_heatmaps(recorders: dict[str, TestRecorder], path: Path) -> None:
    """Write :func:`heatmap_figure` to ``path``.

    Args:
        recorders (dict[str, TestRecorder]): Each model's recorded test outputs.
        path (Path): The PNG to write.
    """
    import matplotlib.pyplot as plt

    fig = heatmap_figure(recorders)
    fig.savefig(path, dpi=110)
    plt.close(fig)
