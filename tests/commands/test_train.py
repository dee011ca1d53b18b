"""``train-cls`` and ``cv`` end to end on a tiny manifest of phantom slice PNGs."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from corona_ct.data.phantom import make_phantom
from corona_ct.pipeline.commands import train as train_command
from corona_ct.pipeline.config import WindowConfig
from corona_ct.pipeline.preprocess import window


def _parser() -> argparse.ArgumentParser:
    # Only this module's subcommands: the command under test, independent of the other commands' imports.
    parser = argparse.ArgumentParser()
    train_command.register(parser.add_subparsers())
    return parser


@pytest.fixture(scope="module")
def slice_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Pre-windowed PNG slices of 8 phantoms (4 with consolidation, 4 without), 2 slices each."""
    folder = tmp_path_factory.mktemp("slices")
    rows = []
    for seed in range(8):
        label = "covid" if seed % 2 else "normal"
        phantom = make_phantom(
            seed=seed, shape=(8, 48, 48), lesions="consolidation" if seed % 2 else "none",
            lesion_volume_ml=10.0 if seed % 2 else None,
        )  # fmt: skip
        grey = window(phantom.hu, "HU", WindowConfig())
        for z in (3, 4):
            name = f"phantom{seed}_{z}.png"
            Image.fromarray(np.round(grey[z] * 255).astype(np.uint8)).save(folder / name)
            rows.append(
                {
                    "path": name,
                    "label": label,
                    "group": f"phantom{seed}",
                    "split": "test" if seed >= 6 else "",
                }
            )
    with (folder / "manifest.csv").open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["path", "label", "group", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return folder / "manifest.csv"


def test_train_cls_writes_checkpoint_card_curves_and_test_metrics(
    slice_manifest: Path, tmp_path: Path
) -> None:
    args = _parser().parse_args(
        ["train-cls", "--data", str(slice_manifest), "--roi", "none", "--input-size", "32", "--epochs", "1",
         "--batch-size", "4", "--val-fraction", "0.34", "--device", "cpu", "--output", str(tmp_path),
         "--lr-schedule", "cosine"]
    )  # fmt: skip
    assert args.handler(args) == 0
    card = json.loads((tmp_path / "model.json").read_text())
    assert card["train_config"]["lr_schedule"] == "cosine"
    assert card["architecture"] == "classifier/resnet50" and card["input"]["roi"] == "none"
    assert card["class_names"] == ["normal", "covid"] and card["input"]["size"] == 32
    assert len(card["manifest_sha256"]) == 64 and card["train_config"]["recipe"] == "gozes"
    for name in ("model.safetensors", "history.csv", "curves.png", "manifest.csv", "test_metrics.json"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "test_metrics.json").read_text())["n"] == 4


@pytest.mark.slow
def test_cv_writes_the_comparison_tables(slice_manifest: Path, tmp_path: Path) -> None:
    args = _parser().parse_args(
        ["cv", "--data", str(slice_manifest), "--roi", "none", "--backbones", "resnet50", "--folds", "2",
         "--input-size", "32", "--epochs", "1", "--batch-size", "4", "--device", "cpu", "--recipe",
         "covid-ctset", "--output", str(tmp_path)]
    )  # fmt: skip
    assert args.handler(args) == 0
    with (tmp_path / "per_fold.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert [row["fold"] for row in rows] == ["1", "2"]
    assert sum(int(row["n_test"]) for row in rows) == 16  # every slice tested once
    for row in rows:
        assert 0.0 <= float(row["test_accuracy"]) <= 1.0
        assert np.sum(json.loads(row["confusion_matrix"])) == int(row["n_test"])
    summary = (tmp_path / "summary.md").read_text()
    assert "| resnet50 |" in summary and "±" in summary
    assert (tmp_path / "roc.png").is_file() and (tmp_path / "confusion.png").is_file()


def test_data_options_are_checked(slice_manifest: Path, tmp_path: Path) -> None:
    from corona_ct.pipeline.errors import ConfigError

    args = _parser().parse_args(["train-cls", "--output", str(tmp_path)])
    with pytest.raises(ConfigError, match="--data"):
        args.handler(args)
    args = _parser().parse_args(["train-cls", "--class", "covid", "--output", str(tmp_path)])
    with pytest.raises(ConfigError, match="NAME=DIR"):
        args.handler(args)


@pytest.mark.slow
def test_train_seg_with_classical_pseudo_labels_on_unlabeled_ct(tmp_path: Path) -> None:
    from corona_ct.data.writers import write_nifti

    study = write_nifti(make_phantom(seed=3, shape=(10, 64, 64), lesions="mixed"), tmp_path / "ct.nii.gz")
    args = _parser().parse_args(
        ["train-seg", "--unlabeled", str(study), "--pseudo-labels", "classical", "--input-size", "64",
         "--epochs", "1", "--batch-size", "4", "--device", "cpu", "--output", str(tmp_path / "seg")]
    )  # fmt: skip
    assert args.handler(args) == 0
    card = json.loads((tmp_path / "seg" / "model.json").read_text())
    assert card["architecture"] == "segmenter/unet-vgg16" and card["pseudo_labels"] == "classical"
    assert card["n_train_slices"] + card["n_val_slices"] == 10
    args = _parser().parse_args(["train-seg", "--unlabeled", str(study), "--output", str(tmp_path / "x")])
    from corona_ct.pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="pseudo-labels"):
        args.handler(args)


@pytest.mark.slow
def test_train_seg_from_a_mask_manifest_and_run_with_the_unet(tmp_path: Path) -> None:
    """NIfTI volume + NIfTI mask and PNG slice + PNG mask → U-Net checkpoint → `run --seg-weights`."""
    import nibabel as nib

    from corona_ct.data.writers import write_nifti, write_png_slices
    from corona_ct.pipeline.cli import main

    phantom = make_phantom(seed=4, shape=(8, 64, 64), spacing_mm=(5.0, 4.0, 4.0), lesions="mixed")
    ct = write_nifti(phantom, tmp_path / "ct.nii.gz")
    mask = nib.Nifti1Image(
        np.ascontiguousarray(phantom.lung_labels.transpose(2, 1, 0)), phantom.geometry.affine_ras()
    )
    nib.save(mask, tmp_path / "ct_mask.nii.gz")
    png = write_png_slices(phantom, tmp_path / "png")[4]
    Image.fromarray((phantom.lung_labels[4] > 0).astype(np.uint8) * 255).save(tmp_path / "mask4.png")
    manifest = tmp_path / "seg.csv"
    manifest.write_text(
        f"image,mask,group\nct.nii.gz,ct_mask.nii.gz,a\n{Path(png).relative_to(tmp_path)},mask4.png,b\n"
    )
    args = _parser().parse_args(
        ["train-seg", "--data", str(manifest), "--input-size", "64", "--epochs", "1", "--batch-size", "4",
         "--val-fraction", "0.4", "--device", "cpu", "--output", str(tmp_path / "seg")]
    )  # fmt: skip
    assert args.handler(args) == 0
    card = json.loads((tmp_path / "seg" / "model.json").read_text())
    assert card["n_train_slices"] + card["n_val_slices"] == 9
    assert 0 <= card["best_validation"]["dice_mean"] <= 1

    code = main(
        ["run", str(ct), "--output", str(tmp_path / "out"), "--allow-untrained", "--no-progress",
         "--seg-weights", str(tmp_path / "seg" / "model.safetensors"), "--set", "roi.input_size=48"]
    )  # fmt: skip
    with (tmp_path / "out" / "summary.csv").open() as handle:
        row = next(csv.DictReader(handle))
    report = json.loads((tmp_path / "out" / row["study_id"] / "report.json").read_text())
    assert report["segmenter"] == "unet"
    assert report["models"]["segmenter"]["sha256"] == card["sha256"]
    # a 1-epoch U-Net may find no lungs (and this small phantom's lungs are below a real chest's
    # size): the study is then not assessable, which is an answer, not a failed study
    assert code == 0 and row["status"] in {"ok", "not-assessable"}


def test_the_card_names_the_input_the_config_makes() -> None:
    from corona_ct.pipeline.config import PipelineConfig

    masked = PipelineConfig().replace({"roi.mask_outside_lungs": True})
    assert train_command._card_roi(argparse.Namespace(roi="lung"), PipelineConfig()) == "lung-bbox"
    assert train_command._card_roi(argparse.Namespace(roi="lung"), masked) == "lung-bbox-masked"
    assert train_command._card_roi(argparse.Namespace(roi="none"), masked) == "none"
