"""``pipeline.memory.hold_freed_memory``: freed arrays are reused without page faults, and what the heap
holds free still counts as available. Each check runs in a fresh process (the setting is per process)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from corona_ct.pipeline.memory import _glibc

pytestmark = pytest.mark.skipif(
    _glibc() is None, reason="hold_freed_memory acts on glibc's malloc only (Linux)"
)

#: Allocates and touches a 100 MB array three times after a first one, and prints the page faults taken.
REALLOCATE = """
import resource, sys
import numpy as np
from corona_ct.pipeline.memory import hold_freed_memory
if sys.argv[1] == "hold":
    assert hold_freed_memory()
array = np.ones(25_000_000, np.float32); del array
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    array = np.ones(25_000_000, np.float32); del array
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

#: Frees a 200 MB array and prints what the heap holds free (bytes).
HELD = """
import numpy as np
from corona_ct.pipeline.memory import _held_free_bytes, hold_freed_memory
assert hold_freed_memory()
array = np.ones(50_000_000, np.float32); del array
print(_held_free_bytes())
"""


def _run(script: str, *args: str) -> int:
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


def test_a_freed_volume_sized_array_is_reused_without_page_faults() -> None:
    plain, held = _run(REALLOCATE, "plain"), _run(REALLOCATE, "hold")
    assert plain >= 100, f"glibc's default should fault a fresh 100 MB array in; took {plain} faults"
    assert held <= 10, f"with the freed memory held, reallocating took {held} page faults"


def test_memory_the_heap_holds_free_counts_as_available() -> None:
    assert _run(HELD) >= 190e6
