"""Source-matched training slices: the inference crop, real and counterfactual positives, masks."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from corona_ct.data.phantom import make_phantom
from corona_ct.data.source_matched import UNKNOWN_MASK, PreparedSlices, ctmd_infection_labels, volume_slices
from corona_ct.pipeline.config import PipelineConfig
from corona_ct.pipeline.errors import ConfigError, InputError
from corona_ct.pipeline.preprocess import evaluable_slices, lung_bounding_box, to_model_input, window

SIZE = 64


#: The test phantom's anatomy and noise; with ``lesions="ggo", lesion_volume_ml=40`` it is ``phantom_volume``.
small_phantom = partial(make_phantom, seed=5, shape=(12, 96, 96), spacing_mm=(5.0, 3.0, 3.0))


@pytest.fixture(scope="module")
def phantom_volume() -> tuple[object, np.ndarray, np.ndarray]:
    phantom = small_phantom(lesions="ggo", lesion_volume_ml=40)
    return phantom.to_volume("ph"), np.asarray(phantom.lung_labels), np.asarray(phantom.lesion_mask)


def _prepared(volume: Any, lungs: np.ndarray, **options: Any) -> PreparedSlices:
    """``volume_slices`` of the test phantom with the default config, seed 0 and ``options``."""
    return volume_slices(volume, lungs, PipelineConfig(), SIZE, "ph", np.random.default_rng(0), **options)


def test_clean_slices_get_a_counterfactual_twin_with_a_mask(phantom_volume: tuple) -> None:
    volume, lungs, _ = phantom_volume
    config = PipelineConfig()
    prepared = volume_slices(volume, lungs, config, SIZE, "ph", np.random.default_rng(0))
    clean = np.array([k == "clean" for k in prepared.kinds])
    twins = np.array([k == "counterfactual" for k in prepared.kinds])
    assert clean.sum() >= 5 and clean.sum() - 2 <= twins.sum() <= clean.sum()  # tiny apex lungs get none
    assert (prepared.labels[clean] == 0).all() and (prepared.labels[twins] == 1).all()
    assert (prepared.masks[clean] == 0).all()
    assert all(m.any() for m in prepared.masks[twins])
    # each twin follows its clean slice, and differs from it only where the lesion went
    first = int(np.flatnonzero(twins)[0])
    difference = (prepared.images[first] - prepared.images[first - 1]).abs().float().numpy()
    assert difference[prepared.masks[first] == 1].mean() > 5 * difference[prepared.masks[first] == 0].mean()


def test_slices_are_cropped_like_inference(phantom_volume: tuple) -> None:
    volume, lungs, _ = phantom_volume
    config = PipelineConfig()
    prepared = volume_slices(
        volume, lungs, config, SIZE, "ph", np.random.default_rng(0), counterfactual=False
    )
    box = lung_bounding_box(lungs > 0, config.roi)
    expected = to_model_input(window(volume.array, "HU", config.window), box, SIZE)[:, 0]
    z = np.flatnonzero((lungs > 0).sum(axis=(1, 2)) >= 1)
    matches = [
        np.allclose(prepared.images[i].float(), expected[zz], atol=2e-3)
        for i, zz in enumerate(z[: len(prepared)])
    ]
    assert all(matches)


def test_lung_only_input_is_air_outside_the_lungs_and_recorded(phantom_volume: tuple, tmp_path: Path) -> None:
    volume, lungs, _ = phantom_volume
    config = PipelineConfig().replace({"roi.mask_outside_lungs": True})
    prepared = volume_slices(volume, lungs, config, SIZE, "ph", np.random.default_rng(0))
    assert prepared.roi == "lung-bbox-masked"
    box = lung_bounding_box(lungs > 0, config.roi)
    z = np.flatnonzero(evaluable_slices(lungs > 0, config.roi))[0]
    windowed = window(volume.array[z : z + 1], "HU", config.window)
    expected = to_model_input(windowed, box, SIZE, lungs[z : z + 1] > 0)[0, 0]
    assert np.allclose(prepared.images[0].float(), expected, atol=2e-3)
    far_from_lung = to_model_input((lungs[z : z + 1] > 0).astype(np.float32), box, SIZE)[0, 0] == 0
    assert far_from_lung.any() and (prepared.images[0][far_from_lung] == 0).all()
    prepared.save(tmp_path / "masked.safetensors")
    assert PreparedSlices.load(tmp_path / "masked.safetensors").roi == "lung-bbox-masked"
    boxed = volume_slices(volume, lungs, PipelineConfig(), SIZE, "ph", np.random.default_rng(0))
    with pytest.raises(InputError, match="different inputs"):
        PreparedSlices.concat([prepared, boxed])


def test_real_positives_have_unknown_masks_and_phantom_lesions_exact_ones(phantom_volume: tuple) -> None:
    volume, lungs, lesion = phantom_volume
    config = PipelineConfig()
    infected = np.zeros(volume.n_slices, np.int64)
    infected[::2] = 1
    real = volume_slices(volume, lungs, config, SIZE, "ph", np.random.default_rng(0), infected=infected)
    assert all((m == UNKNOWN_MASK).all() for m, k in zip(real.masks, real.kinds) if k == "infected")
    exact = volume_slices(volume, lungs, config, SIZE, "ph", np.random.default_rng(0), lesion_masks=lesion)
    lesion_rows = [i for i, k in enumerate(exact.kinds) if k == "phantom-lesion"]
    assert lesion_rows and all(exact.masks[i].any() and exact.labels[i] == 1 for i in lesion_rows)


def test_prepared_slices_round_trip(phantom_volume: tuple, tmp_path: Path) -> None:
    volume, lungs, _ = phantom_volume
    prepared = volume_slices(volume, lungs, PipelineConfig(), SIZE, "ph", np.random.default_rng(1))
    prepared.save(tmp_path / "p.safetensors")
    loaded = PreparedSlices.load(tmp_path / "p.safetensors")
    assert loaded.kinds == prepared.kinds and loaded.groups == prepared.groups
    assert np.array_equal(loaded.masks, prepared.masks) and np.array_equal(loaded.labels, prepared.labels)
    keep = np.asarray(prepared.labels) == 1
    assert len(loaded.select(keep)) == int(keep.sum())


@pytest.mark.realdata
def test_ctmd_labels_match_the_series(shared_data: Path) -> None:
    from corona_ct.pipeline.ingest import load_study

    volume = load_study(shared_data / "covid-ct-md" / "P002")
    labels = ctmd_infection_labels(volume, shared_data / "covid-ct-md" / "slice_labels.csv", "P002")
    assert labels.shape == (133,) and labels.sum() == 68


def test_more_twins_give_each_clean_slice_lesions_of_their_own(phantom_volume: tuple) -> None:
    volume, lungs, _ = phantom_volume
    one = _prepared(volume, lungs)
    three = _prepared(volume, lungs, twins=3, twin_rng=np.random.default_rng(1))
    kinds_one, kinds_three = np.array(one.kinds), np.array(three.kinds)
    assert (kinds_three == "clean").sum() == (kinds_one == "clean").sum()
    assert (kinds_three == "counterfactual").sum() >= 2.5 * (kinds_one == "counterfactual").sum()
    # with a separate twin_rng the one-twin set is kept whole (first twins included) and more twins added
    first_twins = np.r_[False, (kinds_three[1:] == "counterfactual") & (kinds_three[:-1] == "clean")]
    keep = (kinds_three != "counterfactual") | first_twins
    assert np.array_equal(three.images[keep], one.images) and np.array_equal(three.masks[keep], one.masks)
    # and a clean slice's three twins carry different lesions
    first_clean = int(np.flatnonzero(kinds_three == "clean")[2])
    after = three.masks[first_clean + 1 : first_clean + 4]
    assert not np.array_equal(after[0], after[1]) and not np.array_equal(after[1], after[2])
    with pytest.raises(ConfigError, match="twins"):
        _prepared(volume, lungs, twins=0)


def test_phantom_lesion_slices_get_their_lesion_free_counterpart(phantom_volume: tuple) -> None:
    volume, lungs, lesion = phantom_volume
    lesion_free = small_phantom()  # the same anatomy and noise without lesions
    without = _prepared(volume, lungs, lesion_masks=lesion)
    paired = _prepared(volume, lungs, lesion_masks=lesion, lesion_free_hu=lesion_free.hu)
    kinds = np.array(paired.kinds)
    free = kinds == "phantom-lesion-free"
    # one negative per lesion slice, right after it; everything else as without the option
    assert free.sum() == (kinds == "phantom-lesion").sum() > 0
    assert np.array_equal(kinds[np.flatnonzero(free) - 1], ["phantom-lesion"] * int(free.sum()))
    assert np.array_equal(paired.images[~free], without.images) and np.array_equal(
        paired.labels[~free], without.labels
    )
    assert (paired.labels[free] == 0).all() and not paired.masks[free].any()
    # the pair differs only where the lesion lies (same lungs, box and window), and differs there
    positive = paired.images[np.flatnonzero(free) - 1].float()
    negative = paired.images[free].float()
    lesion_in_input = paired.masks[np.flatnonzero(free) - 1].astype(bool)
    difference = (positive - negative).abs().numpy()
    assert difference[lesion_in_input].mean() > 10 * max(float(difference[~lesion_in_input].mean()), 1e-6)
