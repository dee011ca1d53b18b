"""Progress reporting: bars on a terminal, one log line per study or epoch elsewhere.

Lines go to the ``corona_ct.progress`` logger at INFO. The command line shows them on
stderr (:func:`log_progress_to_stderr`); a library user sees them with
``logging.basicConfig(level=logging.INFO)``. Progress bars are drawn only when stderr is
a terminal, so batch jobs and CI logs get the lines instead of bar redraws.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Mapping
from typing import TextIO

PROGRESS_LOGGER = "corona_ct.progress"
progress_log = logging.getLogger(PROGRESS_LOGGER)

#: How epoch-row keys (history.csv columns) are written in an epoch line, in this order.
_EPOCH_LABELS = {
    "train_loss": "train loss",
    "train_acc": "train acc",
    "val_loss": "val loss",
    "val_acc": "val acc",
    "val_auc": "val AUC",
    "val_dice": "val Dice",
    "monitor_acc": "monitor acc",
    "monitor_auc": "monitor AUC",
}


def bars_wanted(requested: bool | None = None, stream: TextIO | None = None) -> bool:
    """Draw progress bars? ``requested`` when given, else only when ``stream`` (stderr) is a terminal."""
    if requested is not None:
        return requested
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _formatted(value: object, digits: int) -> str:
    """``value`` with ``digits`` decimals; "—" for None, "nan" for NaN."""
    if value is None:
        return "—"
    number = float(str(value))
    return "nan" if math.isnan(number) else f"{number:.{digits}f}"


def study_line(
    position: str,
    study_id: str,
    status: str,
    case_probability: float | None,
    corona_score_cm3: float | None,
    seconds: float,
) -> str:
    """``study 3/12 P002: ok, p=0.91, score 34.2 cm3, 61.3 s`` (no numbers for a study without a call)."""
    parts = [status]
    if case_probability is not None:
        parts.append(f"p={_formatted(case_probability, 2)}")
    if corona_score_cm3 is not None:
        parts.append(f"score {_formatted(corona_score_cm3, 1)} cm3")
    parts.append(f"{seconds:.1f} s")
    where = f"study {position} " if position else "study "
    return f"{where}{study_id}: {', '.join(parts)}"


def epoch_line(epoch: int, total_epochs: int, row: Mapping[str, float], seconds: float) -> str:
    """``epoch 4/16: train loss 0.412, val AUC 0.830, 38.1 s`` from one history row."""
    parts = [f"{label} {_formatted(row[key], 3)}" for key, label in _EPOCH_LABELS.items() if key in row]
    parts.append(f"{seconds:.1f} s")
    return f"epoch {epoch}/{total_epochs}: {', '.join(parts)}"


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (tests replace it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def log_progress_to_stderr() -> None:
    """Show progress lines as plain ``message`` lines on stderr (the CLI calls this once)."""
    if not any(isinstance(handler, _CurrentStderr) for handler in progress_log.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        progress_log.addHandler(handler)
    progress_log.setLevel(logging.INFO)
    progress_log.propagate = False
