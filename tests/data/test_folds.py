"""Patient-wise stratified folds: no group on both sides, every sample tested once, class ratio kept."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corona_ct.data.folds import group_train_val_split, groups_overlap, stratified_group_kfold
from corona_ct.pipeline.errors import ConfigError


@st.composite
def grouped_labels(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int]:
    """Random patients (1–4 slices each, one label per patient), at least 3 patients per class per fold."""
    n_splits = draw(st.integers(2, 5))
    n_groups = draw(st.integers(6 * n_splits, 60))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    group_labels = rng.integers(0, 2, n_groups)
    group_labels[: 3 * n_splits] = 0
    group_labels[3 * n_splits : 6 * n_splits] = 1
    sizes = rng.integers(1, 5, n_groups)
    groups = np.repeat(np.array([f"patient{i}" for i in range(n_groups)]), sizes)
    labels = np.repeat(group_labels, sizes)
    return labels, groups, n_splits


@settings(max_examples=40, deadline=None)
@given(grouped_labels(), st.integers(0, 1000))
def test_folds_are_group_disjoint_partitions_keeping_both_classes(data: tuple, seed: int) -> None:
    labels, groups, n_splits = data
    folds = stratified_group_kfold(labels, groups, n_splits, seed=seed)
    assert len(folds) == n_splits
    tested = np.concatenate([test for _, test in folds])
    np.testing.assert_array_equal(np.sort(tested), np.arange(labels.size))  # each sample tested exactly once
    overall = labels.mean()
    for train, test in folds:
        assert not groups_overlap(groups, train, test)
        assert np.intersect1d(train, test).size == 0 and train.size + test.size == labels.size
        # Each class has >= 3 groups per fold, so a stratified split gives every test fold both classes
        # and a positive share near the overall one (a group holds at most 4 slices).
        assert set(np.unique(labels[test])) == {0, 1}
        assert abs(labels[test].mean() - overall) <= 0.25


def test_folds_are_deterministic_by_seed_and_change_with_it() -> None:
    rng = np.random.default_rng(0)
    groups = np.repeat([f"g{i}" for i in range(40)], 3)
    labels = np.repeat(rng.integers(0, 2, 40), 3)
    first = stratified_group_kfold(labels, groups, 5, seed=3)
    again = stratified_group_kfold(labels, groups, 5, seed=3)
    other = stratified_group_kfold(labels, groups, 5, seed=4)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(first, other, strict=True))


def test_validation_split_holds_out_about_the_fraction_without_shared_groups() -> None:
    groups = np.repeat([f"g{i}" for i in range(50)], 2)
    labels = np.repeat(np.arange(50) % 2, 2)
    train, val = group_train_val_split(labels, groups, 0.2, seed=0)
    assert not groups_overlap(groups, train, val)
    assert val.size == pytest.approx(20, abs=4)


def test_too_few_groups_for_the_folds_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="fewer than the 5 folds"):
        stratified_group_kfold([0, 0, 1, 1, 1, 1], ["a", "b", "c", "d", "e", "f"], 5)
