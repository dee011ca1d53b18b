"""Patient-wise (group-aware), class-stratified splits.

A group is a patient, a CT volume or a source figure: all its slices land on the
same side of every split, so a test score never rewards recognising a patient
seen in training. Built on scikit-learn's ``StratifiedGroupKFold`` (shuffled,
seeded), which keeps each fold's class ratio as close to the whole set's as the
group sizes allow.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from sklearn.model_selection import StratifiedGroupKFold

from corona_ct.pipeline.errors import ConfigError

IndexArray = npt.NDArray[np.int64]


def _checked(labels: npt.ArrayLike, groups: Sequence[str] | npt.ArrayLike) -> tuple[IndexArray, IndexArray]:
    label_array = np.asarray(labels).astype(np.int64)
    group_names = np.asarray(groups).astype(str)
    if label_array.ndim != 1 or label_array.shape != group_names.shape:
        raise ConfigError(
            f"labels ({label_array.shape}) and groups ({group_names.shape}) must be 1-D of equal length"
        )
    _, group_ids = np.unique(group_names, return_inverse=True)
    return label_array, group_ids.astype(np.int64)


def stratified_group_kfold(
    labels: npt.ArrayLike, groups: Sequence[str] | npt.ArrayLike, n_splits: int = 5, seed: int = 0
) -> list[tuple[IndexArray, IndexArray]]:
    """``n_splits`` (train_indices, test_indices) pairs; every sample is in exactly one test fold.

    Deterministic for a given seed. Raises :class:`ConfigError` when some class
    has fewer groups than folds (a fold would then miss that class).
    """
    label_array, group_ids = _checked(labels, groups)
    if n_splits < 2:
        raise ConfigError(f"cross-validation needs at least 2 folds, got {n_splits}")
    for label in np.unique(label_array):
        n_groups = np.unique(group_ids[label_array == label]).size
        if n_groups < n_splits:
            raise ConfigError(
                f"class {label} has only {n_groups} patient group(s), fewer than the {n_splits} folds asked "
                "for; use fewer folds or check the grouping rule"
            )
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    placeholder = np.zeros((label_array.size, 1))
    return [
        (train.astype(np.int64), test.astype(np.int64))
        for train, test in splitter.split(placeholder, label_array, group_ids)
    ]


def group_train_val_split(
    labels: npt.ArrayLike, groups: Sequence[str] | npt.ArrayLike, val_fraction: float = 0.2, seed: int = 0
) -> tuple[IndexArray, IndexArray]:
    """One group-disjoint, stratified (train, validation) split holding out about ``val_fraction``."""
    if not 0.0 < val_fraction < 0.5:
        raise ConfigError(f"validation fraction must be in (0, 0.5), got {val_fraction}")
    n_splits = max(2, round(1.0 / val_fraction))
    return stratified_group_kfold(labels, groups, n_splits=n_splits, seed=seed)[0]


def groups_overlap(groups: Sequence[str] | npt.ArrayLike, first: IndexArray, second: IndexArray) -> set[str]:
    """Group names present on both sides of a split (empty for a valid patient-wise split)."""
    names = np.asarray(groups).astype(str)
    return set(names[first].tolist()) & set(names[second].tolist())
