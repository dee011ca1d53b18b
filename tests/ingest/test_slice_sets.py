"""Slice-image folders: the slices of one CT, a set of independent 2D images, or masks; explain's inputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from corona_ct.data.phantom import make_phantom
from corona_ct.data.writers import write_dicom_series, write_png_slices, write_tiff_slices
from corona_ct.pipeline.config import IngestConfig
from corona_ct.pipeline.errors import GeometryError, NoImageDataError, UnsupportedInputError
from corona_ct.pipeline.ingest import (
    SliceImage,
    collect_slice_images,
    discover,
    load_input,
    refuse_slice_sets,
)
from corona_ct.pipeline.ingest.slice_checks import check_slice_folder, slice_image_problem
from corona_ct.pipeline.ingest.slices import IMAGE_SUFFIXES, SLICE_FILE_SUFFIXES, read_slice_image
from corona_ct.pipeline.single_slice import output_stems

CONFIG = IngestConfig()


def _ct_like(rows: int, columns: int, seed: int = 0) -> np.ndarray:
    """An 8-bit image with many grey values (a stand-in for a windowed CT slice)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (rows, columns), dtype=np.uint8)


def _write_pngs(folder: Path, names_and_shapes: list[tuple[str, tuple[int, int]]]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (name, shape) in enumerate(names_and_shapes):
        Image.fromarray(_ct_like(*shape, seed=index)).save(folder / name)
        paths.append(folder / name)
    return paths


def _write_masks(folder: Path, shapes: list[tuple[int, int]], high: int = 255) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index, (rows, columns) in enumerate(shapes):
        mask = np.zeros((rows, columns), np.uint8)
        mask[rows // 4 : rows // 2, columns // 3 : columns // 2] = high
        Image.fromarray(mask).save(folder / f"{index}.png")


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(seed=3, shape=(6, 64, 72), spacing_mm=(5.0, 3.5, 3.5), lesions="mixed")


# ----------------------------------------------------------------------------- recognition


def test_one_ct_as_16bit_tiffs_is_still_a_volume(tmp_path: Path, phantom) -> None:
    folder = tmp_path / "patient1"
    write_tiff_slices(phantom, folder)  # COVID-CTset names: P001_patient1_SR_1_IM00001.tif ...
    check = check_slice_folder(folder, "tiff", CONFIG)
    assert check.verdict == "volume" and check.problem is None
    assert "6 TIFF slices of 72×64" in check.evidence and "IM00001.tif … " in check.evidence
    (study,) = discover([folder])
    assert study.kind == "tiff" and study.problem is None
    volume = load_input(study, CONFIG)
    assert volume.units == "HU" and np.array_equal(volume.array, phantom.hu.astype(np.float32))


def test_one_ct_as_png_slices_is_still_a_volume(tmp_path: Path, phantom) -> None:
    write_png_slices(phantom, tmp_path / "png")
    (study,) = discover([tmp_path / "png"])
    assert study.problem is None and load_input(study, CONFIG).array.shape == phantom.hu.shape


def test_one_stray_file_in_a_ct_keeps_the_readers_advice(tmp_path: Path) -> None:
    # 11 slices of one size and one odd one: a CT with a stray file, named by the reader, not a slice set.
    _write_pngs(tmp_path, [(f"IM{n}.png", (40, 48)) for n in range(1, 12)] + [("IM12.png", (40, 50))])
    assert check_slice_folder(tmp_path, "images", CONFIG).verdict == "volume"
    (study,) = discover([tmp_path])
    with pytest.raises(GeometryError, match=r"IM12\.png"):
        load_input(study, CONFIG)


def test_images_of_many_sizes_are_a_slice_set(tmp_path: Path) -> None:
    _write_pngs(
        tmp_path, [("1.png", (40, 48)), ("2.png", (50, 48)), ("3.png", (40, 60)), ("4.png", (40, 48))]
    )
    check = check_slice_folder(tmp_path, "images", CONFIG)
    assert check.verdict == "slice-set"
    assert "3 different sizes, the most common 48×40 shared by 2" in check.evidence
    assert check.problem is not None and f"corona-ct explain {tmp_path}" in check.problem
    assert "4 independent 2D PNG/JPEG images" in check.problem and "\n" not in check.problem


@pytest.mark.parametrize(
    ("names", "evidence"),
    [
        (["fig-a-1.png", "fig-b-1.png", "fig-c-2.png"], "3 different name stems before the slice number"),
        (["first.png", "second.png", "third.png"], "3 with no slice number in the name, e.g. 'first.png'"),
    ],
)
def test_names_that_are_no_sequence_make_a_slice_set(tmp_path: Path, names: list[str], evidence: str) -> None:
    _write_pngs(tmp_path, [(name, (40, 48)) for name in names])  # one size: only the names tell
    check = check_slice_folder(tmp_path, "images", CONFIG)
    assert check.verdict == "slice-set" and evidence in check.evidence


def test_sixteen_bit_tiffs_of_many_sizes_are_a_slice_set(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for index, shape in enumerate([(40, 40), (48, 40), (40, 56)]):
        tifffile.imwrite(tmp_path / f"IM{index + 1}.tif", rng.integers(0, 2000, shape, dtype=np.uint16))
    check = check_slice_folder(tmp_path, "tiff", CONFIG)
    assert check.verdict == "slice-set" and "3 independent 2D TIFF images" in str(check.problem)


def test_a_single_image_is_no_volume(tmp_path: Path) -> None:
    _write_pngs(tmp_path, [("IM1.png", (40, 48))])
    check = check_slice_folder(tmp_path, "images", CONFIG)
    assert check.verdict == "slice-set" and "1 independent 2D PNG/JPEG image," in str(check.problem)


@pytest.mark.parametrize(("high", "values"), [(255, "values 0 and 255"), (1, "values 0 and 1")])
def test_binary_images_are_a_mask_folder(tmp_path: Path, high: int, values: str) -> None:
    _write_masks(tmp_path / "GT", [(40, 48), (52, 44), (40, 48)], high=high)
    check = check_slice_folder(tmp_path / "GT", "images", CONFIG)
    assert check.verdict == "masks" and check.evidence == f"all 3 images are binary ({values})"
    assert f"{tmp_path / 'GT'}: looks like a mask folder" in str(check.problem)


def test_sixteen_bit_tiff_masks_are_a_mask_folder(tmp_path: Path) -> None:
    for index in range(3):
        mask = np.zeros((40, 40), np.uint16)
        mask[5:20, 5:20] = 1
        tifffile.imwrite(tmp_path / f"IM{index}.tif", mask)
    assert check_slice_folder(tmp_path, "tiff", CONFIG).evidence == "all 3 images are binary (values 0 and 1)"


def test_one_ct_slice_among_masks_makes_no_mask_folder(tmp_path: Path) -> None:
    _write_masks(tmp_path, [(40, 48)] * 3)
    _write_pngs(tmp_path, [("9.png", (40, 48))])
    assert check_slice_folder(tmp_path, "images", CONFIG).verdict != "masks"


def test_an_unreadable_file_does_not_break_discovery(tmp_path: Path) -> None:
    _write_pngs(tmp_path, [("1.png", (40, 48)), ("2.png", (50, 48)), ("3.png", (40, 60))])
    (tmp_path / "4.png").write_bytes(b"not a png")
    (study,) = discover([tmp_path])
    assert study.problem is not None and "4 independent" in study.problem


# ----------------------------------------------------------------------------- discover, run's refusal


def test_discover_keeps_the_slice_set_and_load_input_refuses_it(tmp_path: Path) -> None:
    _write_pngs(tmp_path / "figures", [("a-1.png", (40, 48)), ("b-7.png", (50, 48)), ("c-3.png", (40, 60))])
    (study,) = discover([tmp_path / "figures"])
    assert study.kind == "images" and study.problem is not None
    with pytest.raises(UnsupportedInputError, match="corona-ct explain"):
        load_input(study, CONFIG)


def test_refuse_slice_sets_only_when_nothing_else_is_there(tmp_path: Path, phantom) -> None:
    _write_pngs(
        tmp_path / "tree" / "figures", [("a-1.png", (40, 48)), ("b-7.png", (50, 48)), ("c-3.png", (40, 60))]
    )
    with pytest.raises(UnsupportedInputError, match=r"figures: 3 independent 2D PNG/JPEG images"):
        refuse_slice_sets([tmp_path / "tree"])
    _write_masks(tmp_path / "GT", [(40, 48)] * 2)
    with pytest.raises(UnsupportedInputError, match=r"GT: looks like a mask folder.*\(and 1 more input"):
        refuse_slice_sets([tmp_path / "GT", tmp_path / "tree"])
    with pytest.raises(UnsupportedInputError, match=r"x\.png: a single slice image .*corona-ct explain"):
        _write_pngs(tmp_path, [("x.png", (40, 48))])
        refuse_slice_sets([tmp_path / "x.png"])
    # A CT study beside the slice set: run goes on and fails just the slice-set folder.
    write_dicom_series(phantom, tmp_path / "tree" / "chest")
    refuse_slice_sets([tmp_path / "tree"])
    write_tiff_slices(phantom, tmp_path / "tiffs")
    refuse_slice_sets([tmp_path / "tiffs"])


# ----------------------------------------------------------------------------- explain's inputs


def test_collect_expands_folders_recursively_in_natural_order_with_inputs_as_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _write_pngs(tmp_path / "set", [("10.png", (40, 48)), ("2.png", (40, 48))])
    _write_pngs(tmp_path / "set" / "sub", [("1.jpg", (40, 48))])
    (tmp_path / "set" / "notes.txt").write_text("ignored")
    (tmp_path / "set" / ".hidden.png").write_bytes(b"ignored")
    loose = tmp_path / "IM0001"  # a file given itself is taken whatever its suffix (DICOM often has none)
    loose.write_bytes(b"read later")
    images = collect_slice_images(["./set/", str(loose)])
    assert [image.input for image in images] == [
        "./set/2.png",
        "./set/10.png",
        f"./set/{Path('sub', '1.jpg')}",
        str(loose),
    ]
    assert [image.relative for image in images] == [
        str(Path("set", "2.png")),
        str(Path("set", "10.png")),
        str(Path("set", "sub", "1.jpg")),
        "IM0001",
    ]
    assert all(image.path.is_file() for image in images)


def test_collect_refuses_mask_folders_and_folders_without_images(tmp_path: Path) -> None:
    _write_pngs(tmp_path / "train" / "Imgs", [("0.png", (40, 48)), ("1.png", (44, 48))])
    _write_masks(tmp_path / "train" / "GT", [(40, 48), (44, 48)])
    with pytest.raises(UnsupportedInputError, match=r"GT: looks like a mask folder.*all 2 images are binary"):
        collect_slice_images([tmp_path / "train"])
    assert len(collect_slice_images([tmp_path / "train" / "Imgs"])) == 2
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("no images")
    with pytest.raises(NoImageDataError, match=r"empty: no slice images"):
        collect_slice_images([tmp_path / "empty"])


def test_one_registry_of_slice_file_suffixes() -> None:
    from corona_ct.data import manifest

    assert manifest.IMAGE_SUFFIXES is SLICE_FILE_SUFFIXES
    assert {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm"} == SLICE_FILE_SUFFIXES


def test_bmp_slices_are_read_as_windowed_images(tmp_path: Path) -> None:
    grey = _ct_like(40, 48)
    Image.fromarray(grey).save(tmp_path / "slice.bmp")
    assert ".bmp" in IMAGE_SUFFIXES
    array, units = read_slice_image(tmp_path / "slice.bmp", CONFIG)
    assert units == "window" and np.allclose(array, grey / 255.0)


def _image(input_: str, relative: str) -> SliceImage:
    return SliceImage(input_, Path(input_), relative)


def test_output_stems_are_unique_safe_and_independent_of_order() -> None:
    images = [
        _image("a/1.png", "1.png"),
        _image("b/1.png", "1.png"),
        _image("c/39%2, copy.png", "39%2, copy.png"),
        _image("d/39_2_copy.png", "39_2_copy.png"),  # the same stem once '%, ' are replaced
        _image("set/sub/x.jpg", str(Path("set", "sub", "x.jpg"))),
        _image("e/Case.png", "Case.png"),
        _image("f/case.png", "case.png"),  # differs only in case: clashes on macOS/Windows
        _image("g/IM0001", "IM0001"),
    ]
    stems = output_stems(images)
    assert len({stem.lower() for stem in stems}) == len(stems)
    assert all(stem.replace("_", "").replace("-", "").replace(".", "").isalnum() for stem in stems)
    assert stems[0].startswith("1-") and stems[1].startswith("1-") and len(stems[0]) == len("1-") + 10
    assert stems[2].startswith("39_2_copy-") and stems[3].startswith("39_2_copy-")
    assert stems[4] == "set__sub__x" and stems[7] == "IM0001"
    assert output_stems(images[::-1]) == stems[::-1]
    twice = output_stems([_image("a/1.png", "1.png"), _image("a/1.png", "1.png")])
    assert twice[0] != twice[1]


@pytest.mark.parametrize(
    ("image", "units", "reason"),
    [
        (np.zeros((64, 64), np.float32), "window", "blank image (value 0 everywhere)"),
        (np.full((64, 64), -1000.0, np.float32), "HU", "blank image (value -1000 everywhere)"),
        (
            np.repeat([[0.0, 1.0]], 32, axis=0).repeat(32, axis=1).astype(np.float32),
            "window",
            "values 0 and 255",
        ),
        (
            np.random.default_rng(0).random((20, 300)).astype(np.float32),
            "window",
            "300×20 pixels is too small",
        ),
    ],
)
def test_slice_image_problem_names_blank_binary_and_tiny_images(
    image: np.ndarray, units: str, reason: str
) -> None:
    problem = slice_image_problem(image, units)
    assert problem is not None and reason in problem


def test_a_ct_like_slice_has_no_problem() -> None:
    assert slice_image_problem(_ct_like(64, 64) / np.float32(255), "window") is None


# ----------------------------------------------------------------------------- real data


@pytest.mark.realdata
@pytest.mark.parametrize(
    ("folder", "evidence"),
    [
        ("covid-ct/CT_COVID", "different sizes"),
        ("covid-ct/CT_NonCOVID", "different sizes"),
        ("covid-semiseg/train/Imgs", "49 different sizes"),
        ("covid-semiseg/unlabeled/Imgs", "20 different name stems"),
    ],
)
def test_real_slice_sets_are_recognised(shared_data: Path, folder: str, evidence: str) -> None:
    path = shared_data / folder
    (study,) = discover([path])
    assert (
        study.problem is not None
        and evidence in study.problem
        and f"corona-ct explain {path}" in study.problem
    )
    with pytest.raises(UnsupportedInputError, match="corona-ct explain"):
        refuse_slice_sets([path])


@pytest.mark.realdata
def test_real_mask_folder_is_recognised(shared_data: Path) -> None:
    gt = shared_data / "covid-semiseg" / "train" / "GT"
    (study,) = discover([gt])
    assert study.problem is not None
    assert (
        "looks like a mask folder" in study.problem
        and "all 50 images are binary (values 0 and 255)" in study.problem
    )
    with pytest.raises(UnsupportedInputError, match="mask folder"):
        collect_slice_images([gt.parent])  # train/ holds Imgs and GT


@pytest.mark.realdata
def test_slices_of_one_real_volume_still_stack(shared_data: Path, tmp_path: Path) -> None:
    # Slices 6-11 of one COVID-SemiSeg volume share one size: one CT, read as a volume.
    source = shared_data / "covid-semiseg" / "unlabeled" / "Imgs"
    for number in (6, 7, 9, 10, 11):
        shutil.copy(source / f"Data-1_coronacases_org_001_{number}.jpg", tmp_path)
    (study,) = discover([tmp_path])
    assert study.problem is None and load_input(study, CONFIG).array.shape == (5, 320, 238)


@pytest.mark.realdata
def test_collect_real_folder_keeps_names_with_percent(shared_data: Path) -> None:
    folder = shared_data / "covid-ct" / "CT_COVID"
    images = collect_slice_images([str(folder)])
    assert len(images) == len([p for p in folder.iterdir() if p.suffix.lower() in SLICE_FILE_SUFFIXES])
    with_percent = [image for image in images if "%" in image.input]
    assert with_percent and all(Path(image.input).is_file() for image in with_percent)
