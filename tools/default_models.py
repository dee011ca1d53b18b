"""Build the training data of the shipped default models and install their weights.

Three steps, each one command (docs/models.md):

    python -m tools.default_models prepare --data ../shared/data --output runs/defaults
    corona-ct train-cls --data runs/defaults/classifier.csv --output runs/defaults/classifier ...
    corona-ct train-seg --data runs/defaults/segmenter.csv --output runs/defaults/segmenter ...
    python -m tools.default_models install --output runs/defaults

``prepare`` writes

* ``classifier.csv`` (``path,label,group,split,source``): COVID slices from UCSD
  ``CT_COVID`` and the central slices of the 20 COVID-SemiSeg unlabeled volumes;
  non-COVID slices from UCSD ``CT_NonCOVID`` and the LIDC DICOM series. Groups are
  patients (UCSD figure prefix, SemiSeg case, LIDC series). The validation split is
  drawn per source and class so that every source is on both sides, never one group;
* ``segmenter.csv`` (``image,mask,group``): LIDC slices and SemiSeg unlabeled
  slices with classical pseudo-labels (right/left), and three seeded phantom
  volumes with their exact lung truth (seeds 1000–1002; the demo uses 1 and 2,
  the phantom cohort 100+).

``install`` copies each run's best checkpoint to ``models/weights/`` as fp16
safetensors with its card (checksummed), adding how it was trained.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from corona_ct.data.manifest import group_of, group_rule, image_files
from corona_ct.data.phantom import make_phantom
from corona_ct.models.checkpoint import load_classifier, load_segmenter, read_card, save_checkpoint
from corona_ct.models.weights import WEIGHTS_DIR
from corona_ct.pipeline.atomic import write_text
from corona_ct.pipeline.config import PipelineConfig
from corona_ct.pipeline.ingest import load_study
from corona_ct.pipeline.ingest.nifti import write_nifti
from corona_ct.pipeline.ingest.slices import read_slice_image
from corona_ct.pipeline.segment import segment_lungs, slice_lung_labels

VAL_FRACTION = 0.2
SEMISEG_SLICES_PER_VOLUME = 20
SEG_SEMISEG_SLICES_PER_VOLUME = 24
SEG_PHANTOM_SEEDS = (1000, 1001, 1002)
VAL_LIDC_SERIES = "LIDC-IDRI-0002"  # the other LIDC series is trained on; both are reported

CLASSIFIER_COMMAND = (
    "corona-ct train-cls --data runs/defaults/classifier.csv --output runs/defaults/classifier "
    "--recipe gozes --backbone resnet50 --input-size 128 --epochs 30 --patience 8 --workers 2"
)
SEGMENTER_COMMAND = (
    "corona-ct train-seg --data runs/defaults/segmenter.csv --output runs/defaults/segmenter "
    "--input-size 128 --epochs 14 --patience 5 --batch-size 8 --lesion-probability 0.6 "
    "--val-group LIDC-IDRI-0002 --val-group radiopaedia-case-36 --val-group phantom-1002"
)


def semiseg_patient(volume: str) -> str:
    """Radiopaedia volumes of one case share the case number (two series of one patient)."""
    match = re.search(r"covid-19-pneumonia-(\d+)", volume)
    return f"radiopaedia-case-{match.group(1)}" if match else volume


def central_slices(paths: list[Path], count: int) -> list[Path]:
    """``count`` evenly spaced slices from the middle half of a volume (ordered by slice index)."""
    ordered = sorted(paths, key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    low, high = len(ordered) // 4, len(ordered) - len(ordered) // 4
    middle = ordered[low:high] or ordered
    picks = np.unique(np.linspace(0, len(middle) - 1, min(count, len(middle))).round().astype(int))
    return [middle[i] for i in picks]


def grouped(paths: list[Path], rule: str) -> dict[str, list[Path]]:
    """Paths by their group under a built-in grouping rule of ``data.manifest``."""
    pattern = group_rule(rule)
    groups: dict[str, list[Path]] = {}
    for path in paths:
        groups.setdefault(group_of(path.name, pattern) or path.stem, []).append(path)
    return groups


def semiseg_volumes(folder: Path) -> dict[str, list[Path]]:
    return grouped(image_files(folder), "semiseg")


def classifier_rows(data: Path) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for label, sub in (("covid", "CT_COVID"), ("normal", "CT_NonCOVID")):
        for figure, paths in grouped(image_files(data / "covid-ct" / sub), "ucsd").items():
            rows += [
                {"path": str(p), "label": label, "group": f"ucsd:{figure}", "source": "ucsd"} for p in paths
            ]
    for volume, paths in semiseg_volumes(data / "covid-semiseg" / "unlabeled" / "Imgs").items():
        group = f"semiseg:{semiseg_patient(volume)}"
        for path in central_slices(paths, SEMISEG_SLICES_PER_VOLUME):
            rows.append({"path": str(path), "label": "covid", "group": group, "source": "semiseg"})
    for series in sorted((data / "dicom").glob("LIDC-IDRI-*")):
        for path in sorted(series.glob("*.dcm")):
            rows.append(
                {"path": str(path), "label": "normal", "group": f"lidc:{series.name}", "source": "lidc"}
            )
    return rows


def assign_splits(rows: list[dict[str, str]], seed: int = 0) -> None:
    """Hold out ``VAL_FRACTION`` of the groups of each (source, label) stratum, whole groups only."""
    rng = np.random.default_rng(seed)
    strata: dict[tuple[str, str], list[str]] = {}
    for row in rows:
        groups = strata.setdefault((row["source"], row["label"]), [])
        if row["group"] not in groups:
            groups.append(row["group"])
    held: set[str] = set()
    for (source, _), groups in sorted(strata.items()):
        if source == "lidc":
            held.add(f"lidc:{VAL_LIDC_SERIES}")
            continue
        n_val = max(1, round(VAL_FRACTION * len(groups)))
        held.update(rng.permutation(groups)[:n_val].tolist())
    for row in rows:
        row["split"] = "val" if row["group"] in held else "train"


def pseudo_label_rows(data: Path, output: Path) -> list[dict[str, str]]:
    """Classical right/left lung pseudo-labels of SemiSeg unlabeled slices, saved as label PNGs."""
    config = PipelineConfig()
    mask_dir = output / "pseudo_masks"
    mask_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for volume, paths in semiseg_volumes(data / "covid-semiseg" / "unlabeled" / "Imgs").items():
        for path in central_slices(paths, SEG_SEMISEG_SLICES_PER_VOLUME):
            array, units = read_slice_image(path, config.ingest)
            labels = slice_lung_labels(array, units, config, str(path))[0]
            if not labels.any():
                continue  # a slice the classical method cannot label teaches nothing
            mask_path = mask_dir / f"{path.stem}.png"
            Image.fromarray(labels.astype(np.uint8)).save(mask_path)
            rows.append({"image": str(path), "mask": str(mask_path), "group": semiseg_patient(volume)})
    return rows


def lidc_rows(data: Path, output: Path) -> list[dict[str, str]]:
    """LIDC series as NIfTI volumes with classical 3D pseudo-labels (HU input, as at inference)."""
    config = PipelineConfig()
    rows = []
    for series in sorted((data / "dicom").glob("LIDC-IDRI-*")):
        volume = load_study(series, config.ingest)
        labels = np.asarray(segment_lungs(volume, config.segment, config.window).labels)
        image_path = write_nifti(output / "volumes" / f"{series.name}.nii.gz", volume.array, volume)
        mask_path = write_nifti(output / "volumes" / f"{series.name}-lungs.nii.gz", labels, volume)
        rows.append({"image": str(image_path), "mask": str(mask_path), "group": series.name})
    return rows


def phantom_rows(output: Path) -> list[dict[str, str]]:
    """The seeded phantom volumes (``SEG_PHANTOM_SEEDS``) as NIfTI with their exact lung labels."""
    rows = []
    for seed in SEG_PHANTOM_SEEDS:
        phantom = make_phantom(seed=seed, lesions="mixed", lesion_volume_ml=40.0 + 60.0 * (seed % 3))
        image = write_nifti(
            output / "volumes" / f"phantom-{seed}.nii.gz", phantom.hu, phantom.to_volume(), dtype=np.int16
        )
        mask = write_nifti(
            output / "volumes" / f"phantom-{seed}-lungs.nii.gz", phantom.lung_labels, phantom.to_volume()
        )
        rows.append({"image": str(image), "mask": str(mask), "group": f"phantom-{seed}"})
    return rows


def write_csv(path: Path, rows: list[dict[str, str]], columns: list[str]) -> None:
    """CSV with paths relative to its folder (the manifests move with the run folder)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(
            [
                os.path.relpath(row[c], path.parent) if c in {"path", "image", "mask"} else row[c]
                for c in columns
            ]
        )
    write_text(path, buffer.getvalue())


def prepare(data: Path, output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    rows = classifier_rows(data)
    assign_splits(rows)
    write_csv(output / "classifier.csv", rows, ["path", "label", "group", "split", "source"])
    for split in ("train", "val"):
        chosen = [r for r in rows if r["split"] == split]
        counts = {
            f"{source}/{label}": sum(r["source"] == source and r["label"] == label for r in chosen)
            for source, label in sorted({(r["source"], r["label"]) for r in rows})
        }
        n_groups = len({r["group"] for r in chosen})
        print(f"classifier {split}: {len(chosen)} slices, {n_groups} groups {counts}")
    seg_rows = lidc_rows(data, output) + pseudo_label_rows(data, output) + phantom_rows(output)
    write_csv(output / "segmenter.csv", seg_rows, ["image", "mask", "group"])
    print(f"segmenter: {len(seg_rows)} rows (LIDC volumes, SemiSeg slices, phantom volumes)")


TRAINING_DATA = {
    "classifier": {
        "positive": "UCSD COVID-CT CT_COVID (Zhao et al. 2020) + central slices of the 20 COVID-SemiSeg "
        "unlabeled volumes (Ma et al. 2020)",
        "negative": "UCSD COVID-CT CT_NonCOVID + LIDC-IDRI-0001 (TCIA, CC BY 3.0)",
        "split": "grouped by patient (UCSD figure prefix, SemiSeg case, LIDC series); 20 % of the groups "
        "of each source and class held out for validation, LIDC-IDRI-0002 held out",
        "command": CLASSIFIER_COMMAND,
    },
    "segmenter": {
        "data": "LIDC-IDRI-0001/0002 (classical 3D pseudo-labels), COVID-SemiSeg unlabeled slices "
        "(classical per-slice pseudo-labels), 3 phantom volumes (exact lung truth); synthetic "
        "ground-glass and consolidation blobs pasted inside the lungs during training",
        "split": "by volume: LIDC-IDRI-0002, Radiopaedia case 36 and phantom 1002 held out (one of each kind)",
        "command": SEGMENTER_COMMAND,
    },
}


def install(output: Path, weights_dir: Path, validation: Path | None, cohort: Path | None) -> None:
    """Each run's ``model.safetensors`` → ``weights_dir/<kind>.safetensors`` (fp16) with the training
    data, intended use and validation figures added to its card."""
    figures: dict[str, Any] = json.loads(validation.read_text()) if validation else {}
    if cohort is not None:
        figures.setdefault("classifier", {})["phantom_cohort"] = json.loads(cohort.read_text())
    for kind in ("classifier", "segmenter"):
        source = output / kind / "model.safetensors"
        loaded = load_classifier(source) if kind == "classifier" else load_segmenter(source)
        card = {
            **loaded.card,
            "training_data": TRAINING_DATA[kind],
            "intended_use": "research only; the training images are not a clinical population",
        }
        if kind in figures:
            card["validation"] = figures[kind]
        path = save_checkpoint(loaded.module, weights_dir / f"{kind}.safetensors", card, half=True)
        size_mb = path.stat().st_size / 1e6
        print(f"{kind}: {path} ({size_mb:.1f} MB, sha256 {read_card(path)['sha256'][:16]}…)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    prep = sub.add_parser("prepare", help="write classifier.csv, segmenter.csv and pseudo-labels")
    prep.add_argument("--data", type=Path, default=Path("../shared/data"))
    prep.add_argument("--output", type=Path, default=Path("runs/defaults"))
    inst = sub.add_parser("install", help="copy the trained runs to models/weights as fp16")
    inst.add_argument("--output", type=Path, default=Path("runs/defaults"))
    inst.add_argument("--weights-dir", type=Path, default=WEIGHTS_DIR)
    inst.add_argument("--validation", type=Path, help="validation.json from validate_defaults.py")
    inst.add_argument("--cohort", type=Path, help="metrics.json from phantom_cohort.py")
    args = parser.parse_args(argv)
    if args.step == "prepare":
        prepare(args.data, args.output)
    else:
        install(args.output, args.weights_dir, args.validation, args.cohort)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
