"""Completion records: what a resumed run checks before it reuses a finished study.

``OUT/<id>/.complete.json`` is written last, after every other file of the study, and records
every output file's size and SHA-256, the config hash, the model checksums, the input identity
and the corona-ct version. A study is reused only when all of them still match
(:func:`verify_complete`); otherwise it is recomputed and the reason is given.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from corona_ct.pipeline import __version__
from corona_ct.pipeline.atomic import sha256_file, write_json
from corona_ct.pipeline.config import PipelineConfig
from corona_ct.pipeline.layout import COMPLETE_NAME, REPORT_JSON_NAME
from corona_ct.pipeline.modelset import ModelSet, models_key
from corona_ct.pipeline.study_ids import InputIdentity

#: Version of the ``.complete.json`` layout; a record of another format is not trusted.
RECORD_FORMAT = 1


def expected_record(
    config: PipelineConfig,
    models: ModelSet,
    identity: InputIdentity,
    series_uid: str | None,
    all_series: bool,
) -> dict[str, object]:
    """The fields of a completion record that must equal this run's for a study to be reused."""
    return {
        "corona_ct_version": __version__,
        "config_hash": config.hash(),
        "models_key": models_key(models),
        "input": {**identity.to_dict(), "series_option": series_uid, "all_series": all_series},
    }


def write_completion_record(study_dir: Path, expected: Mapping[str, object], files: Sequence[str]) -> None:
    """``.complete.json``, written last: the expected fields plus every output's size and SHA-256."""
    record = {
        "format": RECORD_FORMAT,
        **expected,
        "files": {
            name: {"size": (study_dir / name).stat().st_size, "sha256": sha256_file(study_dir / name)}
            for name in files
        },
    }
    write_json(study_dir / COMPLETE_NAME, record, sort_keys=True)


_WHAT_CHANGED = {
    "corona_ct_version": "it was made by another corona-ct version",
    "config_hash": "the config changed",
    "models_key": "the model weights changed",
    "input": "its input changed (or another series was chosen)",
    "dicom_out": "--dicom-out was not given when it was written",
}


def verify_complete(study_dir: Path, expected: Mapping[str, object]) -> tuple[dict[str, object] | None, str]:
    """(report.json, "") when the study's completion record matches ``expected`` and every file it lists.

    Otherwise (None, why it must be recomputed); the reason is "" when the folder does not exist.
    """
    record_path = study_dir / COMPLETE_NAME
    if not record_path.is_file():
        return None, "it did not finish (no completion record)" if study_dir.is_dir() else ""
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, "its completion record is unreadable"
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        return None, "its completion record has another format"
    for key, value in expected.items():
        if record.get(key) != value:
            return None, _WHAT_CHANGED.get(key, f"{key} changed")
    files = record.get("files")
    if not isinstance(files, dict) or REPORT_JSON_NAME not in files:
        return None, "its completion record lists no files"
    for name, meta in files.items():
        path = study_dir / name
        if not isinstance(meta, dict):
            return None, "its completion record is damaged"
        if not path.is_file():
            return None, f"{name} is missing"
        if path.stat().st_size != meta.get("size"):
            return None, f"{name} has {path.stat().st_size} bytes, {meta.get('size')} were written"
        if sha256_file(path) != meta.get("sha256"):
            return None, f"{name} changed since it was written"
    try:
        report = json.loads((study_dir / REPORT_JSON_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, "report.json is unreadable"
    if not isinstance(report, dict) or not isinstance(report.get("summary"), dict):
        return None, "report.json has no summary"
    return report, ""
