"""Manifests, grouping rules and preprocessed slice datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from corona_ct.data.datasets import SliceDataset, as_network_input, build_slice_dataset, slices_to_model_input
from corona_ct.data.folds import groups_overlap, stratified_group_kfold
from corona_ct.data.manifest import (
    GROUP_RULES,
    detect_rule,
    group_of,
    group_rule,
    manifest_from_class_folders,
    read_manifest_csv,
)
from corona_ct.pipeline.config import PipelineConfig
from corona_ct.pipeline.errors import ConfigError, InputError
from corona_ct.pipeline.preprocess import lung_bounding_box, to_model_input


@pytest.mark.parametrize(
    ("rule", "name", "group"),
    [
        ("covid-ctset", "covid_patient12_SR_3_IM00031.tif", "patient12"),
        ("covid-ctset", "normal_patient7_SR_4_IM00102.tif", "patient7"),
        ("ucsd", "2020.03.22.20040782-p25-1.png", "2020.03.22.20040782"),
        ("ucsd", "2020.03.22.20040782-p24-1533-8.png", "2020.03.22.20040782"),
        ("ucsd", "39%2.jpg", "39"),
        ("ucsd", "39%5.jpg", "39"),
        ("ucsd", "PIIS0140673620301549_0%1.png", "PIIS0140673620301549"),
        ("ucsd", "1123.png", "1123"),
        ("semiseg", "Data-1_coronacases_org_001_12.jpg", "Data-1_coronacases_org_001"),
        ("regex:^(case\\d+)", "case17_slice3.png", "case17"),
    ],
)
def test_grouping_rules(rule: str, name: str, group: str) -> None:
    assert group_of(name, group_rule(rule)) == group


def test_rule_detection_and_bad_rules() -> None:
    assert (
        detect_rule(["covid_patient1_SR_2_IM00001.tif", "normal_patient3_SR_1_IM00010.tif"]) == "covid-ctset"
    )
    assert detect_rule(["Data-1_coronacases_org_001_12.jpg", "Data-2_radiopaedia_7_3.jpg"]) == "semiseg"
    assert detect_rule(["39%2.jpg", "2020.03.22.20040782-p25-1.png"]) == "ucsd"
    with pytest.raises(ConfigError, match="unknown grouping rule"):
        group_rule("bogus")
    with pytest.raises(ConfigError, match="invalid"):
        group_rule("regex:(")
    assert set(GROUP_RULES) == {"covid-ctset", "ucsd", "semiseg"}


@pytest.mark.realdata
def test_ucsd_grouping_on_real_names_keeps_sources_on_one_side(shared_data: Path) -> None:
    root = shared_data / "covid-ct"
    manifest = manifest_from_class_folders(
        {"covid": root / "CT_COVID", "normal": root / "CT_NonCOVID"}, rule="auto"
    )
    assert manifest.grouping == "ucsd"
    assert manifest.class_names == ("normal", "covid")
    by_name = {entry.path.name: entry.group for entry in manifest.entries}
    assert by_name["39%2.jpg"] == by_name["39%5.jpg"] == "39"
    assert by_name["2020.03.22.20040782-p25-1541.png"] == by_name["2020.03.22.20040782-p24-1533-1.png"]
    groups, labels = manifest.groups, manifest.labels
    # Far fewer groups than images: figures with several panels collapse into one source.
    assert np.unique(groups).size < 0.6 * len(manifest)
    for train, test in stratified_group_kfold(labels, groups, 5, seed=0):
        assert not groups_overlap(groups, train, test)
        assert 0.3 < labels[test].mean() < 0.6  # 272 / 614 = 0.44 overall
    # No UCSD group mixes the classes (paper-figure names vs numbered non-COVID images).
    for group in np.unique(groups):
        assert np.unique(labels[groups == group]).size == 1


def _write_png(path: Path, value: int, size: int = 40) -> None:
    array = np.full((size, size), value, dtype=np.uint8)
    array[10:30, 12:28] = 255 - value
    Image.fromarray(array).save(path)


def test_csv_manifest_reading_hash_and_dataset(tmp_path: Path) -> None:
    for i in range(4):
        _write_png(tmp_path / f"img{i}.png", 20 * i)
    (tmp_path / "m.csv").write_text(
        "path,label,group,split\nimg0.png,normal,p1,train\nimg1.png,covid,p2,train\n"
        "img2.png,covid,p3,test\nimg3.png,normal,p4,val\n"
    )
    manifest = read_manifest_csv(tmp_path / "m.csv")
    assert manifest.class_names == ("normal", "covid")
    np.testing.assert_array_equal(manifest.labels, [0, 1, 1, 0])
    np.testing.assert_array_equal(manifest.split_indices("test"), [2])
    # The hash names the data, not the machine: the same files elsewhere give the same digest.
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in tmp_path.glob("*.png"):
        (copy / path.name).write_bytes(path.read_bytes())
    (copy / "m.csv").write_text((tmp_path / "m.csv").read_text())
    assert read_manifest_csv(copy / "m.csv").sha256() == manifest.sha256()

    dataset = build_slice_dataset(manifest, "none", 16, PipelineConfig())
    assert dataset.images.shape == (4, 16, 16) and dataset.images.dtype == torch.float16
    image, label = dataset[1]
    assert image.shape == (1, 16, 16) and int(label) == 1
    # Pre-windowed 8-bit slices keep their grey values ([0, 1]) through the shared preprocessing.
    assert float(dataset.images[0].float().min()) == pytest.approx(0.0, abs=1e-3)
    assert float(dataset.images[0].float().max()) == pytest.approx(1.0, abs=1e-3)

    (tmp_path / "bad.csv").write_text("path,label,group\nimg0.png,normal,p1\nmissing.png,covid,p9\n")
    with pytest.raises(InputError, match="does not exist"):
        read_manifest_csv(tmp_path / "bad.csv")


def test_slices_use_the_pipeline_preprocessing_exactly() -> None:
    rng = np.random.default_rng(0)
    windowed = rng.random((3, 50, 60)).astype(np.float32)
    lungs = np.zeros((3, 50, 60), dtype=bool)
    lungs[1, 10:30, 15:40] = True
    config = PipelineConfig()
    expected = to_model_input(windowed, lung_bounding_box(lungs, config.roi), 24)
    grey = slices_to_model_input(windowed, lungs, 24, config)
    torch.testing.assert_close(as_network_input(grey[:, None]), expected)
    per_slice = slices_to_model_input(windowed, lungs, 24, config, per_slice_box=True)
    torch.testing.assert_close(per_slice[0], to_model_input(windowed[:1], None, 24)[0, 0])  # no lung: whole


def test_slice_dataset_rejects_mismatched_labels() -> None:
    with pytest.raises(ConfigError):
        SliceDataset(torch.zeros(3, 8, 8), [0, 1])


def test_lung_roi_crop_of_a_ct_slice_matches_the_crop_to_the_true_lungs(tmp_path: Path) -> None:
    import tifffile

    from corona_ct.data.datasets import load_slice_input
    from corona_ct.data.phantom import make_phantom
    from corona_ct.pipeline.preprocess import window

    phantom = make_phantom(seed=0, shape=(12, 96, 96))
    # COVID-CTset style 16-bit TIFF: raw = HU + 1024 (IngestConfig.tiff_hu_offset).
    tifffile.imwrite(tmp_path / "slice.tif", (phantom.hu[6].astype(np.int32) + 1024).astype(np.uint16))
    config = PipelineConfig()
    cropped = load_slice_input(tmp_path / "slice.tif", "lung", 32, config)
    windowed = window(phantom.hu[6:7].astype(np.float32), "HU", config.window)
    truth = slices_to_model_input(windowed, phantom.lung_labels[6:7] > 0, 32, config)[0]
    whole = slices_to_model_input(windowed, None, 32, config)[0]
    assert float((cropped - truth).abs().mean()) < 0.03  # segmented box ≈ true lung box
    assert float((whole - truth).abs().mean()) > 0.05  # and the crop really changed the input


def test_training_inputs_are_explains_inputs(tmp_path: Path) -> None:
    """One single-slice path: a training image is what ``explain`` feeds the classifier, bit for bit."""
    import tifffile

    from corona_ct.data.datasets import load_slice_input
    from corona_ct.data.phantom import make_phantom
    from corona_ct.pipeline.ingest.slices import read_slice_image
    from corona_ct.pipeline.single_slice import prepare_slice

    phantom = make_phantom(seed=1, shape=(12, 96, 96))
    tifffile.imwrite(tmp_path / "slice.tif", (phantom.hu[5].astype(np.int32) + 1024).astype(np.uint16))
    config = PipelineConfig()
    masked = config.replace({"roi.mask_outside_lungs": True})
    image, units = read_slice_image(tmp_path / "slice.tif", config.ingest)
    for setting in (config, masked):
        for roi in ("lung", "none"):
            prepared = prepare_slice(image, units, setting, 32, roi=roi)
            assert torch.equal(
                load_slice_input(tmp_path / "slice.tif", roi, 32, setting), prepared.batch[0, 0]
            )
    assert prepared.roi == "image" and prepare_slice(image, units, config, 32).roi == "lung"
    # lung only: the box crop of the same slice, with air where the lungs are not
    boxed = prepare_slice(image, units, config, 32).batch[0, 0]
    lung_only = prepare_slice(image, units, masked, 32).batch[0, 0]
    blanked = lung_only == 0
    assert 0.2 < float(blanked.float().mean()) < 0.9 and bool((boxed[blanked] > 0).any())
    # blanking only darkens (a resize mixes with non-negative weights), and the lungs' core is unchanged
    assert bool((lung_only <= boxed + 1e-6).all()) and float((lung_only == boxed).float().mean()) > 0.05
