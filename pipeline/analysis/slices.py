"""The evaluated slices of a cohort, from each study's ``features.npz`` of ``corona-ct run``.

Per slice: where it came from (study, slice index, z in mm), the classifier probability
and its gradient-weighted features (pooled ResNet-50 layer4 activations × Grad-CAM channel
weights). Thumbnails and Grad-CAM maps are read only for the slices that are shown.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from corona_ct.pipeline.analysis.cohort import Cohort
from corona_ct.pipeline.errors import InputError
from corona_ct.pipeline.layout import FEATURE_KEYS, FEATURES_NAME

#: A key slice's thumbnail and Grad-CAM map (uint8, 0–255), None where features.npz has none.
KeyImage = tuple[np.ndarray | None, np.ndarray | None]


@dataclass
class SliceTable:
    """Every clustered slice: where it came from and its gradient-weighted features."""

    study_id: list[str]
    slice_index: npt.NDArray[np.int64]
    z_mm: npt.NDArray[np.float64]
    probability: npt.NDArray[np.float32]
    weighted: npt.NDArray[np.float32]  # (n, channels) features × Grad-CAM weights
    row_in_file: npt.NDArray[np.int64]  # row of the slice inside its study's features.npz
    skipped: dict[str, str]  # study_id -> reason


def features_path(cohort: Cohort, study_id: str) -> Path:
    """``OUT/<study_id as run wrote it>/features.npz`` of a cohort study."""
    return cohort.folder_of[study_id] / cohort.raw_id[study_id] / FEATURES_NAME


def load_slices(cohort: Cohort, *, positive_only: bool, threshold: float) -> SliceTable:
    """Read features.npz of every successful study; studies without usable slices are listed as skipped.

    With ``positive_only`` only slices with probability ≥ ``threshold`` are kept.
    """
    ids: list[str] = []
    parts: dict[str, list[np.ndarray]] = {k: [] for k in (*FEATURE_KEYS, "row")}
    skipped: dict[str, str] = dict.fromkeys(cohort.failed, "failed in `corona-ct run`")
    skipped |= {s: f"not assessable in `corona-ct run`: {r}" for s, r in cohort.not_assessable.items()}
    for study_id in cohort.studies:
        path = features_path(cohort, study_id)
        if not path.is_file():
            not_assessable = study_id in cohort.included_not_assessable
            skipped[study_id] = "not assessable: nothing was classified" if not_assessable else f"no {path}"
            continue
        try:
            with np.load(path, allow_pickle=False) as npz:
                missing = [k for k in FEATURE_KEYS if k not in npz.files]
                if missing:
                    raise InputError(f"{path}: missing array(s) {', '.join(missing)}; rerun `corona-ct run`")
                arrays = {k: npz[k] for k in FEATURE_KEYS}
        except (OSError, ValueError) as error:
            raise InputError(
                f"{path}: cannot read features ({error}); rerun `corona-ct run` for this study"
            ) from error
        n = arrays["slice_index"].shape[0]
        if (
            arrays["features"].ndim != 2
            or arrays["features"].shape != arrays["weights"].shape
            or any(arrays[k].shape[0] != n for k in FEATURE_KEYS)
        ):
            raise InputError(
                f"{path}: inconsistent shapes "
                + ", ".join(f"{k} {arrays[k].shape}" for k in FEATURE_KEYS)
                + "; rerun `corona-ct run` for this study"
            )
        keep = arrays["probability"] >= threshold if positive_only else np.ones(n, dtype=bool)
        if not keep.any():
            skipped[study_id] = "no positive slice" if positive_only and n else "no evaluated slice"
            continue
        ids.extend([study_id] * int(keep.sum()))
        for k in ("slice_index", "z_mm", "probability"):
            parts[k].append(arrays[k][keep])
        # Multiply per study, so the unweighted (n, 2048) arrays never pile up for the whole cohort.
        parts["features"].append(
            arrays["features"][keep].astype(np.float32) * arrays["weights"][keep].astype(np.float32)
        )
        parts["row"].append(np.flatnonzero(keep))
    if not ids:
        expected = features_path(cohort, next(iter(cohort.studies)))
        raise InputError(
            f"empty cohort: no slice to cluster ({len(cohort.studies)} studies; e.g. expected {expected}"
            + (f", slices with probability ≥ {threshold}" if positive_only else "")
            + ")"
        )
    widths = {p.shape[1] for p in parts["features"]}
    if len(widths) > 1:
        raise InputError(
            f"features.npz files have different feature sizes {sorted(widths)}; were they made by one model?"
        )
    return SliceTable(
        study_id=ids,
        slice_index=np.concatenate(parts["slice_index"]).astype(np.int64),
        z_mm=np.concatenate(parts["z_mm"]).astype(np.float64),
        probability=np.concatenate(parts["probability"]).astype(np.float32),
        weighted=np.concatenate(parts["features"]),
        row_in_file=np.concatenate(parts["row"]).astype(np.int64),
        skipped=skipped,
    )


def load_key_images(cohort: Cohort, table: SliceTable, rows: Sequence[int]) -> dict[int, KeyImage]:
    """Thumbnails and CAMs of the given table rows only: the cohort's images would not fit in memory."""
    by_study: dict[str, list[int]] = {}
    for i in rows:
        by_study.setdefault(table.study_id[i], []).append(i)
    images: dict[int, KeyImage] = {}
    for study_id, idx in by_study.items():
        with np.load(features_path(cohort, study_id), allow_pickle=False) as npz:
            thumbnails = npz["thumbnails"] if "thumbnails" in npz.files else None
            cams = npz["cams"] if "cams" in npz.files else None
        for i in idx:
            row = int(table.row_in_file[i])
            images[i] = (
                thumbnails[row] if thumbnails is not None else None,
                cams[row] if cams is not None else None,
            )
    return images
