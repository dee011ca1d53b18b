"""The Python API (`corona_ct.pipeline.api`): one call per job, on phantoms."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from corona_ct.data.phantom import make_phantom
from corona_ct.data.writers import write_nifti, write_png_slices
from corona_ct.pipeline.api import analyse_study, build_config, explain_images, prepare_models, run_batch
from corona_ct.pipeline.config import PipelineConfig
from corona_ct.pipeline.errors import AmbiguousInputError, ConfigError
from corona_ct.pipeline.modelset import load_models
from corona_ct.pipeline.run import analyze_study

REPO_ROOT = Path(__file__).resolve().parents[2]
FAST = {"roi_input_size": 48, "segment_method": "classical"}


def package_env() -> dict[str, str]:
    """The environment for a subprocess that must import the corona_ct tested here.

    With the mirror of links (build/typecheck, as in a worktree) its folder goes first on
    PYTHONPATH; with the editable install nothing needs adding. The rest is inherited.
    """
    import corona_ct.pipeline

    env = dict(os.environ)
    package = Path(corona_ct.pipeline.__file__).parent  # not resolved: the link, when it is one
    if package.parent.name == "corona_ct":
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(package.parent.parent), env.get("PYTHONPATH", "")])
        )
    return env


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(seed=3, shape=(8, 80, 80), spacing_mm=(5.0, 4.0, 4.0), lesions="mixed")


def test_analyse_study_is_analyze_study_on_the_loaded_input(tmp_path: Path, phantom) -> None:
    study = write_nifti(phantom, tmp_path / "P001.nii.gz")
    result = analyse_study(study, tmp_path / "out", device="cpu", allow_untrained=True, **FAST)
    config = PipelineConfig().replace(
        {"roi.input_size": 48, "segment.method": "classical", "runtime.device": "cpu"}
    )
    direct = analyze_study(phantom.to_volume("P001"), load_models(config, allow_untrained=True), config)
    assert result.status == direct.status == "ok"
    np.testing.assert_array_equal(result.lung_mask.labels, direct.lung_mask.labels)
    assert result.severity is not None and direct.severity is not None
    assert result.severity.lung_volume_cm3 == pytest.approx(direct.severity.lung_volume_cm3)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["summary"]["study_id"] == "P001" and report["summary"]["status"] == "ok"
    assert report["summary"]["source"] == "nifti:P001.nii.gz"
    for name in ("report.html", "lung_mask.nii.gz", "heatmap.nii.gz", "features.npz"):
        assert (tmp_path / "out" / name).is_file(), name


def test_analyse_study_reuses_prepared_models_and_writes_nothing_without_output(
    tmp_path: Path, phantom
) -> None:
    study = write_nifti(phantom, tmp_path / "in" / "P002.nii.gz")
    config = build_config(device="cpu", **FAST)
    models = prepare_models(config, allow_untrained=True)
    result = analyse_study(study, config=config, models=models)
    assert result.case_probability is not None and 0.0 <= result.case_probability <= 1.0
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["P002.nii.gz"]


def test_run_batch_and_explain_images(tmp_path: Path, phantom) -> None:
    write_nifti(phantom, tmp_path / "in" / "A.nii.gz")
    write_nifti(phantom, tmp_path / "in" / "B.nii.gz")
    outcome = run_batch([tmp_path / "in"], tmp_path / "out", device="cpu", allow_untrained=True, **FAST)
    assert outcome.exit_code == 0 and sorted(str(r["study_id"]) for r in outcome.rows) == ["A", "B"]
    with (tmp_path / "out" / "summary.csv").open() as handle:
        assert [row["status"] for row in csv.DictReader(handle)] == ["ok", "ok"]

    pngs = write_png_slices(phantom, tmp_path / "png")[3:5]
    explained = explain_images(
        [*pngs, tmp_path / "missing.png"], tmp_path / "explain", device="cpu", allow_untrained=True, **FAST
    )
    assert [row["file"] for row in explained.predictions] == [Path(p).name for p in pngs]
    assert len(explained.failures) == 1 and "missing.png" in explained.failures[0]
    assert explained.predictions_csv.is_file()
    cam = np.load(tmp_path / "explain" / str(explained.predictions[0]["cam"]))
    assert cam.shape == phantom.hu.shape[1:]


def test_settings_and_inputs_are_checked_in_one_line(tmp_path: Path, phantom) -> None:
    with pytest.raises(ConfigError, match="SECTION_FIELD=value"):
        build_config(inputsize=3)
    with pytest.raises(ConfigError, match=r"roi\.size"):
        build_config(roi_size=3)
    assert build_config(cam_activation_threshold=0.5).cam.activation_threshold == 0.5
    assert build_config(PipelineConfig().replace({"runtime.device": "cpu"})).runtime.device == "cpu"
    with pytest.raises(ConfigError, match="roi='lungs'"):
        explain_images([], tmp_path, roi="lungs")
    write_nifti(phantom, tmp_path / "two" / "A.nii.gz")
    write_nifti(phantom, tmp_path / "two" / "B.nii.gz")
    with pytest.raises(AmbiguousInputError, match="2 studies"):
        analyse_study(tmp_path / "two", device="cpu", allow_untrained=True, **FAST)


def _readme_snippet() -> str:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- api-snippet[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its api-snippet block"
    return match.group(1)


def test_the_usage_guide_shows_the_readme_snippet() -> None:
    assert _readme_snippet() in (REPO_ROOT / "docs" / "usage.md").read_text(encoding="utf-8")


@pytest.mark.slow
def test_the_readme_snippet_runs_as_is(tmp_path: Path) -> None:
    """The quick-start block, unchanged, in a fresh interpreter (shipped weights, as a user has them)."""
    done = subprocess.run(
        [sys.executable, "-c", _readme_snippet()],
        cwd=tmp_path, env=package_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    first, second = done.stdout.strip().splitlines()[-2:]
    status, probability, score = first.split()
    assert status == "ok" and 0.0 <= float(probability) <= 1.0 and float(score) >= 0.0
    assert second == "1 studies, 0 failed"
    assert (tmp_path / "out" / "phantom" / "report.html").is_file()
    assert (tmp_path / "batch" / "summary.csv").is_file()
