"""Start-up hook (run from ``anomalib_reconpatch.pth``): make ``--model ReConPatch`` resolve in anomalib's CLI.

It only adds a tiny import finder. Nothing is imported until some code imports
``anomalib.models``; right after that module finishes loading, ``anomalib_reconpatch.reconpatch`` is imported
so ``ReConPatch`` and ``ReConPatchEnsemble`` are known ``AnomalibModule`` subclasses before the CLI parses.
"""

import sys

_TRIGGER = "anomalib.models"


class _ReConPatchRegistrar:
    """A ``sys.meta_path`` finder that wraps the loader of ``anomalib.models`` once."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> object:
        if fullname != _TRIGGER:
            return None
        sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        original_exec = spec.loader.exec_module

        def exec_module(module):  # noqa: ANN001, ANN202
            original_exec(module)
            try:
                import anomalib_reconpatch.reconpatch  # noqa: F401 - its models register themselves on import
            except ImportError as error:
                print(f"anomalib-reconpatch: could not register ReConPatch ({error})", file=sys.stderr)

        spec.loader.exec_module = exec_module
        return spec


if not any(isinstance(finder, _ReConPatchRegistrar) for finder in sys.meta_path):
    sys.meta_path.insert(0, _ReConPatchRegistrar())
