"""``corona-ct inspect`` through ``pipeline.cli.main``: tables, choice, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from corona_ct.pipeline import cli
from tests.ingest.dicom_factory import CORONAL, phantom_hu, write_series


@pytest.fixture(autouse=True)
def _inspect_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # Other subcommands are built elsewhere; the parser here needs only this one.
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("corona_ct.pipeline.commands.inspect",))


def _two_series(root: Path) -> None:
    write_series(root / "axial", phantom_hu((6, 16, 16)), series_uid="1.2.3.4.100000000001")
    write_series(
        root / "coronal", phantom_hu((9, 16, 16)), series_uid="1.2.3.4.100000000002",
        orientation=CORONAL, image_type=("DERIVED", "SECONDARY", "MPR"),
    )  # fmt: skip


def test_lists_series_and_choice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _two_series(tmp_path / "study")
    assert cli.main(["inspect", str(tmp_path / "study")]) == 0
    out = capsys.readouterr().out
    assert "study study  (dicom)" in out
    assert "…100000000001  CT        ORIGINAL/PRIMARY/AXIAL" in out
    assert "coronal" in out and "Explicit VR Little Endian" in out
    assert "chosen: …100000000001 (6 slices): best of 2 CT series" in out and "decided by: axial" in out


def test_series_and_all_series_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _two_series(tmp_path / "study")
    assert cli.main(["inspect", str(tmp_path / "study"), "--series", "100000000002"]) == 0
    assert "chosen: …100000000002 (9 slices): chosen with --series" in capsys.readouterr().out
    assert cli.main(["inspect", str(tmp_path / "study"), "--all-series"]) == 0
    assert "chosen: all 2 usable CT series" in capsys.readouterr().out
    assert cli.main(["inspect", str(tmp_path / "study"), "--series", "9.9.9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--series '9.9.9' matches no study" in err


def test_two_patient_folder_lists_both(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "mixed"
    for patient in ("1", "2"):
        write_series(
            folder, phantom_hu((6, 16, 16)), names=[f"p{patient}_{k}.dcm" for k in range(6)],
            patient_id=f"P{patient}", study_uid=f"1.2.3.{patient}", series_uid=f"1.2.3.{patient}.1",
        )  # fmt: skip
    assert cli.main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "study mixed  (dicom)" in out and "study mixed-2  (dicom)" in out
    assert "2 studies found; 2 can be analysed" in out


@pytest.mark.parametrize(
    ("setup", "expected"),
    [("empty", "empty"), ("mr", "magnetic resonance"), ("syntax", "is not a DICOM transfer syntax")],
)
def test_bad_input_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setup: str, expected: str
) -> None:
    folder = tmp_path / setup
    folder.mkdir()
    if setup == "mr":
        write_series(folder, phantom_hu((6, 16, 16)), modality="MR")
    if setup == "syntax":
        write_series(folder, phantom_hu((6, 16, 16)), mutate=_private_syntax)
    assert cli.main(["inspect", str(folder)]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert expected in captured.err
    if setup != "empty":
        assert "cannot be analysed: series" in captured.out


def _private_syntax(_: int, ds: Dataset) -> None:
    ds.file_meta.TransferSyntaxUID = "1.2.3.4"  # a valid UID, but no transfer syntax


@pytest.mark.realdata
def test_inspect_real_folders(shared_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folders = [
        str(shared_data / "dicom" / name) for name in ("LIDC-IDRI-0001", "LIDC-IDRI-0002", "abdomen-j2k")
    ]
    assert cli.main(["inspect", *folders]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "3 studies found; 3 can be analysed" in out
    assert "JPEG 2000 Image Compression (Lossless Only)" in out
    for slices, spacing in (("16", "2.5"), ("12", "1.25"), ("20", "2")):
        assert any(f"  {slices}  " in line and f"  {spacing}  " in line for line in out.splitlines())
    for folder in folders:  # the user's own paths are echoed; nothing else may carry the PatientID
        out = out.replace(folder, "")
    assert "LIDC-IDRI" not in out
