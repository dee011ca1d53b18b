"""The study runner and the batch runner, end to end on phantoms (random classifier weights)."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from corona_ct.data.phantom import make_phantom
from corona_ct.data.writers import write_dicom_series, write_nifti
from corona_ct.pipeline.batch import run_batch
from corona_ct.pipeline.config import PipelineConfig
from corona_ct.pipeline.errors import ModelError
from corona_ct.pipeline.layout import SUMMARY_COLUMNS
from corona_ct.pipeline.modelset import load_models
from corona_ct.pipeline.preprocess import lung_bounding_box, to_model_input
from corona_ct.pipeline.run import analyze_study
from corona_ct.pipeline.severity import corona_score

PATIENT_STRINGS = ("PHANTOM^DEMO", "PHANTOM-0", "Secret^Patient", "PID-998877", "ACC-4455")
SMALL = {"roi.input_size": 64, "runtime.device": "cpu"}


@pytest.fixture(scope="module")
def config() -> PipelineConfig:
    return PipelineConfig().replace(SMALL)


@pytest.fixture(scope="module")
def models(config: PipelineConfig):
    return load_models(config, allow_untrained=True)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(seed=3, shape=(10, 96, 96), spacing_mm=(5.0, 3.2, 3.2), lesions="mixed")


def _without_lungs(phantom):  # type: ignore[no-untyped-def]
    """The phantom with its lungs filled with soft tissue (40 HU): a CT with no lungs in view."""
    hu = np.where(phantom.lung_labels > 0, 40, phantom.hu).astype(np.int16)
    return dataclasses.replace(phantom, hu=hu)


def test_without_weights_the_run_refuses_with_a_remedy(config: PipelineConfig) -> None:
    with pytest.raises(ModelError, match="--allow-untrained"):
        load_models(config)


def test_analyze_study_shapes_and_invariants(phantom, models, config: PipelineConfig) -> None:
    volume = phantom.to_volume("phantom")
    result = analyze_study(volume, models, config)
    evaluated = result.scores.evaluated
    assert evaluated.any()
    assert np.isnan(result.scores.probs[~evaluated]).all()
    assert np.isfinite(result.scores.probs[evaluated]).all()
    maps = result.cams.maps
    assert maps.shape == volume.array.shape and maps.min() >= 0 and maps.max() <= 1
    assert not maps[~evaluated].any()
    # the map lives inside the case-wide lung box: exactly zero outside it
    box = lung_bounding_box(result.lung_mask.lungs, config.roi)
    assert box is not None
    outside = maps.copy()
    outside[:, box.y0 : box.y1, box.x0 : box.x1] = 0
    assert outside.max() == 0
    positive = evaluated & (result.scores.probs >= config.classify.positive_threshold)
    expected = corona_score(maps, positive, volume.geometry.voxel_volume_mm3, threshold=0.6)
    assert result.severity.corona_score_cm3 == pytest.approx(expected)
    true_lung_ml = phantom.lung_volume_mm3 / 1000
    assert result.severity.lung_volume_cm3 == pytest.approx(true_lung_ml, rel=0.1)
    assert result.features.features.shape == (int(evaluated.sum()), 2048)
    assert set(result.timings_s) >= {"segment", "roi", "classify+gradcam", "severity"}


def test_with_mask_outside_lungs_the_classifier_sees_lung_only(phantom, models, config, monkeypatch) -> None:
    import corona_ct.pipeline.run as run_module

    seen: list[np.ndarray] = []
    classify = run_module.classify_slices

    def spy(classifier, spec, inputs, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(inputs[:, 0].numpy().copy())
        return classify(classifier, spec, inputs, **kwargs)

    monkeypatch.setattr(run_module, "classify_slices", spy)
    volume = phantom.to_volume("phantom")
    analyze_study(volume, models, config)
    masked_config = config.replace({"roi.mask_outside_lungs": True})
    result = analyze_study(volume, models, masked_config)
    boxed, masked = np.concatenate(seen[: len(seen) // 2]), np.concatenate(seen[len(seen) // 2 :])
    lungs = result.lung_mask.lungs[result.scores.evaluated]
    box = lung_bounding_box(result.lung_mask.lungs, config.roi)
    lung_share = to_model_input(lungs.astype(np.float32), box, masked.shape[-1])[:, 0].numpy()
    outside, inside = lung_share == 0, lung_share == 1
    assert outside.any() and inside.any()
    assert (masked[outside] == 0).all() and (boxed[outside] > 0).any()  # chest wall and mediastinum gone
    np.testing.assert_allclose(masked[inside], boxed[inside], atol=1e-6)  # the lungs as they were


def test_analyze_study_stops_at_the_gate_without_lungs(phantom, models, config: PipelineConfig) -> None:
    result = analyze_study(_without_lungs(phantom).to_volume("nolung"), models, config)
    assert result.status == "not-assessable" and not result.assessable
    assert result.not_assessable_reason == "no lungs found"
    assert result.severity is None and result.case_probability is None
    assert not result.scores.evaluated.any() and np.isnan(result.scores.probs).all()
    assert "classify+gradcam" not in result.timings_s and "assess" in result.timings_s
    assert result.features.features.shape == (0, 2048)
    # a chest passes the gate
    assert analyze_study(phantom.to_volume("chest"), models, config).status == "ok"


def _write_bad_study(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "IM0001.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage" * 10)


@pytest.fixture(scope="module")
def batch(tmp_path_factory, phantom, models, config: PipelineConfig):
    root = tmp_path_factory.mktemp("batch")
    inputs = root / "inputs"
    write_dicom_series(phantom, inputs / "case_a", patient_name="Secret^Patient", patient_id="PID-998877")
    write_nifti(phantom, inputs / "case_b.nii.gz")
    write_nifti(_without_lungs(phantom), inputs / "case_c.nii.gz")
    _write_bad_study(inputs / "case_broken")
    output = root / "out"
    outcome = run_batch(
        [inputs / "case_a", inputs / "case_b.nii.gz", inputs / "case_c.nii.gz", inputs / "case_broken"],
        output,
        config,
        models,
        show_progress=False,
    )
    return inputs, output, outcome


def _summary(output: Path) -> list[dict[str, str]]:
    with (output / "summary.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_batch_isolates_failures_and_writes_every_output(batch) -> None:
    _inputs, output, outcome = batch
    rows = {row["source"]: row for row in _summary(output)}
    assert list(_summary(output)[0]) == list(SUMMARY_COLUMNS)
    assert outcome.exit_code == 1  # the broken study; the one without lungs is not a failure
    statuses = sorted(row["status"] for row in rows.values())
    assert statuses == ["failed", "not-assessable", "ok", "ok"]
    assert len(outcome.failures) == 1 and len(outcome.not_assessable) == 1
    failed = next(row for row in rows.values() if row["status"] == "failed")
    assert failed["error"] and "\n" not in failed["error"]
    for row in rows.values():
        if row["status"] != "ok":
            continue
        study_dir = output / row["study_id"]
        for name in ("report.json", "report.html", "lung_mask.nii.gz", "heatmap.nii.gz", "features.npz"):
            assert (study_dir / name).is_file(), name
        report = json.loads((study_dir / "report.json").read_text())
        assert report["untrained_weights"] is True
        assert report["first_line"].startswith("UNTRAINED WEIGHTS")
        assert report["segmenter"] == "classical"
        assert len(report["slices"]) == int(row["n_slices"])
        assert report["config_hash"] == PipelineConfig().replace(SMALL).hash()
        html = (study_dir / "report.html").read_text()
        assert "Research use only" in html and "UNTRAINED WEIGHTS" in html
        features = np.load(study_dir / "features.npz")
        assert features["features"].shape[1] == 2048
        assert features["thumbnails"].shape[1:] == (112, 112)


def test_a_study_without_lungs_is_not_assessable_and_says_why(batch) -> None:
    _inputs, output, _ = batch
    row = next(r for r in _summary(output) if r["source"] == "nifti:case_c.nii.gz")
    assert row["status"] == "not-assessable" and row["reason"] == "no lungs found" and row["error"] == ""
    # no call: every classifier number is empty, not 0
    for column in ("case_probability", "corona_score_cm3", "positive_slices", "affected_percent"):
        assert row[column] == "", column
    assert row["slices_evaluated"] == "0" and float(row["lung_volume_cm3"]) == 0
    study_dir = output / row["study_id"]
    report = json.loads((study_dir / "report.json").read_text())
    assert report["status"] == "not-assessable" and report["not_assessable_reason"] == "no lungs found"
    assert report["summary"]["status"] == "not-assessable"
    assert report["case"] is None and report["severity"] is None
    assert report["lung_check"]["assessable"] is False and report["lung_check"]["slices_with_lung"] == 0
    # the lung mask is written so that the user can see why; nothing classified, so no map, no features
    assert report["files"] == ["lung_mask.nii.gz", "report.html"]
    assert all((study_dir / name).is_file() for name in report["files"])
    assert not (study_dir / "heatmap.nii.gz").exists() and not (study_dir / "features.npz").exists()
    html = (study_dir / "report.html").read_text()
    assert 'class="not-assessable">NOT ASSESSABLE: no lungs found' in html
    assert html.index("NOT ASSESSABLE") < html.index("<h2>")  # the banner comes before any section
    assert not re.search(r"\b(positive|negative)\b", html, re.IGNORECASE)
    assert "probability" not in html.lower()
    # an assessable study's report has the status too
    ok = next(r for r in _summary(output) if r["status"] == "ok")
    ok_report = json.loads((output / ok["study_id"] / "report.json").read_text())
    assert ok_report["status"] == "ok" and ok_report["not_assessable_reason"] is None
    assert "NOT ASSESSABLE" not in (output / ok["study_id"] / "report.html").read_text()


def test_nifti_outputs_have_the_inputs_grid(batch) -> None:
    inputs, output, _ = batch
    row = next(r for r in _summary(output) if r["source"] == "nifti:case_b.nii.gz")
    source = nib.load(inputs / "case_b.nii.gz")
    for name in ("lung_mask.nii.gz", "heatmap.nii.gz"):
        written = nib.load(output / row["study_id"] / name)
        assert written.shape == source.shape
        np.testing.assert_allclose(written.affine, source.affine, atol=1e-4)


def test_no_output_contains_patient_identity(batch) -> None:
    _, output, _ = batch
    for path in output.rglob("*"):
        assert not any(s.lower() in str(path).lower() for s in PATIENT_STRINGS)
        if path.is_file():
            data = path.read_bytes()
            if path.suffix == ".gz":
                data = gzip.decompress(data)
            for secret in PATIENT_STRINGS:
                assert secret.encode() not in data, (path, secret)


def test_resume_skips_complete_studies_and_reruns_on_config_change(batch, models, config) -> None:
    inputs, output, _first = batch
    paths = [inputs / "case_a", inputs / "case_b.nii.gz", inputs / "case_c.nii.gz"]
    again = run_batch(paths, output, config, models, resume=True, show_progress=False)
    assert len(again.skipped) == 3 and again.exit_code == 0  # the not-assessable study is complete too
    assert [r["status"] for r in again.not_assessable] == ["not-assessable"]
    changed = config.replace({"cam.activation_threshold": 0.5})
    rerun = run_batch(paths[:1], output / "changed", changed, models, resume=True, show_progress=False)
    assert rerun.skipped == []


def test_an_interrupted_batch_keeps_finished_studies(tmp_path, phantom, models, config, monkeypatch) -> None:
    import corona_ct.pipeline.study_job as study_job_module

    inputs = tmp_path / "in"
    write_nifti(phantom, inputs / "a.nii.gz")
    write_nifti(phantom, inputs / "b.nii.gz")
    real = study_job_module.analyze_study
    calls = {"n": 0}

    def interrupt_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(study_job_module, "analyze_study", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        run_batch(
            [inputs / "a.nii.gz", inputs / "b.nii.gz"], tmp_path / "out", config, models, show_progress=False
        )
    rows = _summary(tmp_path / "out")
    assert [r["status"] for r in rows] == ["ok"]
    assert (tmp_path / "out" / rows[0]["study_id"] / "report.json").is_file()
    assert not list((tmp_path / "out").rglob("*.tmp*"))


def test_a_checkpoint_runs_at_its_trained_size_and_is_named_in_the_report(tmp_path, phantom) -> None:
    from corona_ct.models.checkpoint import read_card, save_checkpoint
    from corona_ct.models.classifier import build_classifier

    torch_model = build_classifier("resnet50")
    weights = save_checkpoint(
        torch_model,
        tmp_path / "cls.safetensors",
        {
            "architecture": "classifier/resnet50",
            "task": "covid-vs-normal slice classification (test)",
            "input": {"size": 48, "channels": 3, "window": [-1000, 0], "roi": "lung-bbox"},
        },
    )
    config = PipelineConfig().replace({"runtime.device": "cpu"})
    models = load_models(config, cls_weights=weights)
    assert not models.untrained and models.input_size(config) == 48
    write_nifti(phantom, tmp_path / "in" / "p.nii.gz")
    outcome = run_batch([tmp_path / "in"], tmp_path / "out", config, models, show_progress=False)
    assert outcome.exit_code == 0
    report = json.loads((tmp_path / "out" / outcome.rows[0]["study_id"] / "report.json").read_text())
    assert report["untrained_weights"] is False
    assert report["first_line"].startswith("Research use only")
    assert report["models"]["classifier"]["sha256"] == read_card(weights)["sha256"]
    assert report["models"]["classifier"]["file"] == "cls.safetensors"


@pytest.mark.parametrize(
    ("backbone", "options", "feature_dim"),
    [("vgg16", {}, 512), ("resnet152_lstm", {"lstm_hidden": 16, "input_size": 64}, 2048)],
)
@pytest.mark.slow
def test_other_backbones_checkpoints_run_through_the_pipeline(
    tmp_path, phantom, backbone, options, feature_dim
) -> None:
    """Any backbone's checkpoint: its own Grad-CAM layers, its trained input size, its feature width."""
    import torch

    from corona_ct.models.checkpoint import save_checkpoint
    from corona_ct.models.classifier import build_classifier

    torch.manual_seed(0)
    weights = save_checkpoint(
        build_classifier(backbone, 1, **options),
        tmp_path / f"{backbone}.safetensors",
        {
            "architecture": f"classifier/{backbone}",
            "task": "covid-vs-normal slice classification (test)",
            "input": {"size": 64, "channels": 3, "window": [-1000, 0], "roi": "lung-bbox"},
            "backbone_options": options,
        },
    )
    config = PipelineConfig().replace({"runtime.device": "cpu"})
    models = load_models(config, cls_weights=weights)
    result = analyze_study(phantom.to_volume("p"), models, config)
    evaluated = result.scores.evaluated
    assert evaluated.any() and np.isfinite(result.scores.probs[evaluated]).all()
    assert result.cams.layers == models.spec.cam_layers
    # random weights may leave every Grad-CAM map at zero after the ReLU; bounds and placement hold regardless
    assert result.cams.maps.min() >= 0 and result.cams.maps.max() <= 1
    assert not result.cams.maps[~evaluated].any()
    assert result.features.features.shape == (int(evaluated.sum()), feature_dim)
