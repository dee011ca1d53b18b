"""Atomic file writes: a reader never sees a half-written output, even after a crash.

A write goes to a hidden temporary file beside the target (``.NAME.<12 hex>.tmp<suffix>``),
is flushed to disk (``fsync``), renamed over the target in one step, and the folder
entry is flushed too. A full disk, a read-only file system or a missing permission
becomes an ``OutputError`` naming the path and what to do; the temporary file is
removed. Temporaries left by a killed run are removed by ``remove_stale_temporaries``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import re
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePath
from typing import Any

from corona_ct.pipeline.errors import OutputError

log = logging.getLogger(__name__)

#: Names ``atomic_path`` gives its temporary files (hidden, 12 hex digits, ``.tmp`` + the final suffixes).
TEMPORARY_NAME = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp(\.[A-Za-z0-9]+)*$")

#: What to do, by the system's reason (the reason itself is quoted from the OS).
_ADVICE = {
    errno.ENOSPC: "free space on that disk or choose another --output",
    errno.EDQUOT: "free space within your quota or choose another --output",
    errno.EROFS: "choose an --output on a writable file system",
    errno.EACCES: "choose a folder you can write to with --output, or fix its permissions",
    errno.EPERM: "choose a folder you can write to with --output, or fix its permissions",
    errno.ENOTDIR: "a file stands where a folder is needed; remove it or choose another --output",
    errno.EEXIST: "a file stands where a folder is needed; remove it or choose another --output",
}


def output_error(path: str | Path, error: OSError) -> OutputError:
    """An ``OutputError`` naming ``path``, the system's reason and what to do."""
    advice = _ADVICE.get(error.errno or 0, "check the output folder")
    return OutputError(f"cannot write {path}: {error.strerror or error}; {advice}")


def is_output_problem(error: OSError) -> bool:
    """True for the write errors the user must fix (disk full, read-only, permissions)."""
    return (error.errno or 0) in _ADVICE


def _fsync_file(path: Path) -> None:
    """Flush a written file's data to disk (a no-op where the file cannot be opened for it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Flush a folder entry (the rename) to disk; silently skipped where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not support fsync on folders
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a hidden temporary path beside ``path``; on success it replaces ``path`` in one step.

    The temporary name keeps the final suffixes (``.nii.gz``, ``.npz``) so that
    libraries choosing a format from the name behave the same. The data are
    fsynced before the rename and the folder after it. On failure the temporary
    file is removed and ``path`` is left untouched; a full disk, read-only file
    system or denied permission is raised as ``OutputError`` naming ``path``.
    The parent folder is created when missing.
    """
    target = Path(path)
    suffix = "".join(target.suffixes[-2:]) if target.name.endswith(".nii.gz") else target.suffix
    stem = target.name[: len(target.name) - len(suffix)]
    tmp = target.with_name(f".{stem}.{uuid.uuid4().hex[:12]}.tmp{suffix}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        _fsync_file(tmp)
        tmp.replace(target)
        _fsync_folder(target.parent)
    except OSError as error:
        if is_output_problem(error):
            raise output_error(target, error) from error
        raise
    finally:
        with contextlib.suppress(OSError):
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


def jsonable(value: Any) -> Any:
    """Plain JSON values: numpy scalars and arrays to Python, paths to text, NaN and ±inf to null."""
    if isinstance(value, Mapping):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(item) for item in value]
    if hasattr(value, "tolist") and not isinstance(value, str | bytes):  # numpy array or scalar
        return jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, PurePath):
        return str(value)
    return value


def write_json(path: str | Path, value: Any, *, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """Write ``value`` as JSON atomically: the project's one JSON writer (no NaN ever reaches a file)."""
    text = json.dumps(jsonable(value), indent=indent, sort_keys=sort_keys, allow_nan=False)
    return write_text(path, text + "\n")


def remove_stale_temporaries(folder: str | Path) -> int:
    """Remove the temporary files a killed run left under ``folder`` (any depth); returns how many.

    Only names ``atomic_path`` makes (``.NAME.<12 hex>.tmp…``) are touched. Call it
    before a run starts writing, never while another run writes into the same folder.
    """
    root = Path(folder)
    if not root.is_dir():
        return 0
    removed = 0
    for current, _dirs, files in os.walk(root):
        for name in files:
            if TEMPORARY_NAME.match(name):
                try:
                    (Path(current) / name).unlink()
                except FileNotFoundError:
                    continue
                removed += 1
    if removed:
        log.warning("%s: removed %d unfinished temporary file(s) left by an interrupted run", root, removed)
    return removed


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks of ``chunk_bytes`` bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()
