"""Validate the default models on real data; every figure of docs/models.md comes from here.

    python -m tools.validate_defaults --data ../shared/data --manifest runs/defaults/classifier.csv \\
        --output runs/defaults/validation [--cls-weights W] [--seg-weights W]

Without weight options the shipped defaults in ``models/weights/`` are used. Prints
and writes ``validation.json``:

* classifier on the grouped validation split of the manifest: AUC (DeLong 95 % CI),
  accuracy, sensitivity, specificity at p ≥ ``classify.positive_threshold`` (0.5),
  overall and per source;
* localisation on COVID-SemiSeg train (50 slices, radiologists' infection masks,
  never trained on): Dice of fused Grad-CAM > ``cam.activation_threshold`` (0.6)
  against the mask (the key names the threshold: ``dice_cam_0.6``), the best
  single-threshold Dice, the pointing game (map maximum inside the infection), and
  the whole-lung-mask Dice as a reference a map must beat;
* lungs: fraction of infection pixels inside the lung mask, U-Net vs classical;
* LIDC series (no COVID): fraction of evaluated slices called positive.

The phantom cohort (Corona score vs true lesion volume) is ``python -m tools.phantom_cohort``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

from corona_ct.data.datasets import build_slice_dataset
from corona_ct.data.manifest import read_manifest_csv
from corona_ct.models.train_classifier import predict_probabilities
from corona_ct.pipeline.atomic import write_text
from corona_ct.pipeline.config import PipelineConfig
from corona_ct.pipeline.datamodel import Severity, StudyResult
from corona_ct.pipeline.device import resolve_device
from corona_ct.pipeline.ingest import load_study
from corona_ct.pipeline.ingest.slices import read_slice_image
from corona_ct.pipeline.modelset import ModelSet, load_models
from corona_ct.pipeline.preprocess import paste_back
from corona_ct.pipeline.run import analyze_study
from corona_ct.pipeline.segment import slice_lung_labels
from corona_ct.pipeline.single_slice import explain_slice, slice_lung_mask
from corona_ct.pipeline.stats import roc_analysis

#: Map thresholds of the best-threshold Dice search (the fixed one is ``cam.activation_threshold``).
THRESHOLDS = np.round(np.arange(0.05, 1.0, 0.05), 2)


def binary_figures(
    labels: npt.NDArray[np.int64], probs: npt.NDArray[np.float64], threshold: float
) -> dict[str, Any]:
    """AUC with DeLong CI and the operating point p ≥ ``threshold`` (``classify.positive_threshold``)."""
    called = probs >= threshold
    positive, negative = labels == 1, labels == 0
    out: dict[str, Any] = {
        "n": int(labels.size),
        "n_covid": int(positive.sum()),
        "accuracy": float(np.mean(called == positive)),
        "sensitivity": float(called[positive].mean()) if positive.any() else None,
        "specificity": float((~called[negative]).mean()) if negative.any() else None,
    }
    if positive.any() and negative.any():
        roc = roc_analysis(labels, probs)
        out.update(auc=roc.auc, auc_ci95=[roc.ci_low, roc.ci_high])
    return out


def validate_classifier(manifest_path: Path, models: ModelSet, config: PipelineConfig) -> dict[str, Any]:
    """Figures of the classifier on the manifest's ``split=val`` rows, overall and per source."""
    manifest = read_manifest_csv(manifest_path)
    with manifest_path.open(encoding="utf-8") as handle:
        sources = [row.get("source", "") for row in csv.DictReader(handle)]
    val = manifest.split_indices("val")
    if not val.size:
        raise SystemExit(f"{manifest_path} has no rows with split=val")
    size = models.input_size(config)
    dataset = build_slice_dataset(manifest.subset(val), "lung", size, config, workers=2)
    device = resolve_device(config.runtime.device)
    probs = predict_probabilities(models.classifier.module, dataset, 32, device, config.runtime.amp)
    labels = manifest.labels[val]
    source = np.array(sources)[val]
    threshold = config.classify.positive_threshold
    figures: dict[str, Any] = {"all": binary_figures(labels, probs, threshold)}
    # Per source: UCSD has both classes; SemiSeg (all COVID) and LIDC (none) only make sense together.
    ucsd = source == "ucsd"
    figures["ucsd"] = binary_figures(labels[ucsd], probs[ucsd], threshold)
    ct = np.isin(source, ["semiseg", "lidc"])
    figures["semiseg_vs_lidc"] = binary_figures(labels[ct], probs[ct], threshold)
    figures["positive_threshold"] = threshold
    figures["n_groups"] = int(np.unique(manifest.groups[val]).size)
    return figures


def resize_maps(maps: npt.NDArray[np.float32], size: int) -> npt.NDArray[np.float32]:
    """(n, h, w) layer maps → (n, size, size), bilinear, like the fused map's upsampling."""
    tensor = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[:, None]
    resized = torch.nn.functional.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False)
    return resized[:, 0].numpy()


def dice(prediction: npt.NDArray[np.bool_], truth: npt.NDArray[np.bool_]) -> float:
    """Dice overlap of two masks (1.0 when both are empty)."""
    total = int(prediction.sum() + truth.sum())
    return 2.0 * int((prediction & truth).sum()) / total if total else 1.0


def semiseg_pairs(data: Path) -> list[tuple[Path, Path]]:
    """(image, infection mask) of every COVID-SemiSeg train slice that has a mask."""
    images = data / "covid-semiseg" / "train" / "Imgs"
    masks = data / "covid-semiseg" / "train" / "GT"
    pairs = []
    for image in sorted(images.iterdir()):
        mask = masks / f"{image.stem}.png"
        if mask.is_file():
            pairs.append((image, mask))
    return pairs


def validate_semiseg(data: Path, models: ModelSet, config: PipelineConfig) -> dict[str, Any]:
    """Localisation (Grad-CAM vs infection masks) and lung coverage of the infection."""
    cam_threshold = config.cam.activation_threshold
    dice_key = f"dice_cam_{cam_threshold:g}"
    size = models.input_size(config)
    seg = models.segmenter
    per_slice: list[dict[str, Any]] = []
    dice_by_threshold = []
    # Each Grad-CAM scale alone (before the product): does either of them find the infection?
    layer_dice: dict[str, list[list[float]]] = {}
    layer_hits: dict[str, list[bool]] = {}
    fused_max: list[float] = []
    covered = {"classical": 0, "unet": 0}
    infection_total = 0
    for image_path, mask_path in semiseg_pairs(data):
        image, units = read_slice_image(image_path, config.ingest)
        with Image.open(mask_path) as handle:
            infection = np.asarray(handle.convert("L")) > 127
        classical = slice_lung_labels(image, units, config, image_path.name)[0] > 0
        infection_total += int(infection.sum())
        covered["classical"] += int((infection & classical).sum())
        # The run's lungs (the U-Net when loaded), as `corona-ct explain` crops with them.
        run_lungs = slice_lung_mask(image, units, config, models, image_path.name)
        if seg is not None:
            covered["unet"] += int((infection & run_lungs[0]).sum())
        explained = explain_slice(image, units, config, models, source=image_path.name)  # explain's path
        box, cam = explained.box, explained.cam
        dice_by_threshold.append([dice(cam > t, infection) for t in THRESHOLDS])
        fused_max.append(float(cam.max()))
        for layer, maps in explained.layer_maps.items():
            layer_map = paste_back(resize_maps(maps[None], size), box, image.shape)[0]
            layer_dice.setdefault(layer, []).append([dice(layer_map > t, infection) for t in THRESHOLDS])
            spot = np.unravel_index(int(np.argmax(layer_map)), layer_map.shape)
            layer_hits.setdefault(layer, []).append(bool(infection[spot]))
        peak = np.unravel_index(int(np.argmax(cam)), cam.shape)
        per_slice.append(
            {
                "slice": image_path.stem,
                "probability": explained.probability,
                dice_key: dice(cam > cam_threshold, infection),
                "pointing_hit": bool(infection[peak]) if infection.any() else None,
                "lung_mask_dice": dice(classical, infection),
                "infection_in_classical_lungs": float(
                    (infection & classical).sum() / max(infection.sum(), 1)
                ),
            }
        )
    by_threshold = np.asarray(dice_by_threshold).mean(axis=0)
    best = int(np.argmax(by_threshold))
    hits = [row["pointing_hit"] for row in per_slice if row["pointing_hit"] is not None]
    probabilities = np.array([row["probability"] for row in per_slice])
    return {
        "n_slices": len(per_slice),
        "cam_threshold": cam_threshold,
        f"mean_{dice_key}": float(np.mean([row[dice_key] for row in per_slice])),
        "best_threshold": float(THRESHOLDS[best]),
        "mean_dice_best_threshold": float(by_threshold[best]),
        "pointing_game_hit_rate": float(np.mean(hits)),
        "mean_dice_whole_lung_mask": float(np.mean([row["lung_mask_dice"] for row in per_slice])),
        "median_fused_map_max": float(np.median(fused_max)),
        "layers": {
            layer: {
                "best_threshold": float(THRESHOLDS[int(np.argmax(np.mean(rows, axis=0)))]),
                "mean_dice_best_threshold": float(np.max(np.mean(rows, axis=0))),
                "pointing_game_hit_rate": float(np.mean(layer_hits[layer])),
            }
            for layer, rows in layer_dice.items()
        },
        "fraction_called_covid": float(np.mean(probabilities >= config.classify.positive_threshold)),
        "infection_in_lungs_classical": covered["classical"] / infection_total,
        "infection_in_lungs_unet": covered["unet"] / infection_total if seg is not None else None,
        "per_slice": per_slice,
    }


def require_assessed(result: StudyResult, source: Path) -> tuple[Severity, float]:
    """(severity, case probability) of a study the figures need; exits naming it when its lungs failed the gate."""
    if result.severity is None or result.case_probability is None:
        raise SystemExit(
            f"{source}: not assessable ({result.not_assessable_reason}); the validation needs every study "
            "assessed: check the series (or the segmenter weights) before quoting figures"
        )
    return result.severity, result.case_probability


def validate_lidc(data: Path, models: ModelSet, config: PipelineConfig) -> dict[str, Any]:
    """Per LIDC series (no COVID), run end to end: positive slice fraction, case figures, lung volume."""
    out: dict[str, Any] = {}
    for series in sorted((data / "dicom").glob("LIDC-IDRI-*")):
        result = analyze_study(load_study(series, config.ingest), models, config)
        probabilities = np.asarray(result.scores.probs)
        evaluated = np.asarray(result.scores.evaluated)
        positive = probabilities[evaluated] >= config.classify.positive_threshold
        severity, case_probability = require_assessed(result, series)
        out[series.name] = {
            "evaluated_slices": int(evaluated.sum()),
            "positive_fraction": float(positive.mean()) if positive.size else None,
            "case_probability": float(case_probability),
            "corona_score_cm3": float(severity.corona_score_cm3),
            "lung_volume_cm3": float(severity.lung_volume_cm3),
        }
    return out


def classifier_localisation(semiseg: dict[str, Any], with_slices: bool = True) -> dict[str, Any]:
    """The classifier's figures of :func:`validate_semiseg` (not the segmenter's ``infection_in_lungs_*``);
    without its ``per_slice`` rows when not ``with_slices`` (a model card keeps summaries only)."""
    return {
        k: v
        for k, v in semiseg.items()
        if not k.startswith("infection_in") and (with_slices or k != "per_slice")
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--manifest", type=Path, default=Path("runs/defaults/classifier.csv"))
    parser.add_argument("--output", type=Path, default=Path("runs/defaults/validation"))
    parser.add_argument("--cls-weights", type=Path)
    parser.add_argument("--seg-weights", type=Path)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)

    config = PipelineConfig().replace({"runtime.device": args.device})
    models = load_models(config, args.cls_weights, args.seg_weights)
    print(f"classifier: {models.describe()['classifier']}\nsegmenter: {models.describe()['segmenter']}")
    started = time.perf_counter()
    report: dict[str, Any] = {"classifier": {}, "segmenter": {}}
    classifier = validate_classifier(args.manifest, models, config)
    semiseg = validate_semiseg(args.data, models, config)
    lidc = validate_lidc(args.data, models, config)
    report["classifier"] = {
        "validation_split": classifier,
        "localisation_semiseg_train": classifier_localisation(semiseg),
        "lidc_no_covid": lidc,
    }
    report["segmenter"] = {
        "infection_in_lungs_semiseg_train": {
            "unet": semiseg["infection_in_lungs_unet"],
            "classical": semiseg["infection_in_lungs_classical"],
        },
        "lidc_lung_volume_cm3": {name: row["lung_volume_cm3"] for name, row in lidc.items()},
    }
    args.output.mkdir(parents=True, exist_ok=True)
    write_text(args.output / "validation.json", json.dumps(report, indent=2) + "\n")

    def fmt(row: dict[str, Any]) -> str:
        ci = row.get("auc_ci95")
        auc = f"AUC {row['auc']:.3f} ({ci[0]:.3f}–{ci[1]:.3f})" if ci else "AUC —"
        sens, spec = row["sensitivity"], row["specificity"]
        return (
            f"n={row['n']} ({row['n_covid']} covid): {auc}, accuracy {row['accuracy']:.3f}, "
            f"sensitivity {'—' if sens is None else f'{sens:.3f}'}, "
            f"specificity {'—' if spec is None else f'{spec:.3f}'}"
        )

    print(f"\nclassifier, grouped validation split ({classifier['n_groups']} groups)")
    for name in ("all", "ucsd", "semiseg_vs_lidc"):
        print(f"  {name:<16} {fmt(classifier[name])}")
    print(f"\nlocalisation on COVID-SemiSeg train ({semiseg['n_slices']} slices)")
    cam_threshold = config.cam.activation_threshold
    print(
        f"  Dice (fused Grad-CAM > {cam_threshold:g}):     {semiseg[f'mean_dice_cam_{cam_threshold:g}']:.3f}"
    )
    print(
        f"  Dice at the best threshold ({semiseg['best_threshold']:.2f}): {semiseg['mean_dice_best_threshold']:.3f}"
    )
    print(f"  pointing game hit rate:          {semiseg['pointing_game_hit_rate']:.3f}")
    print(f"  Dice of the whole lung mask:     {semiseg['mean_dice_whole_lung_mask']:.3f} (reference)")
    print(f"  median maximum of the fused map: {semiseg['median_fused_map_max']:.3f}")
    for layer, row in semiseg["layers"].items():
        print(
            f"  {layer} alone: best Dice {row['mean_dice_best_threshold']:.3f} "
            f"(threshold {row['best_threshold']:.2f}), pointing game {row['pointing_game_hit_rate']:.3f}"
        )
    print(
        f"  slices called COVID (p >= {config.classify.positive_threshold:g}):  {semiseg['fraction_called_covid']:.3f}"
    )
    unet = semiseg["infection_in_lungs_unet"]
    print("\ninfection pixels inside the lung mask")
    print(
        f"  U-Net {'—' if unet is None else f'{unet:.3f}'}, classical {semiseg['infection_in_lungs_classical']:.3f}"
    )
    print("\nLIDC (no COVID)")
    for name, row in lidc.items():
        fraction = row["positive_fraction"]
        print(
            f"  {name}: {row['evaluated_slices']} slices evaluated, "
            f"positive fraction {'—' if fraction is None else f'{fraction:.3f}'}, "
            f"case p {row['case_probability']:.3f}, score {row['corona_score_cm3']:.1f} cm³, "
            f"lungs {row['lung_volume_cm3']:.0f} cm³"
        )
    print(f"\n{time.perf_counter() - started:.0f} s; {args.output / 'validation.json'}")


if __name__ == "__main__":
    main()
