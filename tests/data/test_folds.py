"""Patient-wise splits: no group on two sides, every sample tested once, class ratio kept; manifest, volumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corona_ct.data.folds import (
    group_train_val_split,
    groups_overlap,
    hold_out_groups,
    manifest_splits,
    stratified_group_kfold,
    volume_train_val_split,
)
from corona_ct.data.manifest import Manifest, ManifestEntry
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


def _manifest(splits: list[str | None], groups: list[str] | None = None) -> Manifest:
    names = groups or [f"p{i}" for i in range(len(splits))]
    entries = tuple(
        ManifestEntry(Path(f"{i}.png"), i % 2, name, split)
        for i, (name, split) in enumerate(zip(names, splits, strict=True))
    )
    return Manifest(entries, ("normal", "covid"), Path(), "csv")


def test_hold_out_groups_divides_only_the_pool_and_none_at_fraction_zero() -> None:
    groups = np.repeat([f"g{i}" for i in range(40)], 2)
    labels = np.repeat(np.arange(40) % 2, 2)
    pool = np.arange(20, 80)
    train, val = hold_out_groups(pool, labels, groups, 0.25, seed=1)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), pool)
    assert val.size > 0 and not groups_overlap(groups, train, val)
    train, val = hold_out_groups(pool, labels, groups, 0.0)
    np.testing.assert_array_equal(train, pool)
    assert val.size == 0


def test_manifest_splits_follow_the_split_column_when_it_names_training_rows() -> None:
    manifest = _manifest(["train", "train", "val", "test", "train", "val"])
    train, val, test = manifest_splits(manifest, 0.2)
    assert train.tolist() == [0, 1, 4] and val.tolist() == [2, 5] and test.tolist() == [3]


def test_manifest_splits_divide_the_unmarked_rows_by_group_keeping_test_aside() -> None:
    splits: list[str | None] = [None] * 40 + ["test"] * 4
    groups = [f"p{i // 2}" for i in range(44)]
    train, val, test = manifest_splits(_manifest(splits, groups), 0.25, seed=0)
    assert test.tolist() == [40, 41, 42, 43]
    assert sorted(train.tolist() + val.tolist()) == list(range(40))
    assert val.size > 0 and not groups_overlap(groups, train, val)
    train, val, _ = manifest_splits(_manifest(splits, groups), 0.0)
    assert train.tolist() == list(range(40)) and val.size == 0


def test_manifest_splits_refuse_a_group_on_both_sides() -> None:
    with pytest.raises(ConfigError, match="training and the test split"):
        manifest_splits(_manifest(["train", "val", "test"], ["a", "b", "a"]), 0.2)


def test_volume_split_holds_out_whole_volumes_named_or_drawn() -> None:
    groups = ["a"] * 3 + ["b"] * 3 + ["c"] * 3 + ["d"] * 3 + ["e"] * 3
    train, val, description = volume_train_val_split(groups, 0.2, seed=0)
    held = {groups[i] for i in val}
    assert len(held) == 1 and description == f"by volume: {held.pop()}"
    assert not groups_overlap(groups, train, val) and train.size + val.size == 15
    again = volume_train_val_split(groups, 0.2, seed=0)
    assert np.array_equal(again[1], val)  # seeded
    train, val, description = volume_train_val_split(groups, 0.2, val_groups=("b", "d"))
    assert val.tolist() == [3, 4, 5, 9, 10, 11] and description == "by volume: b, d"
    with pytest.raises(ConfigError, match="z"):
        volume_train_val_split(groups, 0.2, val_groups=("z",))


def test_one_volume_holds_out_every_fifth_slice_and_says_so() -> None:
    train, val, description = volume_train_val_split(["v"] * 12, 0.2)
    assert val.tolist() == [4, 9] and train.size == 10
    assert description == "every fifth slice of one volume"
    _, val, description = volume_train_val_split(["a", "b"] * 5, 0.2, val_groups=("a", "b"))
    assert val.tolist() == [4, 9] and description.startswith("every fifth slice (")
