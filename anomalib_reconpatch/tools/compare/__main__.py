"""``python -m anomalib_reconpatch.tools.compare JOB RESULT``: one run's process (see ``runner.run_in_process``)."""

import sys
from pathlib import Path

from .runner import run_child

run_child(Path(sys.argv[1]), Path(sys.argv[2]))
