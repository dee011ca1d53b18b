"""DICOM results of one study (``run --dicom-out``): a Segmentation and a TID 1500 measurement report.

Both are built by highdicom from the headers of the study's source series (re-read with
``stop_before_pixels``; no pixel data is held) and reference its SOP instances:

- ``segmentation.dcm``: DICOM SEG (binary), one frame per source instance and segment:
  1 right lung, 2 left lung (the labels of ``lung_mask.nii.gz``) and 3 the opacity region the
  Corona score counts inside the lungs (:func:`pipeline.severity.counted_region`: fused Grad-CAM
  above ``cam.activation_threshold`` on positive slices).
- ``measurements_sr.dcm``: Comprehensive 3D SR, TID 1500: the study measures (Corona score,
  Corona score in the lungs and lung volume in cm3, affected percent in %, case probability
  without unit ``1``, all UCUM) and one group per segment, with the algorithm's name and version.

The patient and study modules are copied from the source instances, as a PACS expects of derived
objects; nothing else identifying is added (NIfTI, JSON and HTML outputs stay free of them).
Only inputs that are DICOM series have source instances: :func:`refuse_inputs_without_instances`
refuses the others before a batch starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from corona_ct.pipeline import __version__
from corona_ct.pipeline.atomic import atomic_path
from corona_ct.pipeline.config import PipelineConfig
from corona_ct.pipeline.datamodel import LEFT_LUNG, RIGHT_LUNG, Geometry, StudyResult
from corona_ct.pipeline.errors import ConfigError, GeometryError, InputError, StageError
from corona_ct.pipeline.ingest import StudyInput
from corona_ct.pipeline.layout import DICOM_FILES, MEASUREMENTS_SR_NAME, SEGMENTATION_NAME
from corona_ct.pipeline.severity import counted_region, positive_slices

try:
    import highdicom as hd
except ModuleNotFoundError as missing:  # the optional extra dicom-out
    raise ConfigError("--dicom-out needs highdicom: pip install 'corona-ct[dicom-out]'") from missing

ALGORITHM_NAME = "corona-ct"
#: Series numbers of the derived series (high, so that viewers list them after the CT).
SEG_SERIES_NUMBER, SR_SERIES_NUMBER = 9101, 9102
#: Largest distance (voxels) of a source pixel from a voxel centre of the volume's grid.
GRID_TOLERANCE_VOXELS = 0.05

#: Local codes for measures without a standard concept ("99" schemes are private by DICOM PS3.16).
CORONA_SCHEME = "99CORONACT"
CORONA_SCORE = hd.sr.CodedConcept("CS", CORONA_SCHEME, "Corona score")
CORONA_SCORE_IN_LUNG = hd.sr.CodedConcept("CSL", CORONA_SCHEME, "Corona score inside the lungs")
AFFECTED_PERCENT = hd.sr.CodedConcept("AFF", CORONA_SCHEME, "Affected lung volume percent")
CASE_PROBABILITY = hd.sr.CodedConcept("PCOVID", CORONA_SCHEME, "COVID-19 case probability")
OPACITY_REGION = hd.sr.CodedConcept("CAMOP", CORONA_SCHEME, "Grad-CAM opacity region of the Corona score")
RIGHT_LUNG_CODE = hd.sr.CodedConcept("3341006", "SCT", "Right lung")
LEFT_LUNG_CODE = hd.sr.CodedConcept("44029006", "SCT", "Left lung")
CHEST_CT = hd.sr.CodedConcept("24627-2", "LN", "CT Chest")
CUBIC_CM = hd.sr.CodedConcept("cm3", "UCUM", "cubic centimeter")
PERCENT = hd.sr.CodedConcept("%", "UCUM", "percent")
NO_UNIT = hd.sr.CodedConcept("1", "UCUM", "no units")

#: Type 2 attributes of the Patient and General Study modules, which SEG and SR copy from the source:
#: present but empty where a source leaves them out (COVID-CT-MD has no PatientName); no value is added.
COPIED_TYPE2 = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
)  # fmt: skip

IntArray = npt.NDArray[np.intp]


def refuse_inputs_without_instances(items: Sequence[StudyInput]) -> None:
    """``--dicom-out`` needs DICOM series: name the inputs (NIfTI, TIFF, slice images) that are not."""
    others = [item for item in items if item.kind != "dicom"]
    if others:
        names = ", ".join(f"{item.source.name} ({item.kind})" for item in others[:5])
        raise ConfigError(
            f"--dicom-out writes DICOM SEG/SR that reference the source series' instances, and "
            f"{len(others)} input(s) are no DICOM series: {names}{', ...' if len(others) > 5 else ''}; "
            "run them without --dicom-out (their NIfTI outputs overlay the input)"
        )


def source_datasets(item: StudyInput, series_uid: str) -> list[Dataset]:
    """Headers (no pixel data) of every file of the study's series ``series_uid``, in scan order.

    The copies get the :data:`COPIED_TYPE2` attributes they lack, empty.
    """
    series = next((info for info in item.series if info.uid == series_uid), None)
    if series is None or not series.headers:
        raise InputError(f"the files of series {series_uid} are no longer known")
    datasets: list[Dataset] = [
        pydicom.dcmread(header.path, stop_before_pixels=True) for header in series.headers
    ]
    for ds in datasets:
        for keyword in COPIED_TYPE2:
            if keyword not in ds:
                setattr(ds, keyword, "")
    return datasets


def frame_indices(ds: Dataset, geometry: Geometry) -> tuple[IntArray, IntArray, IntArray] | None:
    """(z, y, x) index arrays, each (rows, columns), of ``ds``'s pixels on the volume's grid.

    None when the instance does not lie on the grid (another orientation or matrix, a
    localizer, a slice the volume resampled): every pixel centre must fall within
    ``GRID_TOLERANCE_VOXELS`` of a voxel centre inside the grid.
    """
    try:
        position = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
        orientation = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
        row_mm, column_mm = (float(v) for v in ds.PixelSpacing)
        rows, columns = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        return None
    if position.shape != (3,) or orientation.shape != (6,):
        return None
    to_index = np.linalg.inv(geometry.affine_lps())
    start = to_index[:3, :3] @ position + to_index[:3, 3]
    along_column = to_index[:3, :3] @ (orientation[:3] * column_mm)  # one column to the right
    along_row = to_index[:3, :3] @ (orientation[3:] * row_mm)  # one row down
    corners = [start, start + (rows - 1) * along_row, start + (columns - 1) * along_column]
    if any(np.abs(c - np.rint(c)).max() > GRID_TOLERANCE_VOXELS for c in (*corners, along_row, along_column)):
        return None
    r, c = np.ogrid[:rows, :columns]
    index = [np.rint(start[a] + r * along_row[a] + c * along_column[a]).astype(np.intp) for a in range(3)]
    z, y, x = (np.broadcast_to(i, (rows, columns)) for i in index)
    if any(i.min() < 0 or i.max() >= n for i, n in zip((z, y, x), geometry.shape, strict=True)):
        return None
    return z, y, x


def frames_on_grid(
    datasets: Sequence[Dataset], geometry: Geometry
) -> tuple[list[Dataset], list[tuple[IntArray, IntArray, IntArray]]]:
    """The source instances that tile the volume's grid, each voxel exactly once, with their indices.

    Instances off the grid are left out; a second instance at a place already covered (an
    identical duplicate the ingest dropped) too. Raises ``GeometryError`` when the rest does
    not cover every voxel once (a gantry-tilted or resampled series, a dropped damaged file).
    """
    covered = np.zeros(geometry.shape, dtype=np.uint8)
    kept: list[Dataset] = []
    indices: list[tuple[IntArray, IntArray, IntArray]] = []
    for ds in datasets:
        index = frame_indices(ds, geometry)
        if index is None or covered[index].any():
            continue
        covered[index] = 1
        kept.append(ds)
        indices.append(index)
    if not covered.all():
        raise GeometryError(
            f"the source instances cover {int(covered.sum())} of {covered.size} voxels of the "
            "analysed volume (a gantry tilt was sheared out, or files were dropped); a DICOM SEG would not "
            "lie on the source images, so none is written"
        )
    return kept, indices


def check_source_uids(sources: Sequence[Dataset]) -> None:
    """Raise ``InputError`` when a source instance lacks a valid UID that SEG and SR must reference or copy.

    Some public collections (COVID-CT-MD) carry no SOP Instance UID and GUIDs as study UIDs;
    a PACS assigns UIDs on import, and the objects must reference those, which only it knows.
    """
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID"):
        bad = sum(not pydicom.uid.UID(str(ds.get(keyword) or "")).is_valid for ds in sources)
        if bad:
            raise InputError(
                f"{bad} of {len(sources)} source files carry no valid {keyword} (empty or not a DICOM UID), "
                "which a DICOM SEG/SR must reference; none is written: run --dicom-out on the series as "
                "your PACS stores it (with the UIDs it assigned), or run without --dicom-out"
            )


def _algorithm() -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME, family=codes.cid7162.ArtificialIntelligence, version=__version__
    )


def _segment(
    number: int, label: str, category: Code | hd.sr.CodedConcept, kind: Code | hd.sr.CodedConcept
) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label,
        segmented_property_category=category,
        segmented_property_type=kind,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=_algorithm(),
        tracking_uid=hd.UID(),
        tracking_id=label,
    )


def build_segmentation(
    result: StudyResult,
    config: PipelineConfig,
    sources: Sequence[Dataset],
    indices: Sequence[tuple[IntArray, IntArray, IntArray]],
) -> hd.seg.Segmentation:
    """The SEG of ``result``: one frame per source instance and segment, from :func:`frames_on_grid`."""
    labels = result.lung_mask.labels
    positive = positive_slices(result.scores, config.classify.positive_threshold)
    opacity = counted_region(result.cams.maps, positive, config.cam.activation_threshold, labels > 0)
    segments = np.stack([labels == RIGHT_LUNG, labels == LEFT_LUNG, opacity], axis=-1)  # (z, y, x, 3)
    frames = np.stack([segments[index] for index in indices])  # (n, rows, columns, 3)
    anatomy = codes.SCT.AnatomicalStructure
    descriptions = [
        _segment(1, "Right lung", anatomy, RIGHT_LUNG_CODE),
        _segment(2, "Left lung", anatomy, LEFT_LUNG_CODE),
        _segment(3, "Corona score opacity", codes.SCT.MorphologicallyAbnormalStructure, codes.DCM.Opacity),
    ]
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=ALGORITHM_NAME,
        manufacturer_model_name=ALGORITHM_NAME,
        software_versions=__version__,
        device_serial_number="none",
        series_description="corona-ct lungs and opacity (research use only)",
        omit_empty_frames=False,
    )


def _measure(name: hd.sr.CodedConcept, value: float, unit: hd.sr.CodedConcept) -> hd.sr.Measurement:
    algorithm = hd.sr.AlgorithmIdentification(name=ALGORITHM_NAME, version=__version__)
    return hd.sr.Measurement(name=name, value=float(value), unit=unit, algorithm_id=algorithm)


def build_report(
    result: StudyResult, seg: hd.seg.Segmentation, sources: Sequence[Dataset]
) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 measurement report of an assessable ``result``; groups reference ``seg``'s segments."""
    severity, probability = result.severity, result.case_probability
    if severity is None or probability is None:
        raise ValueError("a measurement report needs an assessable study")
    algorithm = hd.sr.AlgorithmIdentification(name=ALGORITHM_NAME, version=__version__)
    study = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="corona-ct study measures"),
        finding_type=codes.SCT.Lung,
        algorithm_id=algorithm,
        measurements=[
            _measure(CORONA_SCORE, severity.corona_score_cm3, CUBIC_CM),
            _measure(CORONA_SCORE_IN_LUNG, severity.corona_score_in_lung_cm3, CUBIC_CM),
            _measure(codes.SCT.Volume, severity.lung_volume_cm3, CUBIC_CM),
            _measure(AFFECTED_PERCENT, severity.affected_percent, PERCENT),
            _measure(CASE_PROBABILITY, probability, NO_UNIT),
        ],
    )
    groups: list[object] = [study]
    for number, finding, values in (
        (1, RIGHT_LUNG_CODE, severity.right),
        (2, LEFT_LUNG_CODE, severity.left),
    ):
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=finding.meaning),
                referenced_segment=hd.sr.ReferencedSegment.from_segmentation(seg, number),
                finding_type=finding,
                algorithm_id=algorithm,
                measurements=[
                    _measure(codes.SCT.Volume, values.lung_volume_cm3, CUBIC_CM),
                    _measure(CORONA_SCORE_IN_LUNG, values.corona_score_cm3, CUBIC_CM),
                    _measure(AFFECTED_PERCENT, values.affected_percent, PERCENT),
                ],
            )
        )
    groups.append(
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="Corona score opacity"),
            referenced_segment=hd.sr.ReferencedSegment.from_segmentation(seg, 3),
            finding_type=OPACITY_REGION,
            algorithm_id=algorithm,
            measurements=[_measure(CORONA_SCORE_IN_LUNG, severity.corona_score_in_lung_cm3, CUBIC_CM)],
        )
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name=ALGORITHM_NAME, model_name=f"{ALGORITHM_NAME} {__version__}"
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=CHEST_CT,
        imaging_measurements=groups,  # type: ignore[arg-type]
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[seg, *sources],
        content=report,
        series_instance_uid=hd.UID(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=ALGORITHM_NAME,
        is_complete=True,
        series_description="corona-ct measurements (research use only)",
    )


def _save(dataset: Dataset, path: Path) -> None:
    with atomic_path(path) as tmp:
        dataset.save_as(tmp, enforce_file_format=True)


def write_dicom_outputs(
    study_dir: Path, result: StudyResult, config: PipelineConfig, item: StudyInput
) -> list[str]:
    """Write the SEG and SR of an assessable study from a DICOM series; returns the file names written.

    A not-assessable study gets none (no opacity, no measures to report): returns []. A series
    whose instances cannot be referenced (:func:`frames_on_grid`, :func:`check_source_uids`)
    raises ``StageError`` (stage ``dicom-out``): the study's row is failed and says why.
    """
    if not result.assessable or result.severity is None:
        return []
    series_uid = str(result.volume.meta.get("SeriesInstanceUID", ""))
    try:
        sources, indices = frames_on_grid(source_datasets(item, series_uid), result.volume.geometry)
        check_source_uids(sources)
        seg = build_segmentation(result, config, sources, indices)
        sr = build_report(result, seg, sources)
    except (InputError, GeometryError) as error:
        raise StageError("dicom-out", result.volume.study_id, str(error)) from error
    except (ValueError, TypeError, AttributeError, KeyError) as error:  # highdicom's checks of the sources
        raise StageError("dicom-out", result.volume.study_id, f"{type(error).__name__}: {error}") from error
    _save(seg, study_dir / SEGMENTATION_NAME)
    _save(sr, study_dir / MEASUREMENTS_SR_NAME)
    return list(DICOM_FILES)
