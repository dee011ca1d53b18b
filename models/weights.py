"""Default weights shipped with the project in ``models/weights/``.

Each kind is a ``<kind>.safetensors`` file with its ``<kind>.json`` card beside
it. Nothing is downloaded; this only says whether the files are there.
Integrity (SHA-256) and architecture are checked by
:func:`models.checkpoint.load_checkpoint` when the weights are loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from corona_ct.pipeline.errors import ConfigError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

WeightsKind = Literal["classifier", "segmenter"]
_KINDS: tuple[WeightsKind, ...] = ("classifier", "segmenter")


def default_weights(kind: WeightsKind, weights_dir: Path | None = None) -> Path | None:
    """Path of the shipped ``<kind>.safetensors`` (in ``weights_dir``, default :data:`WEIGHTS_DIR`)
    when it and its card exist, else None."""
    if kind not in _KINDS:
        raise ConfigError(f"unknown weights kind {kind!r}; expected one of {', '.join(_KINDS)}")
    tensor_path = (weights_dir or WEIGHTS_DIR) / f"{kind}.safetensors"
    if tensor_path.is_file() and tensor_path.with_suffix(".json").is_file():
        return tensor_path
    return None
