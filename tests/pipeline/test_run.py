"""The study runner and the batch runner, end to end on phantoms (random classifier weights)."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data.phantom import make_phantom, write_dicom_series, write_nifti
from pipeline.config import PipelineConfig
from pipeline.errors import ModelError
from pipeline.preprocess import lung_bounding_box
from pipeline.run import SUMMARY_COLUMNS, analyze_study, load_models, run_batch
from pipeline.severity import corona_score

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


def _write_bad_study(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "IM0001.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage" * 10)


@pytest.fixture(scope="module")
def batch(tmp_path_factory, phantom, models, config: PipelineConfig):
    root = tmp_path_factory.mktemp("batch")
    inputs = root / "inputs"
    write_dicom_series(phantom, inputs / "case_a", patient_name="Secret^Patient", patient_id="PID-998877")
    write_nifti(phantom, inputs / "case_b.nii.gz")
    _write_bad_study(inputs / "case_broken")
    output = root / "out"
    outcome = run_batch(
        [inputs / "case_a", inputs / "case_b.nii.gz", inputs / "case_broken"],
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
    assert outcome.exit_code == 1
    statuses = sorted(row["status"] for row in rows.values())
    assert statuses == ["failed", "ok", "ok"]
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


def test_nifti_outputs_have_the_inputs_grid(batch) -> None:
    inputs, output, _ = batch
    row = next(r for r in _summary(output) if r["source"].startswith("nifti"))
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
    paths = [inputs / "case_a", inputs / "case_b.nii.gz"]
    again = run_batch(paths, output, config, models, resume=True, show_progress=False)
    assert len(again.skipped) == 2 and again.exit_code == 0
    changed = config.replace({"cam.activation_threshold": 0.5})
    rerun = run_batch(paths[:1], output / "changed", changed, models, resume=True, show_progress=False)
    assert rerun.skipped == []


def test_an_interrupted_batch_keeps_finished_studies(tmp_path, phantom, models, config, monkeypatch) -> None:
    import pipeline.run as run_module

    inputs = tmp_path / "in"
    write_nifti(phantom, inputs / "a.nii.gz")
    write_nifti(phantom, inputs / "b.nii.gz")
    real = run_module.analyze_study
    calls = {"n": 0}

    def interrupt_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(run_module, "analyze_study", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        run_batch(
            [inputs / "a.nii.gz", inputs / "b.nii.gz"], tmp_path / "out", config, models, show_progress=False
        )
    rows = _summary(tmp_path / "out")
    assert [r["status"] for r in rows] == ["ok"]
    assert (tmp_path / "out" / rows[0]["study_id"] / "report.json").is_file()
    assert not list((tmp_path / "out").rglob("*.tmp*"))


def test_a_checkpoint_runs_at_its_trained_size_and_is_named_in_the_report(tmp_path, phantom) -> None:
    from models.checkpoint import read_card, save_checkpoint
    from models.classifier import build_classifier

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
def test_other_backbones_checkpoints_run_through_the_pipeline(
    tmp_path, phantom, backbone, options, feature_dim
) -> None:
    """Any backbone's checkpoint: its own Grad-CAM layers, its trained input size, its feature width."""
    import torch

    from models.checkpoint import save_checkpoint
    from models.classifier import build_classifier

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
