"""The ``reconpatch`` command: the project's own tools. Training and export stay on the stock ``anomalib`` CLI."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import BAD_INPUT_ERRORS, error_text


def _weights(args: argparse.Namespace) -> int:
    """``reconpatch weights``: install the chosen EfficientNet-Lite weights into the hub cache."""
    from .weights import write_lite_weights

    for variant in args.variants:
        written = write_lite_weights(variant)
        state = "wrote" if written.changed else "already present"
        print(f"{written.model_name}: {state} {written.path}")
    print("timm and anomalib now load these backbones with pretrained=True, offline.")
    return 0


def _demo_data(args: argparse.Namespace) -> int:
    """``reconpatch demo-data``: write the demo categories and print each one's image counts."""
    from .demo_data import DemoConfig, write_demo_dataset

    config = DemoConfig(image_size=args.image_size, seed=args.seed)
    counts = write_demo_dataset(args.dir, tuple(args.categories), config)
    for category, splits in counts.items():
        summary = ", ".join(f"{split} {n}" for split, n in splits.items())
        print(f"{args.dir}/{category}: {summary}")
    return 0


def _parse_assignments(pairs: Sequence[str]) -> dict:
    """Parse ``name=value`` pairs with YAML values (``num_steps=300``, ``embedding_dim=null``) into a dict."""
    import yaml

    parsed = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            msg = f"--reconpatch expects NAME=VALUE, got '{pair}'"
            raise ValueError(msg)
        parsed[name] = yaml.safe_load(value)
    return parsed


def _compare(args: argparse.Namespace) -> int:
    """``reconpatch compare``: run the comparison; a failed run's process gives exit code 1."""
    from pathlib import Path

    from .compare import CompareSettings, RunFailedError, compare

    settings = CompareSettings(
        data=Path(args.data),
        out=Path(args.out),
        models=args.models,
        backbone=args.backbone,
        layers=args.layers,
        coreset_ratio=args.coreset_ratio,
        image_size=args.image_size[0] if len(args.image_size) == 1 else tuple(args.image_size),
        seeds=args.seed,
        reconpatch_args=_parse_assignments(args.reconpatch),
    )
    try:
        compare(settings, reuse=not args.fresh)
    except RunFailedError as error:
        print(f"reconpatch compare: error: {error}", file=sys.stderr)
        return 1
    return 0


def _predict(args: argparse.Namespace) -> int:
    """``reconpatch predict``: score the input with the exported model."""
    from pathlib import Path

    from .predict import predict

    predict(Path(args.model), Path(args.input), Path(args.out), device=args.device, precision=args.precision)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of every ``reconpatch`` sub-command.

    Reads only torch-free modules (``hub_cache``, ``demo_data``, ``predict``), so parsing the command
    line of ``reconpatch predict`` imports neither torch nor anomalib.

    Returns:
        argparse.ArgumentParser: The parser; each sub-command sets ``run`` to the function that runs it.
    """
    from ..components.hub_cache import LITE_VARIANTS
    from .demo_data import TEXTURES
    from .predict import PRECISIONS

    parser = argparse.ArgumentParser(prog="reconpatch", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    weights = commands.add_parser("weights", help="install offline ImageNet EfficientNet-Lite weights for timm")
    weights.add_argument("--variants", type=int, nargs="+", choices=LITE_VARIANTS, default=list(LITE_VARIANTS))
    weights.set_defaults(run=_weights)

    demo = commands.add_parser("demo-data", help="write the demo data set (MVTec layout) from real texture photos")
    demo.add_argument("dir", help="output folder; one sub-folder per texture category")
    demo.add_argument("--categories", nargs="+", choices=TEXTURES, default=list(TEXTURES))
    demo.add_argument("--image-size", type=int, default=128)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo_data)

    cmp = commands.add_parser("compare", help="train and test ReConPatch and PatchCore on the same data; one report")
    cmp.add_argument(
        "--data",
        required=True,
        help="datamodule YAML (class_path + init_args), e.g. configs/data/*.yaml; category: one, a list or all",
    )
    cmp.add_argument("--models", nargs="+", default=["ReConPatch", "Patchcore"])
    cmp.add_argument("--backbone", default="tf_efficientnet_lite0")
    cmp.add_argument("--layers", nargs="+", default=["blocks.2", "blocks.4"])
    cmp.add_argument("--coreset-ratio", type=float, default=0.1)
    cmp.add_argument(
        "--image-size", type=int, nargs="+", default=[256], metavar="PX", help="a side, or a height and a width"
    )
    cmp.add_argument(
        "--seed", type=int, nargs="+", default=[0], help="one or more seeds; several give means and spreads"
    )
    cmp.add_argument("--reconpatch", nargs="*", default=[], metavar="NAME=VALUE", help="ReConPatch-only arguments")
    cmp.add_argument("--out", required=True, help="output folder for report.md, report.json, roc.png, heatmaps.png")
    cmp.add_argument(
        "--fresh",
        action="store_true",
        help="run every model and seed again (by default a run finished in --out with the same settings is reused)",
    )
    cmp.set_defaults(run=_compare)

    pred = commands.add_parser("predict", help="score images with an exported OpenVINO model; overlays and a CSV")
    pred.add_argument("--model", required=True, help="the exported model.xml (its .bin beside it) or model.onnx")
    pred.add_argument("--input", required=True, help="an image file or a folder of images (searched recursively)")
    pred.add_argument("--out", required=True, help="output folder (never inside the input folder)")
    pred.add_argument("--device", default="CPU", help="OpenVINO device")
    pred.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="f32",
        help="f32 (default): scores as in PyTorch; auto: OpenVINO's choice (bfloat16 on CPUs with AVX-512 BF16 or AMX)",
    )
    pred.set_defaults(run=_predict)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``reconpatch`` console script.

    Bad input (``BAD_INPUT_ERRORS``: bad settings, missing files, existing outputs) is printed as one
    line without a traceback.

    Args:
        argv (Sequence[str] | None): Command-line arguments without the program name; None reads ``sys.argv``.

    Returns:
        int: The exit code: 0 on success, 1 when a ``compare`` run's process failed, 2 for bad input.
    """
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except BAD_INPUT_ERRORS as error:
        print(f"reconpatch {args.command}: error: {error_text(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
