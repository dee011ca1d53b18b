"""The release tools in ``tools/``: they import, parse their options, and their pure helpers hold."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO_ROOT
from tools import default_models, validate_defaults
from tools.validate_source_matched import by_lung_fraction

TOOLS = ("default_models", "validate_defaults", "validate_source_matched", "hu_measures", "phantom_cohort")


@pytest.mark.parametrize("name", TOOLS)
def test_every_tool_prints_its_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    module = importlib.import_module(f"tools.{name}")
    with pytest.raises(SystemExit) as exited:
        module.main(["--help"])
    assert exited.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.slow  # a fresh interpreter imports torch (~6 s)
def test_tools_run_as_modules_from_the_repository_root() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tools.phantom_cohort", "--help"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "python -m tools.phantom_cohort" in done.stdout


def _rows(source: str, label: str, groups: int, per_group: int = 2) -> list[dict[str, str]]:
    return [
        {
            "path": f"{source}-{label}-{g}-{i}.png",
            "label": label,
            "group": f"{source}:{label}{g}",
            "source": source,
        }
        for g in range(groups)
        for i in range(per_group)
    ]


def test_splits_hold_out_whole_groups_of_every_stratum() -> None:
    rows = (
        _rows("ucsd", "covid", 10)
        + _rows("ucsd", "normal", 10)
        + _rows("semiseg", "covid", 5)
        + [
            {"path": f"{s}.dcm", "label": "normal", "group": f"lidc:{s}", "source": "lidc"}
            for s in ("LIDC-IDRI-0001", default_models.VAL_LIDC_SERIES)
        ]
    )
    default_models.assign_splits(rows)
    split_of_group: dict[str, set[str]] = {}
    for row in rows:
        split_of_group.setdefault(row["group"], set()).add(row["split"])
    assert all(len(splits) == 1 for splits in split_of_group.values()), "a group was split"
    held = {group for group, splits in split_of_group.items() if splits == {"val"}}
    assert {group for group in held if group.startswith("lidc:")} == {
        f"lidc:{default_models.VAL_LIDC_SERIES}"
    }
    for prefix, n_groups in (("ucsd:covid", 10), ("ucsd:normal", 10), ("semiseg:covid", 5)):
        n_held = sum(group.startswith(prefix) for group in held)
        assert n_held == max(1, round(default_models.VAL_FRACTION * n_groups)), prefix


def test_central_slices_come_from_the_middle_half_in_slice_order() -> None:
    paths = [Path(f"vol_{i}.png") for i in (7, 0, 3, 11, 1, 5, 2, 9, 4, 10, 6, 8)]
    picked = default_models.central_slices(paths, 3)
    indices = [int(p.stem.split("_")[1]) for p in picked]
    assert indices == [3, 5, 8]  # middle half of 0..11 is 3..8


def test_validation_figures_use_the_threshold_they_are_given() -> None:
    labels = np.array([1, 1, 0, 0])
    probs = np.array([0.9, 0.55, 0.45, 0.1])
    at_half = validate_defaults.binary_figures(labels, probs, 0.5)
    at_sixty = validate_defaults.binary_figures(labels, probs, 0.6)
    assert at_half["sensitivity"] == 1.0 and at_sixty["sensitivity"] == 0.5
    assert at_half["auc"] == at_sixty["auc"] == 1.0
    assert validate_defaults.dice(np.array([True, False]), np.array([True, True])) == pytest.approx(2 / 3)


def test_phantom_cohort_counts_the_case_calls_of_each_group() -> None:
    from tools.phantom_cohort import case_called_positive

    probability = np.array([0.52, 0.40, 0.9, 0.5, 0.1])
    has_lesions = np.array([0, 0, 1, 1, 1])
    assert case_called_positive(probability, has_lesions, 0.5) == {
        "with_lesions": 2 / 3,
        "without_lesions": 0.5,
    }
    assert case_called_positive(probability[2:], has_lesions[2:], 0.5)["without_lesions"] is None


def test_the_classifier_localisation_leaves_the_segmenter_figures_and_optionally_the_rows() -> None:
    semiseg = {"mean_dice_cam_0.6": 0.1, "per_slice": [{"dice": 0.1}], "infection_in_lungs_unet": 0.9}
    assert validate_defaults.classifier_localisation(semiseg) == {
        "mean_dice_cam_0.6": 0.1,
        "per_slice": [{"dice": 0.1}],
    }
    assert validate_defaults.classifier_localisation(semiseg, with_slices=False) == {"mean_dice_cam_0.6": 0.1}


def test_slice_figures_apart_for_small_and_large_lung_cross_sections() -> None:
    rows = [
        {"infected": 0, "probability": 0.8, "lung_fraction": 0.1},  # a base slice called positive
        {"infected": 1, "probability": 0.6, "lung_fraction": 0.2},
        {"infected": 0, "probability": 0.2, "lung_fraction": 0.9},
        {"infected": 0, "probability": 0.3, "lung_fraction": 0.3},  # at the cut: large
        {"infected": 1, "probability": 0.7, "lung_fraction": 1.0},
        {"infected": 1, "probability": 0.9},  # an older file's row: left out
    ]
    split = by_lung_fraction(rows, 0.3, threshold=0.5)
    assert split["large_lung"]["slices"] == 3 and split["large_lung"]["infected"] == 1
    assert split["large_lung"]["slice_auc"]["auc"] == 1.0
    assert split["large_lung"]["clean_called_positive"] == 0.0
    assert split["small_lung"]["slices"] == 2 and split["small_lung"]["clean_called_positive"] == 1.0
    assert split["small_lung"]["slice_auc"]["auc"] == 0.0
