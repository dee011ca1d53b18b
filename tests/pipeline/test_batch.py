"""The batch runner never loses or hides a result: earlier rows, concurrent runs, study ids, resume.

Phantom studies, random classifier weights (the numbers do not matter here, only where they go).
Crash consistency under real signals is in test_batch_crash.py.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from corona_ct.data.phantom import make_phantom
from corona_ct.data.writers import write_dicom_series, write_nifti
from corona_ct.pipeline import study_job as study_job_module
from corona_ct.pipeline.analysis.tables import read_mapping
from corona_ct.pipeline.batch import run_batch
from corona_ct.pipeline.cli import main
from corona_ct.pipeline.completion import verify_complete
from corona_ct.pipeline.config import PipelineConfig
from corona_ct.pipeline.errors import ConfigError, InputError
from corona_ct.pipeline.ingest import StudyInput, discover
from corona_ct.pipeline.layout import COMPLETE_NAME
from corona_ct.pipeline.modelset import load_models
from corona_ct.pipeline.output_folder import output_lock
from corona_ct.pipeline.study_ids import input_identity, write_ids_file

SMALL = {"roi.input_size": 64, "runtime.device": "cpu", "segment.method": "classical"}
SHAPE = {"shape": (10, 96, 96), "spacing_mm": (5.0, 3.2, 3.2)}
CLI = [
    "--allow-untrained",
    "--set",
    "roi.input_size=64",
    "--set",
    "segment.method=classical",
    "--device",
    "cpu",
]


@pytest.fixture(scope="module")
def config() -> PipelineConfig:
    return PipelineConfig().replace(SMALL)


@pytest.fixture(scope="module")
def models(config: PipelineConfig):
    return load_models(config, allow_untrained=True)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Patients A and B, each series in a folder named DICOM (a/patA/DICOM, b/patB/DICOM); C a NIfTI."""
    root = tmp_path_factory.mktemp("inputs")
    a, b, c = root / "a" / "patA" / "DICOM", root / "b" / "patB" / "DICOM", root / "c.nii.gz"
    write_dicom_series(make_phantom(seed=3, lesions="mixed", **SHAPE), a, patient_id="A-1")
    write_dicom_series(make_phantom(seed=4, lesions="none", **SHAPE), b, patient_id="B-1")
    write_nifti(make_phantom(seed=5, lesions="mixed", **SHAPE), c)
    return SimpleNamespace(root=root, a=a, b=b, c=c)


def _rows(output: Path) -> dict[str, dict[str, str]]:
    with (output / "summary.csv").open() as handle:
        return {row["study_id"]: row for row in csv.DictReader(handle)}


# --------------------------------------------------------------------------- 1: earlier results


def test_a_plain_run_into_an_output_with_earlier_results_is_refused(inputs, config, models, tmp_path, capsys):
    out = tmp_path / "out"
    run_batch([inputs.a], out, config, models, show_progress=False)
    before = (out / "summary.csv").read_bytes()
    assert main(["run", str(inputs.c), "--output", str(out), *CLI]) == 2
    err = capsys.readouterr().err
    assert f"{out} already holds results of an earlier run" in err
    assert "--resume" in err and "--overwrite" in err
    assert (out / "summary.csv").read_bytes() == before  # nothing was touched
    with pytest.raises(ConfigError, match="--resume"):
        run_batch([inputs.c], out, config, models, show_progress=False)

    outcome = run_batch([inputs.c], out, config, models, resume=True, show_progress=False)
    assert [row["study_id"] for row in outcome.kept] == ["DICOM"]
    assert sorted(_rows(out)) == ["DICOM", "c"]  # merged by study id: the earlier row is kept


def test_run_help_documents_the_choice(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "is refused (exit 2) unless you pass --resume" in text and "--overwrite" in text


@pytest.mark.slow
def test_overwrite_keeps_the_previous_summary_until_the_new_batch_is_done(
    inputs, config, models, tmp_path, monkeypatch
) -> None:
    out = tmp_path / "out"
    run_batch([inputs.a, inputs.c], out, config, models, show_progress=False)
    before = (out / "summary.csv").read_bytes()
    real = study_job_module.analyze_study
    calls = {"n": 0}

    def interrupt_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(study_job_module, "analyze_study", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        run_batch([inputs.a, inputs.c], out, config, models, overwrite=True, show_progress=False)
    assert (out / "summary.csv").read_bytes() == before  # not empty, not partial: the previous one

    calls["n"] = 1  # the next call is interrupted: a fresh run stopped in its first study
    with pytest.raises(KeyboardInterrupt):
        run_batch([inputs.c], tmp_path / "fresh", config, models, show_progress=False)
    assert not (tmp_path / "fresh" / "summary.csv").exists()  # no empty summary.csv either

    monkeypatch.setattr(study_job_module, "analyze_study", real)
    run_batch([inputs.c], out, config, models, overwrite=True, show_progress=False)
    assert sorted(_rows(out)) == ["c"]  # --overwrite: this run's studies only


# --------------------------------------------------------------------------- 2: one writer


LOCK_HOLDER = """
import sys, time
from pathlib import Path
from corona_ct.pipeline.output_folder import output_lock
with output_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.mark.slow
def test_a_second_run_on_one_output_is_refused_naming_the_holder(inputs, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(out)], stdout=subprocess.PIPE, text=True, env=dict(os.environ)
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert main(["run", str(inputs.c), "--output", str(out), *CLI]) == 2
        err = capsys.readouterr().err
        assert f"{out} is in use by another corona-ct run (pid {holder.pid} " in err
        assert not (out / "summary.csv").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # the kernel releases a dead holder's lock
        holder.wait()
    with output_lock(out):
        pass


# --------------------------------------------------------------------------- 3: ids


@pytest.mark.slow
def test_folder_ids_and_an_ids_file_that_links_them_to_the_inputs(inputs, config, models, tmp_path, capsys):
    named = tmp_path / "in" / "Secret_Patient"
    write_dicom_series(make_phantom(seed=6, lesions="none", **SHAPE), named, patient_name="Secret^Patient")
    ids = tmp_path / "private" / "ids.csv"

    out = tmp_path / "deid"
    run_batch([named, inputs.c], out, config, models, ids_file=ids, show_progress=False)
    with ids.open() as handle:
        deid = {row["input"]: row for row in csv.DictReader(handle)}
    assert deid[str(named.resolve())]["study_id"].startswith("study-")  # the folder holds the patient's name
    assert deid[str(inputs.c.resolve())]["study_id"] == "c"
    assert sorted(_rows(out)) == sorted(row["study_id"] for row in deid.values())

    folder_ids = tmp_path / "private" / "folder-ids.csv"
    out = tmp_path / "folder"
    run_batch(
        [named, inputs.c],
        out,
        config,
        models,
        study_naming="folder",
        ids_file=folder_ids,
        show_progress=False,
    )
    assert sorted(_rows(out)) == ["Secret_Patient", "c"]  # as given: the user asked for folder names
    with folder_ids.open() as handle:
        assert {r["study_id"]: r["input"] for r in csv.DictReader(handle)}["Secret_Patient"] == str(
            named.resolve()
        )

    with pytest.raises(ConfigError, match="--ids-file-in-output"):
        run_batch([inputs.c], tmp_path / "x", config, models, ids_file=tmp_path / "x" / "ids.csv")
    capsys.readouterr()
    args = ["run", str(inputs.c), "--output", str(out), "--resume", "--ids-file", str(out / "ids.csv"), *CLI]
    assert main(args) == 2 and "inside the output folder" in capsys.readouterr().err
    assert main([*args, "--ids-file-in-output"]) == 0
    assert "links study ids to input paths" in capsys.readouterr().err
    assert (out / "ids.csv").is_file()


def test_analyze_joins_labels_by_study_id_input_path_or_folder_name(inputs, tmp_path) -> None:
    ids = tmp_path / "ids.csv"
    write_ids_file(
        ids,
        [
            ("DICOM", StudyInput("dicom", "DICOM", inputs.a)),
            ("DICOM-2", StudyInput("dicom", "DICOM-2", inputs.b)),
            ("c", StudyInput("nifti", "c", inputs.c)),
        ],
    )
    labels = tmp_path / "labels.csv"
    labels.write_text(f"input,label\npatA,covid\n{inputs.b.resolve()},normal\nc.nii.gz,covid\n")
    assert read_mapping(labels, "label", "labels file", ids) == {
        "DICOM": "covid",
        "DICOM-2": "normal",
        "c": "covid",
    }
    labels.write_text("study_id,label\nDICOM-2,normal\nc,covid\n")
    assert read_mapping(labels, "label", "labels file", ids) == {"DICOM-2": "normal", "c": "covid"}
    labels.write_text("input,label\nDICOM,covid\n")  # the folder name both patients' series have
    with pytest.raises(InputError, match="names several studies"):
        read_mapping(labels, "label", "labels file", ids)
    labels.write_text("input,label\npatA,covid\n")
    with pytest.raises(InputError, match="--ids-file"):
        read_mapping(labels, "label", "labels file")


# --------------------------------------------------------------------------- 4: resume by identity


def test_input_identity_follows_the_content_not_the_place(inputs, tmp_path) -> None:
    a, b = (input_identity(discover([p])[0]) for p in (inputs.a, inputs.b))
    assert a.key != b.key  # same folder name, same file names and sizes, other series
    moved = tmp_path / "moved" / "DICOM"
    shutil.copytree(inputs.a, moved)
    copy = input_identity(discover([moved])[0])
    assert copy.key == a.key  # a moved study is the same study
    first = sorted(moved.iterdir())[0]
    os.utime(first, ns=(1, 1))
    touched = input_identity(discover([moved])[0])
    assert touched.key == a.key and touched.fingerprint != copy.fingerprint  # an edited file is noticed

    nifti = tmp_path / "scan.nii"
    write_nifti(make_phantom(seed=7, **SHAPE), nifti)
    before = input_identity(discover([nifti])[0])
    write_nifti(make_phantom(seed=8, **SHAPE), nifti)  # same size, other contents
    assert input_identity(discover([nifti])[0]).key != before.key


def test_resume_matches_what_the_study_is_not_its_folder_name(inputs, config, models, tmp_path) -> None:
    out = tmp_path / "out"
    run_batch([inputs.a], out, config, models, show_progress=False)
    alone = run_batch([inputs.b], tmp_path / "b-alone", config, models, show_progress=False)
    outcome = run_batch([inputs.b], out, config, models, resume=True, show_progress=False)
    assert outcome.skipped == []  # B is not A, although both folders are named DICOM
    rows = _rows(out)
    assert sorted(rows) == ["DICOM", "DICOM-2"]
    assert rows["DICOM-2"]["case_probability"] == alone.rows[0]["case_probability"]
    assert rows["DICOM"]["case_probability"] != rows["DICOM-2"]["case_probability"]

    again = run_batch([inputs.b, inputs.a], out, config, models, resume=True, show_progress=False)
    assert sorted(again.skipped) == ["DICOM", "DICOM-2"]  # each input gets its own id back


# --------------------------------------------------------------------------- 5: completion record


def _damage_then_resume(out, study, damage, inputs, config, models, caplog):
    damage(out / study)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="corona_ct.pipeline.batch"):
        outcome = run_batch([inputs.c], out, config, models, resume=True, show_progress=False)
    assert outcome.skipped == []
    record = json.loads((out / study / COMPLETE_NAME).read_text())
    assert verify_complete(out / study, {k: record[k] for k in ("config_hash", "models_key", "input")})[0]
    return outcome.recomputed[study], caplog.text


@pytest.mark.slow
def test_resume_verifies_every_output_before_reusing_a_study(
    inputs, config, models, tmp_path, caplog
) -> None:
    out = tmp_path / "out"
    run_batch([inputs.c], out, config, models, show_progress=False)
    other = config.replace({"cam.activation_threshold": 0.5})
    run_batch([inputs.c], tmp_path / "other", other, models, show_progress=False)
    assert run_batch([inputs.c], out, config, models, resume=True, show_progress=False).skipped == ["c"]

    cases = {
        "heatmap.nii.gz has 100 bytes": lambda d: os.truncate(d / "heatmap.nii.gz", 100),
        "features.npz has 0 bytes": lambda d: os.truncate(d / "features.npz", 0),
        "report.json": lambda d: shutil.copy(tmp_path / "other" / "c" / "report.json", d / "report.json"),
        "did not finish": lambda d: (d / COMPLETE_NAME).unlink(),
        "lung_mask.nii.gz is missing": lambda d: (d / "lung_mask.nii.gz").unlink(),
    }
    for expected, damage in cases.items():
        why, logged = _damage_then_resume(out, "c", damage, inputs, config, models, caplog)
        assert expected in why
        assert f"c: recomputing: {why}" in logged

    outcome = run_batch([inputs.c], out, other, models, resume=True, show_progress=False)
    assert outcome.recomputed == {"c": "the config changed"}
