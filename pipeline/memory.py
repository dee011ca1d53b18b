"""Memory admission: refuse a study or image whose header declares more data than the machine can hold.

The readers (``ingest/nifti.py``, ``ingest/dicom/read.py``, ``ingest/slices.py``) estimate
from the header alone, before any pixel is read, how many bytes the pipeline will
need for one input, and call :func:`require_memory`. A refusal is an
``InsufficientMemoryError`` (an ``InputError``): inside a batch it fails that study
only, instead of the whole process dying of an out-of-memory kill.

The factors are measured, not guessed: the peak resident memory of ``analyze_study``
+ ``write_study_outputs`` above the loaded models (CPU), divided by the float32
volume's size, was 9.9 on a 133-slice 512×512 CT (COVID-CT-MD P002: 139 MB volume,
1.38 GB more at the peak); ``VOLUME_WORKING_FACTOR`` adds the reader's own copy and
a margin. ``explain`` on one 2D image holds the float32 image, its windowed copy, the lung
mask, the map pasted back, the RGBA float64 colour map and the blended RGB float64
overlay at full size: measured 79.5 bytes per pixel above the loaded models on a
3000×3000 PNG; ``SLICE_BYTES_PER_PIXEL`` keeps a margin.

:func:`hold_freed_memory` (``runtime.hold_freed_memory``) keeps memory that numpy and torch free in
the process for the next array, instead of handing every large block back to the kernel
and faulting it in, page by page, at the next allocation (docs/validation.md, issue 13).
Memory held that way still counts as available here.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import resource
import sys
from pathlib import Path

from corona_ct.pipeline.errors import InsufficientMemoryError

#: Peak bytes the pipeline needs per byte of the float32 volume (measured 9.9, plus the read copy).
VOLUME_WORKING_FACTOR = 12.0
#: Peak bytes ``explain`` needs per pixel of one 2D image (measured 79.5).
SLICE_BYTES_PER_PIXEL = 96
#: Environment variable that overrides the detected available memory, in bytes (tests, cluster jobs).
AVAILABLE_OVERRIDE_ENV = "CORONA_CT_AVAILABLE_MEMORY"

_GB = 1e9
#: glibc ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
#: Free memory at the top of the heap above which glibc hands it back (bytes): the largest ``int``.
HELD_TRIM_THRESHOLD = 2**31 - 1


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (all ``size_t``)."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")
    ]  # fmt: skip


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    if hasattr(libc, "mallinfo2"):  # glibc 2.33+
        libc.mallinfo2.restype = _MallInfo2
    return libc if hasattr(libc, "mallopt") else None


@functools.cache
def hold_freed_memory() -> bool:
    """Make glibc's malloc serve large blocks from one heap and keep what is freed (up to 2 GB at the
    top) for the next allocation, instead of mapping each block afresh and unmapping it when freed.

    Every stage allocates and frees volume-sized arrays (50–100 MB for a 133-slice CT); mapped
    afresh, each one is faulted in page by page. One heap for all threads (no per-thread arenas,
    whose extra heaps are unmapped as soon as they empty) lets the z-slab threads of
    :mod:`pipeline.morphology` reuse it too. On P002 the faults cost up to half of the severity
    stage and of ``keep_plausible_lung`` in kernel time (docs/validation.md). The process then
    keeps its peak memory until it ends. Applied once per process; True when applied, False where
    the C library is not glibc.
    """
    libc = _glibc()
    if libc is None:
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, HELD_TRIM_THRESHOLD))
    return all(bool(libc.mallopt(parameter, value)) for parameter, value in settings)


def _held_free_bytes() -> int:
    """Bytes glibc's heap holds free for reuse (``mallinfo2().fordblks``); 0 elsewhere."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return 0
    return int(libc.mallinfo2().fordblks)


def _meminfo_available() -> int | None:
    """``MemAvailable`` of /proc/meminfo in bytes (Linux), else None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_available() -> int | None:
    """Room left under a cgroup v2 memory limit (containers, batch jobs) in bytes, else None."""
    root = Path("/sys/fs/cgroup")
    try:
        limit_text = (root / "memory.max").read_text().strip()
        if limit_text == "max":
            return None
        return max(0, int(limit_text) - int((root / "memory.current").read_text().strip()))
    except (OSError, ValueError):
        return None


def _address_space_available() -> int | None:
    """Room left under this process's address-space limit (``ulimit -v``) in bytes, else None."""
    try:
        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit == resource.RLIM_INFINITY:
            return None
        with open("/proc/self/statm", encoding="ascii") as handle:
            used = int(handle.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
    return max(0, limit - used)


def available_memory_bytes() -> int | None:
    """Memory this process can still use, in bytes: the smallest of free RAM (``MemAvailable``),
    the room under a cgroup limit and the room under ``ulimit -v``, plus what the process's heap
    holds free for reuse (:func:`hold_freed_memory`).

    ``CORONA_CT_AVAILABLE_MEMORY`` (bytes) overrides the detection. None when nothing
    can be measured (then nothing is refused).
    """
    override = os.environ.get(AVAILABLE_OVERRIDE_ENV)
    if override:
        try:
            return int(float(override))
        except ValueError:
            pass
    candidates = [_meminfo_available(), _cgroup_available(), _address_space_available()]
    if candidates[0] is None:
        with contextlib.suppress(ValueError, OSError, AttributeError):
            candidates[0] = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    known = [value for value in candidates if value is not None]
    return min(known) + _held_free_bytes() if known else None


def volume_bytes_needed(n_voxels: int) -> int:
    """Peak bytes the pipeline needs for a volume of ``n_voxels`` voxels (float32 × working factor)."""
    return int(n_voxels * 4 * VOLUME_WORKING_FACTOR)


def slice_bytes_needed(n_pixels: int) -> int:
    """Peak bytes ``explain`` needs for one 2D image of ``n_pixels`` pixels."""
    return n_pixels * SLICE_BYTES_PER_PIXEL


def require_memory(needed_bytes: int, what: str, declared: str) -> None:
    """Raise ``InsufficientMemoryError`` when ``needed_bytes`` exceed the available memory.

    ``what`` names the file or series, ``declared`` the header's size (e.g. "600×2048×2048 voxels").
    """
    available = available_memory_bytes()
    if available is None or needed_bytes <= available:
        return
    raise InsufficientMemoryError(
        f"{what}: its header declares {declared}, which needs about {needed_bytes / _GB:.1f} GB of memory to "
        f"analyse, but only {available / _GB:.1f} GB is available; refused before reading it. Check that "
        "the header is right, free memory, or use a machine with more memory"
    )
