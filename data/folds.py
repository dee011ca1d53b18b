"""Patient-wise (group-aware) splits: stratified K folds, validation hold-outs, manifest splits.

A group is a patient, a CT volume or a source figure: all its slices land on the
same side of every split, so a test score never rewards recognising a patient
seen in training. Built on scikit-learn's ``StratifiedGroupKFold`` (shuffled,
seeded), which keeps each fold's class ratio as close to the whole set's as the
group sizes allow. Segmentation volumes carry no class: :func:`volume_train_val_split`
draws whole volumes at random.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from sklearn.model_selection import StratifiedGroupKFold

from corona_ct.data.manifest import Manifest
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


def hold_out_groups(
    indices: npt.ArrayLike, labels: npt.ArrayLike, groups: Sequence[str] | npt.ArrayLike, val_fraction: float,
    seed: int = 0,
) -> tuple[IndexArray, IndexArray]:  # fmt: skip
    """(train, validation) subsets of ``indices`` by :func:`group_train_val_split`; no validation when 0.

    ``labels`` and ``groups`` cover the whole data set; ``indices`` select the pool to divide.
    """
    pool = np.asarray(indices, dtype=np.int64)
    if val_fraction <= 0:
        return pool, np.zeros(0, dtype=np.int64)
    fit, held = group_train_val_split(
        np.asarray(labels)[pool], np.asarray(groups).astype(str)[pool], val_fraction, seed=seed
    )
    return pool[fit], pool[held]


def manifest_splits(
    manifest: Manifest, val_fraction: float, seed: int = 0
) -> tuple[IndexArray, IndexArray, IndexArray]:
    """(train, validation, test) row indices of a manifest; no patient group on two sides.

    The manifest's ``split`` column wins when it names training rows. Otherwise the rows
    not marked ``test`` are divided by patient group, ``val_fraction`` of them held out
    for validation (none when 0). Raises :class:`ConfigError` when a group is shared.
    """
    labels, groups = manifest.labels, manifest.groups
    test = manifest.split_indices("test")
    if len(manifest.split_indices("train")):
        train, val = manifest.split_indices("train"), manifest.split_indices("val")
    else:
        pool = np.flatnonzero([entry.split != "test" for entry in manifest.entries])
        train, val = hold_out_groups(pool, labels, groups, val_fraction, seed=seed)
    for name, other in (("validation", val), ("test", test)):
        shared = groups_overlap(groups, train, other)
        if shared:
            raise ConfigError(
                f"{len(shared)} patient group(s) are in both the training and the {name} split "
                f"(e.g. {sorted(shared)[0]}); fix the split column of the manifest"
            )
    return train, val, test


def volume_train_val_split(
    groups: Sequence[str] | npt.ArrayLike, val_fraction: float, seed: int = 0, val_groups: Sequence[str] = ()
) -> tuple[IndexArray, IndexArray, str]:
    """(train, validation, description) slice indices holding out whole volumes (groups).

    ``val_groups`` names the held-out volumes; empty draws ``val_fraction`` of them (at
    least one) at random. With a single volume every fifth slice is held out instead:
    neighbouring slices are correlated, so that validation is optimistic, which the
    description says (it goes into the model card).
    """
    group_names = np.asarray(groups).astype(str)
    unique_groups = np.unique(group_names)
    rng = np.random.default_rng(seed)
    n_val = max(1, round(val_fraction * unique_groups.size)) if unique_groups.size > 1 else 0
    held_out = set(val_groups) or set(rng.permutation(unique_groups)[:n_val].tolist())
    unknown = held_out - set(unique_groups.tolist())
    if unknown:
        raise ConfigError(f"validation group(s) {', '.join(sorted(unknown))} are not in the data")
    is_val = np.isin(group_names, list(held_out))
    description = f"by volume: {', '.join(sorted(held_out))}"
    if not is_val.any() or is_val.all():
        is_val = np.arange(group_names.size) % 5 == 4
        description = (
            "every fifth slice of one volume" if unique_groups.size < 2
            else "every fifth slice (the validation groups left no training volume)"
        )  # fmt: skip
    return np.flatnonzero(~is_val).astype(np.int64), np.flatnonzero(is_val).astype(np.int64), description
