"""The package's layout holds: the model never reaches the tools, no import cycles, old checkpoints load."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import BACKBONE, LAYERS

PACKAGE = Path(__file__).resolve().parents[1] / "anomalib_reconpatch"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every package module that ``path`` imports, at the top or inside a function."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = {target} | {f"{target}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            targets = {alias.name for alias in node.names}
        else:
            continue
        found |= {t for t in targets if t.startswith("anomalib_reconpatch") and module_path(t) is not None}
    return found


def module_path(name: str) -> Path | None:
    relative = Path(*name.split("."))
    for candidate in (PACKAGE.parent / relative.with_suffix(".py"), PACKAGE.parent / relative / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def import_graph() -> dict[str, set[str]]:
    return {module_name(path): imported_modules(path) for path in PACKAGE.rglob("*.py")}


def test_model_and_components_never_import_the_tools() -> None:
    for module, targets in import_graph().items():
        if module.startswith(("anomalib_reconpatch.reconpatch", "anomalib_reconpatch.components")):
            tools = sorted(t for t in targets if t.startswith("anomalib_reconpatch.tools"))
            assert not tools, f"{module} imports {tools}"


def test_components_never_import_the_model() -> None:
    for module, targets in import_graph().items():
        if module.startswith("anomalib_reconpatch.components"):
            assert not [t for t in targets if t.startswith("anomalib_reconpatch.reconpatch")], module


def test_the_package_has_no_import_cycles() -> None:
    graph = import_graph()
    # a package's own __init__ importing its submodules is how packages work, not a cycle
    edges = {m: {t for t in ts if t in graph and not m.startswith(t + ".") and t != m} for m, ts in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in edges[node]:
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join([*path[path.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_importing_the_model_folder_loads_no_tools_module() -> None:
    code = (
        "import sys, anomalib_reconpatch.reconpatch; "
        "print(sorted(m for m in sys.modules if m.startswith('anomalib_reconpatch.tools')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def brick_crops() -> torch.Tensor:
    """Four fixed 128 px crops of scikit-image's brick photograph, as RGB in [0, 1]."""
    from skimage import data

    gray = data.brick().astype(np.float32) / 255.0
    crops = [gray[r : r + 128, c : c + 128] for r, c in ((0, 0), (0, 256), (256, 0), (384, 384))]
    return torch.from_numpy(np.stack([np.stack([crop] * 3) for crop in crops]))


def test_a_checkpoint_of_version_0_1_0_loads_and_scores_as_it_did(lite_weights: None, tmp_path: Path) -> None:
    """The fixture was written by version 0.1.0 (one flat module per file) and scored there.

    Its frozen backbone weights were stripped to keep it small; they are ImageNet's and come back here.
    """
    from anomalib_reconpatch import ReConPatch

    del lite_weights
    checkpoint = torch.load(FIXTURES / "reconpatch_0.1.0.ckpt", weights_only=False)
    backbone = ReConPatch(backbone=BACKBONE, layers=LAYERS).state_dict()
    checkpoint["state_dict"].update({k: v for k, v in backbone.items() if k.startswith("model.feature_extractor.")})
    path = tmp_path / "model.ckpt"
    torch.save(checkpoint, path)
    model = ReConPatch.load_from_checkpoint(path).eval()
    with torch.no_grad():
        out = model(brick_crops())
    expected = json.loads((FIXTURES / "reconpatch_0.1.0.json").read_text())
    assert tuple(model.model.memory_bank.shape) == (245, 152)
    np.testing.assert_allclose(out.pred_score.numpy(), expected["pred_score"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.anomaly_map.amax(dim=(-2, -1)).numpy(), expected["anomaly_map_max"], rtol=1e-4)
    np.testing.assert_allclose(out.anomaly_map.sum(dim=(-2, -1)).numpy(), expected["anomaly_map_sum"], rtol=1e-4)
