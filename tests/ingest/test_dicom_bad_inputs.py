"""Every bad DICOM input gives a project error (or a loaded volume with a warning) that names the problem."""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID

from corona_ct.pipeline.config import IngestConfig
from corona_ct.pipeline.errors import (
    AmbiguousInputError,
    DecoderMissingError,
    GeometryError,
    InputError,
    NoImageDataError,
    UnsupportedInputError,
)
from corona_ct.pipeline.ingest import choose_series, discover, load_input, load_study
from corona_ct.pipeline.ingest.dicom import codecs, read
from corona_ct.pipeline.ingest.dicom.header import SliceHeader
from corona_ct.pipeline.ingest.slices import read_slice_image
from tests.ingest.dicom_factory import CORONAL, ct_slice, phantom_hu, write_series

SPACING = (2.5, 0.7, 0.7)
ORIGIN = (-11.2, -11.2, -100.0)


def _series(folder: Path, n: int = 6, hu: np.ndarray | None = None, **kwargs: Any) -> list[Path]:
    values = phantom_hu((n, 16, 16)) if hu is None else hu
    return write_series(folder, values, spacing=SPACING, origin=ORIGIN, **kwargs)


# --------------------------------------------------------------------------- nothing to read


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoImageDataError, match=r"empty.*empty"):
        load_study(tmp_path / "empty")


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(NoImageDataError, match="no such file or folder"):
        discover([tmp_path / "nope"])


def test_folder_without_dicom_names_the_files(tmp_path: Path) -> None:
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    (folder / "blob.bin").write_bytes(np.random.default_rng(0).bytes(4000))
    with pytest.raises(NoImageDataError, match=r"no CT data found.*not a DICOM file: blob\.bin"):
        load_study(folder)


# --------------------------------------------------------------------------- not a CT volume


@pytest.mark.parametrize("modality, words", [("MR", "magnetic resonance"), ("CR", "computed radiography")])
def test_non_ct_modality(tmp_path: Path, modality: str, words: str) -> None:
    _series(tmp_path / "s", modality=modality)
    with pytest.raises(UnsupportedInputError, match=f"modality {modality} \\({words}.*CT only"):
        load_study(tmp_path / "s")


def test_single_slice(tmp_path: Path) -> None:
    files = _series(tmp_path / "s", n=1)
    for target in (tmp_path / "s", files[0]):
        with pytest.raises(
            UnsupportedInputError, match=r"1 slice\(s\) at distinct positions.*at least 2.*whole series"
        ):
            load_study(target)


def test_enhanced_multiframe_is_refused_clearly(tmp_path: Path) -> None:
    def enhanced(_: int, ds: Dataset) -> None:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.2.1")
        ds.NumberOfFrames = 2
        ds.PixelData = ds.PixelData * 2

    _series(tmp_path / "s", n=1, mutate=enhanced)
    with pytest.raises(UnsupportedInputError, match=r"slice0+\.dcm is an Enhanced/multi-frame CT.*dcm2niix"):
        load_study(tmp_path / "s")


def test_absurd_declared_size_refused_before_pixels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def huge(_: int, ds: Dataset) -> None:
        ds.Rows = ds.Columns = 60000

    _series(tmp_path / "s", mutate=huge)

    def no_pixels(*_: object) -> None:
        raise AssertionError("pixel data must not be read")

    monkeypatch.setattr(read, "decode_stored_values", no_pixels)
    with pytest.raises(UnsupportedInputError, match=r"60000×60000 pixels.*max_pixels_per_slice"):
        load_study(tmp_path / "s")
    _series(tmp_path / "t")
    with pytest.raises(UnsupportedInputError, match=r"6 slices, over ingest\.max_slices=3"):
        load_study(tmp_path / "t", IngestConfig(max_slices=3))


# --------------------------------------------------------------------------- damaged files


def test_truncated_pixel_data_is_skipped_and_named(tmp_path: Path) -> None:
    files = _series(tmp_path / "s", n=7)
    data = files[3].read_bytes()
    files[3].write_bytes(data[: len(data) - 200])
    volume = load_study(tmp_path / "s")
    assert volume.n_slices == 6
    assert any("truncated" in w and "slice003.dcm" in w for w in volume.warnings)
    assert any("uneven slice spacing" in w for w in volume.warnings)  # the hole it leaves is reported


def test_unreadable_header_is_noted(tmp_path: Path) -> None:
    files = _series(tmp_path / "s", n=6)
    shutil.copy(files[0], tmp_path / "s" / "zz_broken.dcm")
    (tmp_path / "s" / "zz_broken.dcm").write_bytes(files[0].read_bytes()[:140])
    (study,) = discover([tmp_path / "s"])
    assert any("zz_broken.dcm" in note for note in study.notes)
    assert load_input(study).n_slices == 6


def test_decode_failure_mid_series_skips_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _series(tmp_path / "s", n=7)

    def flaky(header: SliceHeader, root: Path | None = None) -> np.ndarray:
        if header.path.name == "slice006.dcm":
            raise InputError("slice006.dcm: pixel data cannot be decoded")
        return codecs.decode_stored_values(header, root)

    (study,) = discover([tmp_path / "s"])
    volume = read.read_series(study.series[0], IngestConfig(), "s", "s", decode=flaky)
    assert volume.n_slices == 6 and any("skipped: slice006.dcm" in w for w in volume.warnings)


# --------------------------------------------------------------------------- spacing and order


def test_missing_slice_warns_with_positions(tmp_path: Path) -> None:
    _series(tmp_path / "s", n=6, z_offsets=[0, 2.5, 5.0, 10.0, 12.5, 15.0])
    volume = load_study(tmp_path / "s")
    (warning,) = [w for w in volume.warnings if "uneven" in w]
    assert "5.00 mm between z=-95.00 and -90.00" in warning and "missing" in warning


def test_large_gap_is_an_error_past_max_gap_factor(tmp_path: Path) -> None:
    _series(tmp_path / "s", n=6, z_offsets=[0, 2.5, 5.0, 15.0, 17.5, 20.0])
    with pytest.raises(GeometryError, match=r"gap of 10\.00 mm.*z=-95\.00.*max_gap_factor"):
        load_study(tmp_path / "s")
    assert load_study(tmp_path / "s", IngestConfig(max_gap_factor=5.0)).n_slices == 6


def test_mixed_orientation_is_refused_naming_the_stray(tmp_path: Path) -> None:
    _series(tmp_path / "s", n=6)
    stray = ct_slice(np.full((16, 16), 1000), position=(0.0, 0.0, -90.0), orientation=CORONAL)
    stray.save_as(tmp_path / "s" / "stray.dcm", enforce_file_format=True)
    with pytest.raises(GeometryError, match=r"mixes slice orientations: 6 axial.*1 coronal \(stray\.dcm\)"):
        load_study(tmp_path / "s")


def test_gantry_tilt_is_warned_and_sheared_out(tmp_path: Path) -> None:
    n, tilt = 6, np.radians(20.0)
    shift_mm = SPACING[0] * np.tan(tilt)  # each slice 0.91 mm further posterior
    # A world-fixed cylinder: in slice k it sits shift_mm * k anterior of slice k's own grid.
    hu = np.full((n, 24, 24), -1000, dtype=np.int64)
    rows = np.arange(24) * SPACING[1]
    for k in range(n):
        world_rows = ORIGIN[1] + k * shift_mm + rows
        hu[k, (world_rows > -4) & (world_rows < 2), 10:14] = 500
    _series(
        tmp_path / "s",
        n=n,
        hu=hu,
        shear=(0.0, shift_mm, 0.0),
        mutate=lambda _, ds: setattr(ds, "GantryDetectorTilt", 20),
    )
    volume = load_study(tmp_path / "s")
    assert any(
        "gantry tilt of 20.0°, GantryDetectorTilt 20°: slices resampled by shear" in w
        for w in volume.warnings
    )
    profile = volume.hu[:, :, 12]
    centres = [(np.arange(24) * (p > 0)).sum() / max((p > 0).sum(), 1) for p in profile]
    assert np.ptp(centres) < 0.6  # the cylinder is straight after the shear (before: 6 × 1.3 px)
    assert volume.geometry.axes_lps[0] == pytest.approx((0, 0, 1))
    assert volume.geometry.spacing_mm[0] == pytest.approx(2.5)


def test_duplicate_copies_and_same_position_slices(tmp_path: Path) -> None:
    files = _series(tmp_path / "s", n=6)
    shutil.copy(files[2], tmp_path / "s" / "copy_of_2.dcm")  # same SOPInstanceUID
    twin = pydicom.dcmread(files[4])
    twin.SOPInstanceUID = twin.file_meta.MediaStorageSOPInstanceUID = UID("1.2.3.999")
    twin.save_as(tmp_path / "s" / "twin_of_4.dcm")  # other instance, identical pixels
    (study,) = discover([tmp_path / "s"])
    (note,) = [n for n in study.notes if "duplicate file(s) of the same instance" in n]
    assert "copy_of_2.dcm" in note or "slice002.dcm" in note
    volume = load_input(study)
    assert volume.n_slices == 6
    assert any("identical duplicate" in w and "twin_of_4.dcm" in w for w in volume.warnings)
    twin.PixelData = np.full((16, 16), 7, "<i2").tobytes()
    twin.save_as(tmp_path / "s" / "twin_of_4.dcm")
    with pytest.raises(GeometryError, match=r"different images at the same position.*twin_of_4\.dcm"):
        load_study(tmp_path / "s")


def test_odd_matrix_slice_is_dropped_with_its_name(tmp_path: Path) -> None:
    _series(tmp_path / "s", n=6)
    odd = ct_slice(np.zeros((8, 8)), position=(ORIGIN[0], ORIGIN[1], ORIGIN[2] + 5.0))
    odd.save_as(tmp_path / "s" / "odd.dcm", enforce_file_format=True)
    spacing = ct_slice(
        np.zeros((16, 16)), position=(ORIGIN[0], ORIGIN[1], ORIGIN[2] + 7.5), pixel_spacing=(0.9, 0.9)
    )
    spacing.save_as(tmp_path / "s" / "odd_spacing.dcm", enforce_file_format=True)
    volume = load_study(tmp_path / "s")
    assert volume.n_slices == 6
    (warning,) = [w for w in volume.warnings if "matrix or pixel spacing differs" in w]
    assert "odd.dcm" in warning and "odd_spacing.dcm" in warning


# --------------------------------------------------------------------------- pixel values


def _drop_rescale(_: int, ds: Dataset) -> None:
    del ds.RescaleSlope, ds.RescaleIntercept


def test_missing_rescale_warns_and_states_assumption(tmp_path: Path) -> None:
    hu = phantom_hu((6, 16, 16))
    _series(
        tmp_path / "s",
        hu=hu,
        intercept=0.0,
        mutate=_drop_rescale,
    )
    volume = load_study(tmp_path / "s")
    assert any(
        "RescaleSlope/RescaleIntercept missing in 6 of 6" in w and "slope 1 and intercept 0" in w
        for w in volume.warnings
    )
    np.testing.assert_array_equal(volume.hu, hu.astype(np.float32))


def test_pixel_padding_value_becomes_air(tmp_path: Path) -> None:
    hu = phantom_hu((6, 16, 16))
    hu[:, :3, :] = -3024  # stored -2000 with intercept -1024: the padding value

    def pad(_: int, ds: Dataset) -> None:
        ds.add_new(0x00280120, "US", 63536)  # -2000 written unsigned, as LIDC does

    volume = load_study(tmp_path / "s") if _series(tmp_path / "s", hu=hu, mutate=pad) else None
    assert volume is not None
    expected = np.where(hu == -3024, -1000, hu).astype(np.float32)
    np.testing.assert_array_equal(volume.hu, expected)
    assert any(
        f"{6 * 3 * 16} pixels marked by PixelPaddingValue set to -1000 HU" in w for w in volume.warnings
    )


def test_padding_range_on_unsigned_12_bit_with_garbage_high_bits(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    hu = phantom_hu((6, 16, 16))
    stored = hu + 1024  # unsigned, intercept -1024
    stored[:, :, :2] = rng.integers(4000, 4096, size=(6, 16, 2))  # padding range 4000..4095
    garbage = stored | (rng.integers(0, 16, size=stored.shape) << 12)

    def raw(k: int, ds: Dataset) -> None:
        ds.PixelData = garbage[k].astype("<u2").tobytes()
        ds.PixelPaddingValue, ds.PixelPaddingRangeLimit = 4000, 4095

    files = _series(tmp_path / "s", hu=hu, mutate=raw, bits_stored=12, signed=False)
    volume = load_study(tmp_path / "s")
    expected = np.where(stored >= 4000, -1000, stored - 1024).astype(np.float32)
    np.testing.assert_array_equal(volume.hu, expected)
    # explain's single-slice reader uses the same decoder: high bits masked, padding is air.
    image, units = read_slice_image(files[3], IngestConfig())
    assert units == "HU"
    np.testing.assert_array_equal(image, expected[3])


def test_signed_12_bit_with_garbage_high_bits(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    hu = phantom_hu((6, 16, 16))  # stored == HU, intercept 0
    twelve_bit = hu & 0x0FFF  # two's complement in 12 bits
    garbage = twelve_bit | (rng.integers(0, 16, size=hu.shape) << 12)
    _series(
        tmp_path / "s", hu=hu, intercept=0.0, bits_stored=12,
        mutate=lambda k, ds: setattr(ds, "PixelData", garbage[k].astype("<u2").tobytes()),
    )  # fmt: skip
    np.testing.assert_array_equal(load_study(tmp_path / "s").hu, hu.astype(np.float32))


# --------------------------------------------------------------------------- decoders


@pytest.mark.parametrize(
    "syntax, package",
    [
        ("1.2.840.10008.1.2.4.90", "pylibjpeg-openjpeg"),
        ("1.2.840.10008.1.2.4.50", "pylibjpeg-libjpeg"),
        ("1.2.840.10008.1.2.4.80", "pylibjpeg-libjpeg"),
        ("1.2.840.10008.1.2.5", "pylibjpeg-rle"),
    ],
)
def test_missing_decoder_names_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, syntax: str, package: str
) -> None:
    def compressed(_: int, ds: Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = UID(syntax)
        ds.PixelData = encapsulate([b"\xff\xd8 not really compressed \xff\xd9"])

    _series(tmp_path / "s", mutate=compressed)
    monkeypatch.setattr(codecs, "decoder_available", lambda uid: False)
    with pytest.raises(
        DecoderMissingError, match=f"pip install pylibjpeg {package} \\(or pip install python-gdcm\\)"
    ):
        load_study(tmp_path / "s")
    (study,) = discover([tmp_path / "s"])
    assert study.series[0].problem_type is DecoderMissingError  # inspect can show it


@pytest.mark.parametrize("syntax", ["1.2.3.4.5.6.7.8.9.10", "1.2.840.10008.1.3.10", "not a uid"])
def test_invalid_transfer_syntax_is_an_input_error_naming_the_files(tmp_path: Path, syntax: str) -> None:
    """A TransferSyntaxUID that is no transfer syntax used to escape the scanner as a bare ValueError."""
    files = _series(tmp_path / "s")
    written = b"1.2.840.10008.1.2.1\0"  # Explicit VR Little Endian, padded to 20 bytes
    for path in files[:2]:  # patched in place: pydicom refuses to write a standard non-syntax UID there
        data = path.read_bytes()
        assert data.count(written) == 1
        path.write_bytes(data.replace(written, syntax.encode().ljust(len(written), b"\0")))
    (study,) = discover([tmp_path / "s"])  # scanning does not raise
    (series,) = study.series
    assert not series.usable and series.problem_type is InputError
    pattern = (
        rf"series …[0-9.]+: slice000\.dcm, slice001\.dcm: TransferSyntaxUID '{re.escape(syntax)}' is not a "
        r"DICOM transfer syntax \(damaged or non-conformant file meta header\).*re-export the series"
    )
    with pytest.raises(InputError, match=pattern) as raised:
        load_study(tmp_path / "s")
    assert type(raised.value) is InputError
    with pytest.raises(
        InputError, match=r"slice000\.dcm: TransferSyntaxUID .* is not a DICOM transfer syntax"
    ):
        read_slice_image(files[0], IngestConfig())


def test_real_decoder_check_sees_installed_plugins() -> None:
    assert codecs.decoder_available("1.2.840.10008.1.2.4.90")  # pylibjpeg-openjpeg installed
    assert codecs.decoder_available("1.2.840.10008.1.2.1")
    assert not codecs.decoder_available("1.2.3.4.5")


# --------------------------------------------------------------------------- mixed folders


def test_localizer_sr_secondary_capture_and_mr_are_ignored_with_notes(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    hu = phantom_hu((6, 16, 16))
    _series(folder / "ct", hu=hu)
    _series(folder / "scout", n=1, series_uid="1.2.3.5", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    _series(folder / "mr", n=4, series_uid="1.2.3.6", modality="MR")
    capture = ct_slice(
        np.zeros((16, 16)), position=(0, 0, 0), sop_class="1.2.840.10008.5.1.4.1.1.7", modality="OT"
    )
    capture.save_as(folder / "screenshot.dcm", enforce_file_format=True)
    report = Dataset()
    report.file_meta = pydicom.dataset.FileMetaDataset()
    report.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    report.file_meta.MediaStorageSOPClassUID = report.SOPClassUID = UID("1.2.840.10008.5.1.4.1.1.88.22")
    report.file_meta.MediaStorageSOPInstanceUID = report.SOPInstanceUID = UID("1.2.3.7.1")
    report.Modality = "SR"
    report.save_as(folder / "report.dcm", enforce_file_format=True)
    (folder / "README.txt").write_text("export notes")

    (study,) = discover([folder])
    notes = " | ".join(study.notes)
    assert "structured report" in notes and "report.dcm" in notes
    assert "secondary capture" in notes and "screenshot.dcm" in notes
    assert "localizer/scout" in notes
    mr = next(s for s in study.series if s.modality == "MR")
    assert not mr.usable and "magnetic resonance" in mr.problem
    chosen, _ = choose_series(study)
    assert chosen.uid == "1.2.826.0.1.3680043.8.498.1.1"
    np.testing.assert_array_equal(load_input(study).hu, hu.astype(np.float32))


def test_two_patients_in_one_folder_are_never_merged(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    _series(
        folder,
        names=[f"a{k}.dcm" for k in range(6)],
        patient_id="P1",
        study_uid="1.2.3.1",
        series_uid="1.2.3.1.1",
    )
    _series(
        folder,
        names=[f"b{k}.dcm" for k in range(6)],
        patient_id="P2",
        study_uid="1.2.3.2",
        series_uid="1.2.3.2.1",
    )
    studies = discover([folder])
    assert len(studies) == 2 and studies[0].study_id != studies[1].study_id
    with pytest.raises(
        AmbiguousInputError, match=f"2 studies \\({studies[0].study_id}, {studies[1].study_id}\\)"
    ):
        load_study(folder)
    assert load_study(folder, series_uid="1.2.3.2.1").n_slices == 6


def test_no_series_uid_groups_by_folder(tmp_path: Path) -> None:
    def no_uids(_: int, ds: Dataset) -> None:
        ds.SeriesInstanceUID = ds.StudyInstanceUID = ""

    _series(tmp_path / "s", mutate=no_uids)
    (study,) = discover([tmp_path / "s"])
    assert study.series[0].uid.startswith("nouid-") and study.series[0].n_slices == 6
    assert any("no SeriesInstanceUID" in w for w in study.series[0].warnings)


def test_file_without_preamble_is_read(tmp_path: Path) -> None:
    files = _series(tmp_path / "s")
    for path in files:
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
        path.unlink()
        ds.save_as(path.with_suffix(""), enforce_file_format=False, implicit_vr=True, little_endian=True)
    assert load_study(tmp_path / "s").n_slices == 6


# --------------------------------------------------------------------------- hostile text


def test_hostile_strings_never_reach_outputs(tmp_path: Path) -> None:
    def hostile(_: int, ds: Dataset) -> None:
        ds.SpecificCharacterSet = "ISO_IR 999"  # unknown character set
        ds.Manufacturer = "../../etc/passwd\x07<b>Ünïcødé</b>"
        ds.ConvolutionKernel = ["B30f\x1b[31m", "../x"]
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AX/../IAL"]
        ds.PatientName = "O'Brien^Åsa\x00"

    folder = tmp_path / "O'Brien"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom rightly complains while writing the hostile values
        _series(folder, mutate=hostile, patient_name="O'Brien^Asa")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reading them is quiet: every string is cleaned, none raises
        volume = load_study(folder)
    for value in [*map(str, volume.meta.values()), volume.study_id]:
        assert value.isascii() and ".." not in value and "/" not in value
        assert all(ch.isprintable() for ch in value)
    assert "Brien" not in volume.study_id
    assert str(volume.meta["ConvolutionKernel"]).startswith("B30f")
