"""Thread-count environment variables for the BLAS and OpenMP libraries (no heavy imports).

OpenBLAS, MKL and OpenMP read these once, when they are loaded: ``cli.main`` sets them
from ``--threads`` before numpy is imported; :func:`corona_ct.pipeline.device.set_threads`
also limits pools that are already loaded.
"""

from __future__ import annotations

import os

#: Read by OpenMP, OpenBLAS, MKL, numexpr and Apple Accelerate when they load.
THREAD_ENV_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)


def set_thread_env(count: int) -> None:
    """Set every variable of :data:`THREAD_ENV_VARS` to ``count`` (libraries loaded later, worker processes)."""
    for variable in THREAD_ENV_VARS:
        os.environ[variable] = str(count)
