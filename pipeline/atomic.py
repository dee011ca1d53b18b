"""Atomic file writes: a reader never sees a half-written output, even after a crash."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a hidden temporary path beside ``path``; on success it replaces ``path`` in one step.

    The temporary name keeps the final suffixes (``.nii.gz``, ``.npz``) so that
    libraries choosing a format from the name behave the same. On failure the
    temporary file is removed and ``path`` is left untouched. The parent folder is
    created when missing.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes[-2:]) if target.name.endswith(".nii.gz") else target.suffix
    stem = target.name[: len(target.name) - len(suffix)]
    tmp = target.with_name(f".{stem}.{uuid.uuid4().hex[:12]}.tmp{suffix}")
    try:
        yield tmp
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write bytes atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
