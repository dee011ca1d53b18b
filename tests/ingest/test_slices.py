"""Slice-image folders (16-bit TIFF, 8-bit PNG/JPEG) and single slice images."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from corona_ct.data.phantom import make_phantom
from corona_ct.data.writers import write_dicom_series
from corona_ct.pipeline.config import IngestConfig
from corona_ct.pipeline.errors import (
    AmbiguousInputError,
    GeometryError,
    InputError,
    NoImageDataError,
    UnsupportedInputError,
)
from corona_ct.pipeline.ingest.slices import (
    read_image_folder,
    read_slice_image,
    read_tiff_folder,
    sort_by_slice_number,
)

CONFIG = IngestConfig()


def _write_tiffs(
    folder: Path, names_and_values: list[tuple[str, int]], shape: tuple[int, int] = (8, 10)
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, value in names_and_values:
        tifffile.imwrite(folder / name, np.full(shape, value, dtype=np.uint16))


def test_slices_are_ordered_by_the_last_number_never_lexically(tmp_path: Path) -> None:
    # Lexical order would be IM1, IM10, IM100, IM2, IM9.
    numbers = [10, 2, 100, 1, 9]
    _write_tiffs(tmp_path, [(f"P003_SR_4_IM{n}.tif", 1000 + n) for n in numbers])
    volume = read_tiff_folder(tmp_path, CONFIG, "case")
    assert volume.array[:, 0, 0].tolist() == [1000 + n - 1024 for n in sorted(numbers)]
    names = ["b_7_slice12.png", "a_99_slice3.png", "slice-0021.png"]
    assert [p.name for p in sort_by_slice_number([Path(n) for n in names])] == [
        "a_99_slice3.png",
        "b_7_slice12.png",
        "slice-0021.png",
    ]


def test_tiff_folder_gives_hu_with_nominal_geometry(tmp_path: Path) -> None:
    raw = np.arange(3 * 8 * 10, dtype=np.uint16).reshape(3, 8, 10) * 7
    for index, image in enumerate(raw):
        tifffile.imwrite(tmp_path / f"IM{index + 1:05d}.TIFF", image)  # upper-case suffix
    (tmp_path / ".IM00004.tif").write_bytes(b"hidden")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub").mkdir()
    volume = read_tiff_folder(tmp_path, CONFIG, "case")
    assert np.array_equal(volume.array, raw.astype(np.float32) - 1024)
    assert volume.units == "HU" and not volume.spacing_known
    assert volume.geometry.spacing_mm == (1.0, 1.0, 1.0)
    assert any("nominal" in warning for warning in volume.warnings)
    shifted = read_tiff_folder(tmp_path, IngestConfig(tiff_hu_offset=-1000.0), "case")
    assert np.array_equal(shifted.array, raw.astype(np.float32) - 1000)


def test_tiff_that_already_holds_hu_is_warned_about(tmp_path: Path) -> None:
    tmp_path.mkdir(exist_ok=True)
    for index in range(2):
        tifffile.imwrite(tmp_path / f"s{index}.tif", np.full((8, 8), -1000 + 900 * index, dtype=np.int16))
    volume = read_tiff_folder(tmp_path, CONFIG, "case")
    assert any("tiff_hu_offset" in warning for warning in volume.warnings)


def test_eight_bit_tiff_is_refused_with_a_pointer_to_the_image_path(tmp_path: Path) -> None:
    for index in range(3):
        tifffile.imwrite(tmp_path / f"IM{index}.tif", np.zeros((8, 8), np.uint8))
    with pytest.raises(UnsupportedInputError, match=r"8-bit.*PNG"):
        read_tiff_folder(tmp_path, CONFIG, "case")


def test_mismatched_slice_size_names_the_odd_file(tmp_path: Path) -> None:
    _write_tiffs(tmp_path, [(f"IM{n}.tif", 1000) for n in (1, 2, 4)])
    _write_tiffs(tmp_path, [("IM3.tif", 1000)], shape=(9, 10))
    with pytest.raises(GeometryError, match=r"IM3\.tif"):
        read_tiff_folder(tmp_path, CONFIG, "case")


def test_empty_single_duplicate_and_unnumbered_folders(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("no images")
    with pytest.raises(NoImageDataError):
        read_tiff_folder(tmp_path / "empty", CONFIG, "case")
    with pytest.raises(NoImageDataError):
        read_image_folder(tmp_path / "empty", CONFIG, "case")
    _write_tiffs(tmp_path / "single", [("IM1.tif", 1)])
    with pytest.raises(UnsupportedInputError, match="single slice"):
        read_tiff_folder(tmp_path / "single", CONFIG, "case")
    _write_tiffs(tmp_path / "mixed", [("SR_1_IM1.tif", 1), ("SR_2_IM1.tif", 2)])
    with pytest.raises(AmbiguousInputError, match="share slice number 1"):
        read_tiff_folder(tmp_path / "mixed", CONFIG, "case")
    _write_tiffs(tmp_path / "unnumbered", [("first.tif", 1), ("second.tif", 2)])
    with pytest.raises(InputError, match="no slice number"):
        read_tiff_folder(tmp_path / "unnumbered", CONFIG, "case")


def test_corrupt_tiff_is_named(tmp_path: Path) -> None:
    _write_tiffs(tmp_path, [("IM1.tif", 1), ("IM2.tif", 2)])
    (tmp_path / "IM3.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(InputError, match=r"IM3\.tif"):
        read_tiff_folder(tmp_path, CONFIG, "case")


def test_image_folder_converts_every_mode_to_grey_luminance(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (12, 9, 3), dtype=np.uint8)
    # Independent reference: BT.601 luma on the 8-bit channels.
    luma = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255.0
    alpha = rng.integers(0, 256, (12, 9, 1), dtype=np.uint8)
    grey = rng.integers(0, 256, (12, 9), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "s_1.png")
    Image.fromarray(np.concatenate([rgb, alpha], axis=2)).save(tmp_path / "s_2.PNG")
    Image.fromarray(grey).save(tmp_path / "s_3.png")
    Image.fromarray(rgb).quantize(colors=256).save(tmp_path / "s_4.png")
    Image.fromarray(grey).save(tmp_path / "s_10.jpg", quality=100)
    Image.fromarray(grey).save(tmp_path / ".s_5.png")
    volume = read_image_folder(tmp_path, CONFIG, "case")

    assert volume.units == "window" and not volume.spacing_known and volume.array.shape == (5, 12, 9)
    assert np.allclose(volume.array[0], luma, atol=1e-6)
    assert np.allclose(volume.array[1], luma, atol=1e-6)  # alpha ignored
    assert np.array_equal(volume.array[2], grey / np.float32(255))
    palette = np.asarray(Image.open(tmp_path / "s_4.png").convert("RGB"), dtype=np.float64)
    assert np.allclose(volume.array[3], palette @ [0.299, 0.587, 0.114] / 255.0, atol=1e-6)
    assert np.abs(volume.array[4] - grey / 255.0).max() < 0.05  # JPEG, lossy
    with pytest.raises(UnsupportedInputError):
        _ = volume.hu


def test_sixteen_bit_png_is_refused(tmp_path: Path) -> None:
    for index in range(2):
        Image.fromarray(np.zeros((8, 8), np.uint16)).save(tmp_path / f"s{index}.png")
    with pytest.raises(UnsupportedInputError, match="8-bit"):
        read_image_folder(tmp_path, CONFIG, "case")


def test_read_slice_image_by_format(tmp_path: Path) -> None:
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(grey).save(tmp_path / "slice.png")
    array, units = read_slice_image(tmp_path / "slice.png", CONFIG)
    assert units == "window" and array.dtype == np.float32 and np.allclose(array, grey / 255.0)

    raw = np.arange(80, dtype=np.uint16).reshape(8, 10) * 30
    tifffile.imwrite(tmp_path / "slice.tif", raw)
    array, units = read_slice_image(tmp_path / "slice.tif", CONFIG)
    assert units == "HU" and np.array_equal(array, raw.astype(np.float32) - 1024)

    phantom = make_phantom(0, shape=(4, 32, 32))
    paths = write_dicom_series(phantom, tmp_path / "dicom", rescale_intercept=-1000.0)
    array, units = read_slice_image(paths[2], CONFIG)
    assert units == "HU" and np.array_equal(array, phantom.hu[2])

    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(InputError, match=r"bad\.jpg"):
        read_slice_image(tmp_path / "bad.jpg", CONFIG)
    (tmp_path / "notes.bin").write_bytes(b"\x00" * 300)
    with pytest.raises(InputError, match=r"notes\.bin"):
        read_slice_image(tmp_path / "notes.bin", CONFIG)
    with pytest.raises(InputError, match="not found"):
        read_slice_image(tmp_path / "absent.png", CONFIG)


# ----------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_covid_semiseg_volume_slices_in_trailing_number_order(shared_data: Path, tmp_path: Path) -> None:
    source = shared_data / "covid-semiseg" / "unlabeled" / "Imgs"
    # Slices 6-11 of this volume share one size (238 wide, 320 high); lexical order would put 10 and 11 first.
    numbers = [6, 7, 9, 10, 11]
    for number in numbers:
        shutil.copy(source / f"Data-1_coronacases_org_001_{number}.jpg", tmp_path)
    volume = read_image_folder(tmp_path, CONFIG, "semiseg")
    assert volume.units == "window" and volume.array.shape == (len(numbers), 320, 238)
    for index, number in enumerate(numbers):
        with Image.open(source / f"Data-1_coronacases_org_001_{number}.jpg") as image:
            expected = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
        assert np.allclose(volume.array[index], expected, atol=1.0 / 255.0)


@pytest.mark.realdata
def test_covid_semiseg_slices_of_other_sizes_are_named(shared_data: Path, tmp_path: Path) -> None:
    # The COVID-SemiSeg slices are cropped one by one: slice 2 is 236 wide, slices 6-11 are 238 wide.
    source = shared_data / "covid-semiseg" / "unlabeled" / "Imgs"
    for number in (2, 6, 7):
        shutil.copy(source / f"Data-1_coronacases_org_001_{number}.jpg", tmp_path)
    with pytest.raises(GeometryError, match=r"Data-1_coronacases_org_001_2\.jpg"):
        read_image_folder(tmp_path, CONFIG, "semiseg")


@pytest.mark.realdata
@pytest.mark.parametrize(
    "name",
    [
        "CT_COVID/2020.02.10.20021584-p6-52%0.png",  # RGB
        "CT_COVID/2019-novel-Coronavirus-severe-adult-respiratory-dist_2020_International-Jour-p3-89%0.png",  # RGBA
        "CT_COVID/2020.03.13.20035212-p23-153.png",  # L
        "CT_NonCOVID/16.jpg",  # L JPEG
        "CT_NonCOVID/0.jpg",  # RGB JPEG
    ],
)
def test_covid_ct_images_read_as_2d_windowed_slices(shared_data: Path, name: str) -> None:
    path = shared_data / "covid-ct" / name
    if not path.is_file():
        pytest.skip(f"{path} is absent from this copy of the data")
    array, units = read_slice_image(path, CONFIG)
    with Image.open(path) as image:
        assert array.shape == (image.height, image.width)
    assert units == "window" and array.dtype == np.float32
    assert array.min() >= 0.0 and array.max() <= 1.0 and array.std() > 0.01


@pytest.mark.realdata
def test_lidc_dicom_slice_reads_as_hu(shared_data: Path) -> None:
    path = sorted((shared_data / "dicom" / "LIDC-IDRI-0001").glob("*.dcm"))[0]
    array, units = read_slice_image(path, CONFIG)
    assert units == "HU" and array.shape == (512, 512)
    # Air in front of the chest, inside the reconstruction circle (the corners hold -2048 padding).
    assert abs(float(np.median(array[30:50, 236:276])) + 1000.0) < 50.0
    assert array.max() > 300.0  # bone
