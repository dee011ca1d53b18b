"""`run --dicom-out`: DICOM SEG and TID 1500 SR on real LIDC and COVID-CT-MD series, read back and verified."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest

from corona_ct.data.phantom import make_phantom
from corona_ct.data.writers import write_nifti
from corona_ct.pipeline import __version__
from corona_ct.pipeline.batch import run_batch
from corona_ct.pipeline.config import PipelineConfig
from corona_ct.pipeline.errors import ConfigError, InputError
from corona_ct.pipeline.modelset import load_models

hd = pytest.importorskip("highdicom", reason="highdicom (extra dicom-out) is not installed")
from corona_ct.pipeline.dicom_out import check_source_uids  # noqa: E402
from corona_ct.pipeline.layout import DICOM_FILES, STUDY_FILES  # noqa: E402
from corona_ct.pipeline.layout import MEASUREMENTS_SR_NAME as SR_NAME  # noqa: E402
from corona_ct.pipeline.layout import SEGMENTATION_NAME as SEG_NAME  # noqa: E402

#: Small and fast: the classical segmenter, a 64 px classifier input; every evaluated slice is positive and
#: a low CAM threshold, so that the opacity segment is not empty even with untrained weights.
SETTINGS = {
    "runtime.device": "cpu",
    "segment.method": "classical",
    "roi.input_size": 64,
    "classify.positive_threshold": 0.0,
    "cam.activation_threshold": 0.2,
}
SERIES = ("LIDC-IDRI-0001", "P002")
KEPT_SLICES = 24  # of P002's 133 (48 mm of chest at 2 mm)


@pytest.fixture(scope="module")
def config() -> PipelineConfig:
    return PipelineConfig().replace(SETTINGS)


@pytest.fixture(scope="module")
def models(config: PipelineConfig) -> Any:
    return load_models(config, allow_untrained=True)


def with_pacs_uids(source: Path, target: Path) -> Path:
    """A copy of a COVID-CT-MD series with the UIDs a PACS assigns on import (the files carry no SOP Instance
    UID, no Frame of Reference UID and GUIDs as study and series UIDs); pixels and geometry unchanged.
    Only the middle ``KEPT_SLICES`` contiguous slices are kept (a chest slab: the suite stays quick)."""
    target.mkdir()
    shared = {
        keyword: pydicom.uid.generate_uid(entropy_srcs=[source.name, keyword])
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")
    }
    datasets = []
    for path in sorted(source.iterdir()):
        with warnings.catch_warnings():  # pydicom: the GUIDs are no valid UIDs (replaced below)
            warnings.simplefilter("ignore")
            datasets.append((path, pydicom.dcmread(path)))
    datasets.sort(key=lambda item: int(item[1].InstanceNumber))
    middle = len(datasets) // 2
    for path, ds in datasets[middle - KEPT_SLICES // 2 : middle + KEPT_SLICES // 2]:
        for keyword, uid in shared.items():
            setattr(ds, keyword, uid)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid(
            entropy_srcs=[source.name, path.name]
        )
        ds.save_as(target / path.name)
    return target


@pytest.fixture(scope="module")
def written(shared_data: Path, config: PipelineConfig, models: Any, tmp_path_factory: pytest.TempPathFactory):
    """(output, {series: (study folder, source folder)}) of one --dicom-out batch over both series."""
    output = tmp_path_factory.mktemp("dicom-out")
    covid = with_pacs_uids(shared_data / "covid-ct-md" / "P002", tmp_path_factory.mktemp("pacs") / "P002")
    inputs = {"LIDC-IDRI-0001": shared_data / "dicom" / "LIDC-IDRI-0001", "P002": covid}
    outcome = run_batch(
        list(inputs.values()),
        output,
        config,
        models,
        show_progress=False,
        study_naming="folder",
        dicom_out=True,
    )
    assert not outcome.failures, outcome.failures
    return output, {name: (output / name, source) for name, source in inputs.items()}


def test_sources_without_valid_uids_are_named(shared_data: Path) -> None:
    """COVID-CT-MD as published: no SOP Instance UID, so no SEG/SR can reference its images (the study fails
    with this message at stage dicom-out)."""
    files = sorted((shared_data / "covid-ct-md" / "P002").iterdir())[:3]
    with warnings.catch_warnings():  # pydicom: the GUIDs are no valid UIDs
        warnings.simplefilter("ignore")
        sources = [pydicom.dcmread(path, stop_before_pixels=True) for path in files]
    with pytest.raises(InputError, match="3 of 3 source files carry no valid SOPInstanceUID"):
        check_source_uids(sources)


def _pixel_lps(
    ipp: Any, orientation: np.ndarray, spacing: tuple[float, float], shape: tuple[int, int]
) -> np.ndarray:
    """(rows, columns, 3) LPS mm of every pixel centre of a frame."""
    r, c = np.mgrid[: shape[0], : shape[1]]
    return (
        np.asarray(ipp, dtype=np.float64)
        + c[..., None] * spacing[1] * orientation[:3]
        + r[..., None] * spacing[0] * orientation[3:]
    )


def _sample(nifti: nib.Nifti1Image, lps: np.ndarray) -> np.ndarray:
    """Values of ``nifti`` at LPS points (nearest voxel, which must be within 1e-3 voxel)."""
    ras = lps * np.array([-1.0, -1.0, 1.0])
    ijk = ras @ np.linalg.inv(nifti.affine)[:3, :3].T + np.linalg.inv(nifti.affine)[:3, 3]
    assert np.abs(ijk - np.rint(ijk)).max() < 1e-3
    i, j, k = np.rint(ijk).astype(int).transpose(2, 0, 1)
    return np.asarray(nifti.dataobj)[i, j, k]


@pytest.mark.parametrize("series", SERIES)
def test_seg_frames_lie_on_the_nifti_masks_voxel_for_voxel(written, series: str) -> None:
    _, studies = written
    study_dir, _ = studies[series]
    seg = pydicom.dcmread(study_dir / SEG_NAME)
    mask = nib.load(study_dir / "lung_mask.nii.gz")
    heat = nib.load(study_dir / "heatmap.nii.gz")
    report = json.loads((study_dir / "report.json").read_text())
    positive = np.array([s["positive"] for s in report["slices"]])
    threshold = np.float32(report["gradcam"]["activation_threshold"])
    shared = seg.SharedFunctionalGroupsSequence[0]
    orientation = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=np.float64)
    spacing = tuple(float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    frames = seg.pixel_array
    labels = np.asarray(mask.dataobj)
    covered = {number: np.zeros(labels.shape, dtype=int) for number in (1, 2, 3)}
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        lps = _pixel_lps(
            item.PlanePositionSequence[0].ImagePositionPatient, orientation, spacing, frame.shape
        )
        lung = _sample(mask, lps)
        if number in (1, 2):
            expected = lung == number
        else:
            ras = lps * np.array([-1.0, -1.0, 1.0])
            k = np.rint(
                (ras @ np.linalg.inv(heat.affine)[:3, :3].T + np.linalg.inv(heat.affine)[:3, 3])[..., 2]
            )
            expected = (_sample(heat, lps) > threshold) & (lung > 0) & positive[k.astype(int)]
        np.testing.assert_array_equal(frame.astype(bool), expected, err_msg=f"segment {number}")
        ras = lps * np.array([-1.0, -1.0, 1.0])
        ijk = np.rint(ras @ np.linalg.inv(mask.affine)[:3, :3].T + np.linalg.inv(mask.affine)[:3, 3]).astype(
            int
        )
        covered[number][tuple(ijk.reshape(-1, 3).T)] += 1
    for number, count in covered.items():  # every voxel of the mask lies in exactly one frame per segment
        assert (count == 1).all(), number
    assert frames[
        [
            int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber) == 3
            for f in seg.PerFrameFunctionalGroupsSequence
        ]
    ].any()
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [
        "Right lung",
        "Left lung",
        "Corona score opacity",
    ]


@pytest.mark.parametrize("series", SERIES)
def test_seg_and_sr_reference_the_source_instances_and_copy_the_patient(written, series: str) -> None:
    _, studies = written
    study_dir, source_dir = studies[series]
    sources = [pydicom.dcmread(path, stop_before_pixels=True) for path in sorted(source_dir.iterdir())]
    source_uids = {ds.SOPInstanceUID for ds in sources}
    seg = pydicom.dcmread(study_dir / SEG_NAME)
    per_frame = {
        item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for item in seg.PerFrameFunctionalGroupsSequence
    }
    assert per_frame == source_uids
    referenced = {
        i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    assert referenced == source_uids
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    sr = pydicom.dcmread(study_dir / SR_NAME)
    evidence = {
        instance.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series_item in study.ReferencedSeriesSequence
        for instance in series_item.ReferencedSOPSequence
    }
    assert evidence == source_uids | {seg.SOPInstanceUID}
    for ds in (seg, sr):  # the patient and study modules come from the source (docs/usage.md)
        assert ds.StudyInstanceUID == sources[0].StudyInstanceUID
        assert ds.PatientID == sources[0].PatientID


def _content(items: Any) -> list[Any]:
    """Every content item of an SR tree, depth first."""
    found = []
    for item in items:
        found.append(item)
        found.extend(_content(item.get("ContentSequence", [])))
    return found


def _measurements(group: Any) -> dict[str, tuple[float, str]]:
    return {
        item.ConceptNameCodeSequence[0].CodeMeaning: (
            float(item.MeasuredValueSequence[0].NumericValue),
            item.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue,
        )
        for item in group.ContentSequence
        if item.ValueType == "NUM"
    }


@pytest.mark.parametrize("series", SERIES)
def test_sr_holds_the_report_measures_with_ucum_units(written, series: str) -> None:
    _, studies = written
    study_dir, _ = studies[series]
    report = json.loads((study_dir / "report.json").read_text())
    severity = report["severity"]
    sr = pydicom.dcmread(study_dir / SR_NAME)
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    groups = [
        item
        for item in _content(sr.ContentSequence)
        if item.ConceptNameCodeSequence[0].CodeMeaning == "Measurement Group"
    ]
    by_name = {
        next(
            i.TextValue
            for i in g.ContentSequence
            if i.ConceptNameCodeSequence[0].CodeMeaning == "Tracking Identifier"
        ): _measurements(g)
        for g in groups
    }
    approx = lambda value: pytest.approx(value, rel=1e-9, abs=1e-9)  # noqa: E731
    study = by_name["corona-ct study measures"]
    assert study["Corona score"] == (approx(severity["corona_score_cm3"]), "cm3")
    assert study["Corona score inside the lungs"] == (approx(severity["corona_score_in_lung_cm3"]), "cm3")
    assert study["Volume"] == (approx(severity["lung_volume_cm3"]), "cm3")
    assert study["Affected lung volume percent"] == (approx(severity["affected_percent"]), "%")
    assert study["COVID-19 case probability"] == (approx(report["case"]["probability"]), "1")
    for name, side in (("Right lung", "right"), ("Left lung", "left")):
        assert by_name[name]["Volume"] == (approx(severity[side]["lung_volume_cm3"]), "cm3")
        assert by_name[name]["Affected lung volume percent"] == (
            approx(severity[side]["affected_percent"]),
            "%",
        )
    assert by_name["Corona score opacity"]["Corona score inside the lungs"][0] > 0
    texts = {
        (i.ConceptNameCodeSequence[0].CodeMeaning, i.get("TextValue")) for i in _content(sr.ContentSequence)
    }
    assert ("Algorithm Name", "corona-ct") in texts
    assert ("Algorithm Version", __version__) in texts


def test_both_objects_pass_dciodvfy(written) -> None:
    """dciodvfy (dicom3tools) reports no error; accepted warnings: attributes a DICOMDIR would need that the
    sources leave empty (Study ID, Study Time; Study Date in COVID-CT-MD) and the private coding scheme
    99CORONACT of the corona-ct measures."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy is absent (Debian package dicom3tools: apt-get install -y dicom3tools)")
    _, studies = written
    for study_dir, _ in studies.values():
        for name in DICOM_FILES:
            run = subprocess.run(
                ["dciodvfy", str(study_dir / name)], capture_output=True, text=True, check=False
            )
            lines = (run.stdout + run.stderr).splitlines()
            errors = [line for line in lines if line.startswith("Error")]
            assert not errors, (study_dir.name, name, errors)
            warnings = {line for line in lines if line.startswith("Warning")}
            accepted = ("needed to build DICOMDIR", "<99CORONACT>")
            assert all(any(a in line for a in accepted) for line in warnings), warnings


def test_resume_reuses_the_dicom_files_byte_for_byte(written, config: PipelineConfig, models: Any) -> None:
    output, studies = written
    assert set(DICOM_FILES) <= set(STUDY_FILES)

    def digests() -> dict[str, str]:
        return {
            f"{d.name}/{n}": hashlib.sha256((d / n).read_bytes()).hexdigest()
            for d, _ in studies.values()
            for n in DICOM_FILES
        }

    before = digests()
    for study_dir, _ in studies.values():
        assert set(DICOM_FILES) <= set(json.loads((study_dir / ".complete.json").read_text())["files"])
    inputs = [source for _, source in studies.values()]
    outcome = run_batch(
        inputs,
        output,
        config,
        models,
        resume=True,
        show_progress=False,
        study_naming="folder",
        dicom_out=True,
    )
    assert sorted(outcome.skipped) == sorted(d.name for d, _ in studies.values())
    assert digests() == before


def test_inputs_without_source_instances_are_refused_before_anything_is_written(
    tmp_path: Path, config: PipelineConfig, models: Any
) -> None:
    phantom = make_phantom(seed=3, shape=(8, 48, 48))
    write_nifti(phantom, tmp_path / "case.nii.gz")
    output = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"--dicom-out .* no DICOM series: case.nii.gz \(nifti\)"):
        run_batch([tmp_path / "case.nii.gz"], output, config, models, show_progress=False, dicom_out=True)
    assert not (output / "summary.csv").exists()
