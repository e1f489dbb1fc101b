"""Build hooks only (metadata lives in setup.cfg): ship ``anomalib_reconpatch.pth`` into site-packages.

The ``.pth`` line lets ``anomalib --model ReConPatch`` resolve the short name without the user
importing anything; it is listed in the wheel's RECORD, so ``pip uninstall`` removes it.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = Path(__file__).parent / "anomalib_reconpatch.pth"


class BuildPyWithPth(build_py):
    """Regular installs: put the .pth at the root of the built library."""

    def run(self) -> None:
        super().run()
        shutil.copy(PTH, Path(self.build_lib) / PTH.name)


class EditableWheelWithPth(editable_wheel):
    """Editable installs: put the .pth at the root of the editable wheel too."""

    def _install_namespaces(self, installation_dir, pth_prefix) -> None:  # noqa: ANN001
        super()._install_namespaces(installation_dir, pth_prefix)
        shutil.copy(PTH, Path(installation_dir) / PTH.name)


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
