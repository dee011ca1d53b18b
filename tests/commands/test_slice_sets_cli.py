"""Slice sets and mask folders through `run`, `inspect` and `explain` (issue 11)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from corona_ct.data.phantom import make_phantom
from corona_ct.data.writers import write_dicom_series, write_png_slices, write_tiff_slices
from corona_ct.pipeline.cli import main

FAST = ["--set", "roi.input_size=64", "--device", "cpu"]


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(seed=5, shape=(8, 80, 96), spacing_mm=(5.0, 3.5, 3.5), lesions="mixed")


def _slice_set(folder: Path, phantom) -> list[Path]:
    """Three phantom slices cropped to different sizes, named like figure crops."""
    files = write_png_slices(phantom, folder / "tmp")
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for index, (path, crop) in enumerate(zip(files[2:5], (0, 4, 8))):
        with Image.open(path) as image:
            cropped = image.crop((crop, 0, image.width - crop, image.height))
            cropped.save(folder / f"fig{index}-p{index + 3}.png")
        out.append(folder / f"fig{index}-p{index + 3}.png")
    shutil.rmtree(folder / "tmp")
    return out


def _masks(folder: Path, count: int = 3) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        mask = np.zeros((60 + index, 70), np.uint8)
        mask[10:30, 20:40] = 255
        Image.fromarray(mask).save(folder / f"{index}.png")


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_run_on_a_slice_set_says_use_explain_before_loading_models(tmp_path: Path, phantom, capsys) -> None:
    _slice_set(tmp_path / "figures", phantom)
    # No weights are installed in the test session: the weights error would come if models were loaded first.
    assert main(["run", str(tmp_path / "figures"), "--output", str(tmp_path / "out"), *FAST]) == 2
    line = _one_line_error(capsys)
    assert f"{tmp_path / 'figures'}: 3 independent 2D PNG/JPEG images, not one CT volume" in line
    assert f"run `corona-ct explain {tmp_path / 'figures'}`" in line and "weights" not in line
    assert not (tmp_path / "out").exists()


def test_run_and_inspect_refuse_a_mask_folder_naming_the_evidence(tmp_path: Path, capsys) -> None:
    _masks(tmp_path / "GT")
    assert main(["run", str(tmp_path / "GT"), "--output", str(tmp_path / "out"), *FAST]) == 2
    line = _one_line_error(capsys)
    assert (
        f"{tmp_path / 'GT'}: looks like a mask folder" in line
        and "all 3 images are binary (values 0 and 255)" in line
    )
    assert main(["inspect", str(tmp_path / "GT")]) == 2
    captured = capsys.readouterr()
    assert "cannot be analysed:" in captured.out and "1 study found; 0 can be analysed" in captured.out
    assert captured.err.count("\n") == 1 and "all 3 images are binary" in captured.err


def test_inspect_names_a_slice_set_and_passes_a_tiff_ct(tmp_path: Path, phantom, capsys) -> None:
    _slice_set(tmp_path / "figures", phantom)
    assert main(["inspect", str(tmp_path / "figures")]) == 2
    captured = capsys.readouterr()
    assert "cannot be analysed:" in captured.out and "corona-ct explain" in captured.err
    write_tiff_slices(phantom, tmp_path / "patient1")
    assert main(["inspect", str(tmp_path / "patient1")]) == 0
    out = capsys.readouterr().out
    assert "study patient1  (tiff)" in out and "note: 8 TIFF slices of 96×80" in out
    assert "1 study found; 1 can be analysed" in out


@pytest.mark.slow
def test_run_goes_on_when_a_ct_is_beside_the_slice_set(tmp_path: Path, phantom, capsys) -> None:
    write_dicom_series(phantom, tmp_path / "in" / "chest")
    _slice_set(tmp_path / "in" / "figures", phantom)
    args = [
        "run",
        str(tmp_path / "in"),
        "--output",
        str(tmp_path / "out"),
        "--allow-untrained",
        "--no-progress",
    ]
    assert main([*args, *FAST]) == 1  # the slice set fails, the CT is analysed
    rows = {row["study_id"]: row for row in _rows(tmp_path / "out" / "summary.csv")}
    # the one DICOM study takes the id of the folder given
    assert rows["in"]["status"] == "ok" and rows["figures"]["status"] == "failed"
    assert "corona-ct explain" in rows["figures"]["error"]


def test_explain_refuses_a_mask_folder_before_loading_models(tmp_path: Path, phantom, capsys) -> None:
    _slice_set(tmp_path / "train" / "Imgs", phantom)
    _masks(tmp_path / "train" / "GT")
    assert main(["explain", str(tmp_path / "train"), "--output", str(tmp_path / "x"), *FAST]) == 2
    line = _one_line_error(capsys)
    assert f"{tmp_path / 'train' / 'GT'}: looks like a mask folder" in line and "weights" not in line


def test_explain_folders_keep_inputs_and_never_collide(
    tmp_path: Path, phantom, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    files = write_png_slices(phantom, tmp_path / "png")
    for folder, source in (("a", files[3]), ("b", files[4])):
        (tmp_path / folder).mkdir()
        shutil.copy(source, tmp_path / folder / "1.png")
    odd = tmp_path / "a" / "39%2, copy.png"
    shutil.copy(files[5], odd)
    code = main(
        ["explain", "a", "./b/", str(tmp_path / "a" / "1.png"), "-o", "x", "--allow-untrained", *FAST]
    )
    assert code == 0
    rows = _rows(tmp_path / "x" / "predictions.csv")
    assert [row["input"] for row in rows] == [
        "a/1.png",
        "a/39%2, copy.png",
        "./b/1.png",
        str(tmp_path / "a" / "1.png"),
    ]
    assert [row["file"] for row in rows] == ["1.png", "39%2, copy.png", "1.png", "1.png"]
    cams = [row["cam"] for row in rows]
    assert len(set(cams)) == 4 and all(row["status"] == "ok" for row in rows)
    for row, source in zip(rows, [files[3], odd, files[4], files[3]]):
        cam = np.load(tmp_path / "x" / row["cam"])
        with Image.open(source) as image:
            assert cam.shape == (image.height, image.width)
        assert (tmp_path / "x" / row["overlay"]).is_file()
    assert rows[0]["probability"] == rows[3]["probability"]  # the same file twice: same answer, own outputs
    assert "a/39%2, copy.png: p = " in capsys.readouterr().out


@pytest.mark.slow
def test_explain_failures_stay_with_their_image(
    tmp_path: Path, phantom, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = write_png_slices(phantom, tmp_path / "set")
    (tmp_path / "set" / "truncated.png").write_bytes(files[0].read_bytes()[:60])
    for path in files[:3] + files[6:]:
        path.unlink()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "set" / "blank.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[10:30, 10:30] = 255
    Image.fromarray(mask).save(tmp_path / "set" / "mask.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200), np.uint8)).save(
        tmp_path / "set" / "huge.png"
    )
    # PIL's own decompression-bomb guard (not a corona-ct error) refuses the 200×200 image.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 15_000)
    code = main(["explain", str(tmp_path / "set"), "-o", str(tmp_path / "x"), "--allow-untrained", *FAST])
    assert code == 1
    rows = {row["file"]: row for row in _rows(tmp_path / "x" / "predictions.csv")}
    assert {name for name, row in rows.items() if row["status"] == "ok"} == {
        "phantom_slice_4.png",
        "phantom_slice_5.png",
        "phantom_slice_6.png",
    }
    assert "blank image (value 0 everywhere)" in rows["blank.png"]["error"]
    assert "binary image (values 0 and 255 only)" in rows["mask.png"]["error"]
    assert rows["truncated.png"]["status"] == "failed" and rows["huge.png"]["status"] == "failed"
    assert all(rows[name]["cam"] == "" for name in ("blank.png", "mask.png", "truncated.png", "huge.png"))


# ----------------------------------------------------------------------------- real data


@pytest.mark.realdata
@pytest.mark.parametrize(
    ("command", "folder", "expected"),
    [
        ("run", "covid-ct/CT_COVID", "independent 2D PNG/JPEG images, not one CT volume"),
        ("run", "covid-semiseg/unlabeled/Imgs", "1600 independent 2D PNG/JPEG images"),
        ("inspect", "covid-semiseg/train/Imgs", "50 independent 2D PNG/JPEG images"),
        (
            "run",
            "covid-semiseg/train/GT",
            "looks like a mask folder, not CT slices: all 50 images are binary (values 0 and 255)",
        ),
        ("inspect", "covid-semiseg/train/GT", "all 50 images are binary (values 0 and 255)"),
        ("explain", "covid-semiseg/train/GT", "all 50 images are binary (values 0 and 255)"),
    ],
)
def test_real_folders_are_refused_in_one_line(
    shared_data: Path, tmp_path: Path, capsys, command: str, folder: str, expected: str
) -> None:
    path = shared_data / folder
    output = [] if command == "inspect" else ["--output", str(tmp_path / "out")]
    assert main([command, str(path), *output]) == 2
    line = _one_line_error(capsys)
    assert str(path) in line and expected in line
    if "binary" not in expected:
        assert f"corona-ct explain {path}" in line


@pytest.mark.realdata
def test_explain_real_slices_from_two_folders(shared_data: Path, tmp_path: Path) -> None:
    imgs = shared_data / "covid-semiseg" / "train" / "Imgs"
    ucsd = shared_data / "covid-ct" / "CT_COVID" / "2020.02.10.20021584-p6-52%0.png"
    for folder, number in (("a", 1), ("b", 2)):
        (tmp_path / folder).mkdir()
        shutil.copy(imgs / f"{number}.jpg", tmp_path / folder / "1.jpg")
    shutil.copy(ucsd, tmp_path / "a" / "p6-52%0, copy.png")
    shutil.copy(shared_data / "covid-semiseg" / "train" / "GT" / "1.png", tmp_path / "b" / "mask.png")
    inputs = [str(tmp_path / "a"), str(tmp_path / "b")]
    assert main(["explain", *inputs, "--output", str(tmp_path / "x"), "--allow-untrained", *FAST]) == 1
    rows = _rows(tmp_path / "x" / "predictions.csv")
    assert [row["input"] for row in rows] == [
        str(tmp_path / "a" / "1.jpg"),
        str(tmp_path / "a" / "p6-52%0, copy.png"),
        str(tmp_path / "b" / "1.jpg"),
        str(tmp_path / "b" / "mask.png"),
    ]
    assert [row["status"] for row in rows] == ["ok", "ok", "ok", "failed"]
    assert "binary image (values 0 and 255 only)" in rows[3]["error"]
    assert len({row["cam"] for row in rows[:3]}) == 3
    for row in rows[:3]:
        with Image.open(row["input"]) as image:
            assert np.load(tmp_path / "x" / row["cam"]).shape == (image.height, image.width)
