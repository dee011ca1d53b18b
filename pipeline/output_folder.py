"""The output folder's rules: one writer at a time, earlier results kept or replaced only on request.

- ``OUT/.corona-ct.lock`` is held with ``flock`` while a batch writes (:func:`output_lock`); the kernel
  drops it when the holder exits, however it exits (SIGKILL included).
- A folder with an earlier run's results needs ``--resume`` or ``--overwrite`` (:func:`check_output`).
- The ids file links study ids to input paths and is refused inside the (shared) output folder
  (:func:`check_ids_file`).
- A failed write (disk full, read-only, permissions) becomes one :class:`OutputError` that says to
  rerun with ``--resume`` (:func:`writing`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from corona_ct.pipeline.errors import ConfigError, OutputError, OutputInUseError
from corona_ct.pipeline.layout import COMPLETE_NAME, LOCK_NAME, REGISTRY_NAME, REPORT_JSON_NAME, SUMMARY_NAME

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

_HELD_LOCKS: dict[Path, list[int]] = {}  # resolved OUT → [fd, depth]


@contextlib.contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold ``OUT/.corona-ct.lock`` (``flock``, exclusive) while the block runs; re-entrant in one process.

    Raises :class:`OutputInUseError` naming the holder's pid when another process holds it.
    The kernel releases the lock when the holder's process ends, even by SIGKILL.
    """
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(
            f"{output}: cannot create the output folder ({error.strerror or error}); choose another --output"
        ) from error
    key = output.resolve()
    if key in _HELD_LOCKS:
        _HELD_LOCKS[key][1] += 1
        try:
            yield
        finally:
            _HELD_LOCKS[key][1] -= 1
        return
    if fcntl is None:  # pragma: no cover - not POSIX
        log.warning("%s: no file locking on this system; make sure no other run writes here", output)
        yield
        return
    path = output / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 400, 0).decode("utf-8", "replace").strip() or "pid unknown"
        os.close(fd)
        raise OutputInUseError(
            f"{output} is in use by another corona-ct run ({holder}); wait for it to finish, "
            "or write to another --output folder"
        ) from None
    try:
        os.ftruncate(fd, 0)
        started = datetime.now(UTC).isoformat(timespec="seconds")
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n".encode(), 0)
        _HELD_LOCKS[key] = [fd, 1]
        yield
    finally:
        _HELD_LOCKS.pop(key, None)
        os.close(fd)  # releases the lock


def earlier_results(output: Path) -> list[str]:
    """What in ``output`` shows an earlier run (empty when there is none)."""
    if not output.is_dir():
        return []
    found = []
    if (output / SUMMARY_NAME).exists():
        found.append(SUMMARY_NAME)
    studies = sorted(
        p.name for p in output.iterdir() if (p / COMPLETE_NAME).is_file() or (p / REPORT_JSON_NAME).is_file()
    )
    if studies:
        found.append(
            f"{len(studies)} study folder(s) ({', '.join(studies[:3])}{', ...' if len(studies) > 3 else ''})"
        )
    if not found and (output / REGISTRY_NAME).exists():
        found.append(f"{REGISTRY_NAME} (an earlier run started here)")
    return found


def check_output(output: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to run into a folder with earlier results unless ``resume`` or ``overwrite`` says what to do."""
    if resume and overwrite:
        raise ConfigError(
            "--resume and --overwrite exclude each other: keep the earlier results, or replace them"
        )
    if resume or overwrite:
        return
    found = earlier_results(output)
    if found:
        raise ConfigError(
            f"{output} already holds results of an earlier run ({'; '.join(found)}); pass --resume to keep "
            "them (finished studies are reused, summary.csv rows are merged by study id) or --overwrite to "
            "recompute and replace summary.csv with this run's studies only, or choose another --output"
        )


@contextlib.contextmanager
def writing(output: Path) -> Iterator[None]:
    """Turn an operating-system write failure (disk full, read-only, permissions) into an OutputError.

    Both forms (a raw OSError, or the writers' OutputError) end with how to go on: ``--resume``.
    """
    keep = f"then rerun with --resume (studies finished in {output} are kept)"
    try:
        yield
    except OutputError as error:
        raise OutputError(f"{error}; {keep}") from error
    except OSError as error:
        where = error.filename or output
        raise OutputError(
            f"cannot write {where}: {error.strerror or error}; free space or fix the folder's permissions, {keep}"
        ) from error


def check_ids_file(ids_file: Path, output: Path, *, inside_output_ok: bool) -> None:
    """Refuse an ids file inside the output folder (which gets shared) unless explicitly allowed."""
    if inside_output_ok:
        return
    if ids_file.resolve().is_relative_to(output.resolve()):
        raise ConfigError(
            f"--ids-file {ids_file} is inside the output folder {output}, which is meant to be shared; it links "
            "study ids to input paths. Keep it elsewhere, or pass --ids-file-in-output if you mean it"
        )
