"""The output folder's layout, shared by the writers and the readers of a run's results.

OUT/
    summary.csv             one row per study (:data:`SUMMARY_COLUMNS`)
    .corona-ct-output       marks a folder this tool wrote (never read back as input)
    .corona-ct.lock         held while a run writes here
    .corona-ct-ids.json     input identity → study id, so that a rerun keeps the ids
    <study_id>/             :data:`STUDY_FILES` (:data:`NOT_ASSESSABLE_FILES` when no lungs)
        .complete.json      written last: sizes and hashes of the study's files
        segmentation.dcm, measurements_sr.dcm   with --dicom-out (DICOM SEG and SR)
OUT/ of ``explain``: predictions.csv (:data:`PREDICTION_COLUMNS`) and one map per image.
"""

from __future__ import annotations

SUMMARY_NAME = "summary.csv"
OUTPUT_MARKER = ".corona-ct-output"
LOCK_NAME = ".corona-ct.lock"
REGISTRY_NAME = ".corona-ct-ids.json"
COMPLETE_NAME = ".complete.json"

LUNG_MASK_NAME = "lung_mask.nii.gz"
HEATMAP_NAME = "heatmap.nii.gz"
FEATURES_NAME = "features.npz"
REPORT_HTML_NAME = "report.html"
REPORT_JSON_NAME = "report.json"
#: ``run --dicom-out``: a DICOM Segmentation and a TID 1500 measurement report (DICOM series inputs).
SEGMENTATION_NAME = "segmentation.dcm"
MEASUREMENTS_SR_NAME = "measurements_sr.dcm"
DICOM_FILES = (SEGMENTATION_NAME, MEASUREMENTS_SR_NAME)
#: Every file a study folder may hold, the completion record aside.
STUDY_FILES = (LUNG_MASK_NAME, HEATMAP_NAME, FEATURES_NAME, REPORT_HTML_NAME, REPORT_JSON_NAME, *DICOM_FILES)
#: What an assessable study writes (report.json is listed in it by the batch, which writes it last).
ASSESSABLE_FILES = (LUNG_MASK_NAME, HEATMAP_NAME, FEATURES_NAME, REPORT_HTML_NAME)
#: What a study without plausible lungs writes: no heat map, no features.
NOT_ASSESSABLE_FILES = (LUNG_MASK_NAME, REPORT_HTML_NAME)

SUMMARY_COLUMNS = (
    "study_id",
    "status",
    "source",
    "n_slices",
    "slices_evaluated",
    "positive_slices",
    "empty_cam_positive_slices",
    "case_probability",
    "corona_score_cm3",
    "corona_score_in_lung_cm3",
    "lung_volume_cm3",
    "affected_percent",
    "ggo_percent",
    "consolidation_percent",
    "reason",
    "error",
)
#: Arrays of features.npz that clustering needs (``thumbnails`` and ``cams`` are optional, ``study_id`` too).
FEATURE_KEYS = ("slice_index", "z_mm", "probability", "features", "weights")
FEATURE_IMAGE_KEYS = ("thumbnails", "cams")

PREDICTIONS_NAME = "predictions.csv"
PREDICTION_COLUMNS = ("input", "file", "status", "probability", "roi", "cam", "overlay", "error")
