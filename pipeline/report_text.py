"""The wording the reports share: notices, how probabilities and HU ranges read, fixed sentences.

report.json (:mod:`pipeline.report`, :mod:`pipeline.model_limits`) and report.html
(:mod:`pipeline.report_html`) both say these things; they say them in the same words.
"""

from __future__ import annotations

import math

RESEARCH_NOTICE = "Research use only. Not a medical device; not for diagnosis or treatment decisions."
UNTRAINED_NOTICE = (
    "UNTRAINED WEIGHTS: the classifier has random weights; probabilities, heat maps and "
    "Corona scores in this report are meaningless."
)
#: Probabilities below this read "< 0.001" (in HTML and in figure text; report.json keeps the number).
SMALLEST_SHOWN_PROBABILITY = 0.001
#: Sentence for a model card without validation figures.
NO_VALIDATION = "no validation figures recorded for these weights"


def probability_text(value: float | None) -> str:
    """A probability for reading: 3 decimals, "< 0.001" below that, "—" when absent."""
    if value is None or not math.isfinite(value):
        return "—"
    if 0 <= value < SMALLEST_SHOWN_PROBABILITY:
        return f"< {SMALLEST_SHOWN_PROBABILITY:g}"
    return f"{value:.3f}"


def hu_range_text(low: float, high: float) -> str:
    """``−750…−300 HU`` from config values (typographic minus, explicit plus)."""

    def one(value: float) -> str:
        text = f"{value:g}"
        return text.replace("-", "−") if value < 0 else (f"+{text}" if value > 0 else text)

    return f"{one(low)}…{one(high)} HU"


def empty_map_sentence(n: int) -> str | None:
    """The statement made when positive slices have an empty Grad-CAM map; None when there are none."""
    if n <= 0:
        return None
    has = "slice has" if n == 1 else "slices have"
    its = "its" if n == 1 else "their"
    return f"{n} positive {has} an empty Grad-CAM map: {its} evidence is not localised"
