"""The project's exceptions: one small hierarchy, messages a user can act on.

Every message names the file, series or stage concerned and says what to do.
Library code raises these; only the CLI turns them into one-line messages and
exit codes.
"""

from __future__ import annotations


class CoronaCTError(Exception):
    """Base of every error corona-ct raises on purpose."""


class InputError(CoronaCTError):
    """The input cannot be read as a CT study (file, folder, or header problem)."""


class NoImageDataError(InputError):
    """Nothing usable was found: empty folder, no DICOM, no readable slice images."""


class UnsupportedInputError(InputError):
    """Readable, but not something the pipeline can analyse (e.g. MR, X-ray, a single slice)."""


class DecoderMissingError(InputError):
    """Pixel data use a compressed transfer syntax whose decoder package is not installed."""


class GeometryError(InputError):
    """Slice positions, orientations or matrix sizes do not form one regular volume."""


class AmbiguousInputError(InputError):
    """The input holds several studies or patients where exactly one was asked for."""


class InsufficientMemoryError(InputError):
    """A study or image needs more memory than the machine has available (refused before reading)."""


class ConfigError(CoronaCTError):
    """A configuration value or command-line option is invalid."""


class OutputError(CoronaCTError):
    """An output cannot be written (not a folder, read-only, disk full) or the output folder is not usable as asked."""


class MissingDependencyError(CoronaCTError):
    """A third-party package the command needs is not installed."""


class ModelError(CoronaCTError):
    """Model weights are missing, corrupt, or do not match the requested architecture."""


class OutputInUseError(OutputError):
    """Another corona-ct run holds the output folder's lock."""


class StageError(CoronaCTError):
    """A pipeline stage failed on one study; wraps the original exception."""

    def __init__(self, stage: str, study_id: str, message: str) -> None:
        self.stage = stage
        self.study_id = study_id
        super().__init__(f"[{stage}] study {study_id}: {message}")


def one_line(text: str) -> str:
    """``text`` on one line: every run of whitespace (newlines included) becomes one space."""
    return " ".join(text.split())
