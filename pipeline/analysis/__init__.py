"""Cohort analyses of ``corona-ct run`` outputs, usable without the command line.

- :mod:`.tables`: labels/groups CSV files keyed by study id, input path or folder name.
- :mod:`.cohort`: the studies of one or more ``summary.csv`` files, matched to such a table.
- :mod:`.slices`: the per-slice features (``features.npz``) of a cohort's studies.
- :mod:`.roc_report`, :mod:`.group_report`, :mod:`.cluster_report`: one analysis each,
  from matched studies (or slices) to a report object and its output files.
- :mod:`.degenerate`: when a result says nothing; :mod:`.figures` and :mod:`.documents`:
  the PNG figures and the JSON/Markdown files of every analysis.

The constants here are those the command line shows in its ``--help``; this module imports
nothing, so that ``--help`` loads no numerical library.
"""

from __future__ import annotations

#: summary.csv column analysed when no ``--score`` is given.
DEFAULT_SCORE = "corona_score_cm3"
#: Exit code of an analysis whose result is degenerate (0 with ``--allow-degenerate``).
EXIT_DEGENERATE = 3
