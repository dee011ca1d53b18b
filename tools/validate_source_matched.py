"""Validate the source-matched classifier where the image source cannot separate the classes.

    python -m tools.validate_source_matched --data ../shared/data --runs runs/sm \\
        --output runs/sm/validation [--final models/weights/classifier.safetensors]

Every figure comes from data the scored model never trained on:

* **COVID-CT-MD, leave one patient out**: each of P002 (COVID-19), cap002 (pneumonia) and
  normal001 is run end to end (U-Net lungs, case box, ResNet-50, two-scale Grad-CAM,
  Corona score) by the model of ``RUNS/lopo-<patient>`` trained without it. Slice AUC of
  infected vs clean slices (radiologists' labels) per patient and pooled; case Corona
  score and probability; share of clean slices called positive.
* **Non-COVID CT never trained on** (the epoch-selection patients of
  ``models.build_defaults.VAL_GROUPS``: LIDC-IDRI-0002 and four TCGA patients), plus each
  LOPO model on its held-out normal001: share of evaluated slices called positive.
* **Localisation** on the COVID-SemiSeg masked slices of texture fold B, whose textures
  no LOPO model saw: Dice of the fused map > ``cam.activation_threshold`` (0.6; the key
  names it: ``mean_dice_cam_0.6``), best-threshold Dice, pointing game, and the count of
  positive slices whose map is empty.
* **UCSD COVID-CT** (figure crops, never trained on) with the final model: AUC with its
  DeLong 95 % CI, overall (the stretch goal: another source entirely).
* **SemiSeg, final model** (``--only semiseg``): localisation on all 50 masked COVID-SemiSeg slices
  through the single-slice path of ``explain`` (``tools.validate_defaults.validate_semiseg``; 18 of
  them are fold A, whose textures trained the final model), with the whole-lung-mask Dice a map must beat.

Slices are called positive at p ≥ ``classify.positive_threshold``. Writes ``validation.json``;
prints a summary. The phantom cohort is ``python -m tools.phantom_cohort``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from matplotlib.figure import Figure
from PIL import Image

from corona_ct.data.source_matched import CTMD_PATIENTS, ctmd_infection_labels
from corona_ct.models.build_defaults import VAL_GROUPS, texture_fold
from corona_ct.models.weights import default_weights
from corona_ct.pipeline.commands.options import set_option_help
from corona_ct.pipeline.config import PipelineConfig, load_config
from corona_ct.pipeline.datamodel import StudyResult
from corona_ct.pipeline.errors import ConfigError
from corona_ct.pipeline.ingest import load_study
from corona_ct.pipeline.ingest.slices import read_slice_image
from corona_ct.pipeline.modelset import ModelSet, load_models
from corona_ct.pipeline.preprocess import slice_lung_fraction
from corona_ct.pipeline.run import analyze_study
from corona_ct.pipeline.single_slice import explain_slice as explain_one
from corona_ct.pipeline.stats import roc_analysis
from tools.validate_defaults import (
    THRESHOLDS,
    classifier_localisation,
    dice,
    require_assessed,
    validate_semiseg,
)


def auc_with_ci(labels: npt.NDArray[np.int64], scores: npt.NDArray[np.float64]) -> dict[str, Any] | None:
    """AUC with its DeLong 95 % CI, or None when one class is missing."""
    if labels.min(initial=1) == labels.max(initial=0) or labels.size < 2:
        return None
    roc = roc_analysis(labels, scores)
    return {
        "auc": roc.auc,
        "ci95": [roc.ci_low, roc.ci_high],
        "n": int(labels.size),
        "n_pos": int(labels.sum()),
    }


def explain_slice(
    path: Path, models: ModelSet, config: PipelineConfig
) -> tuple[float, np.ndarray, np.ndarray]:
    """(probability, fused map on the image grid, image) of one slice image: ``explain``'s own path."""
    image, units = read_slice_image(path, config.ingest)
    explained = explain_one(image, units, config, models, source=path.name)
    return explained.probability, explained.cam, image


def save_montage(result: StudyResult, infected: np.ndarray, path: Path, count: int = 8) -> None:
    """The ``count`` evaluated slices with the highest probability, fused Grad-CAM over the CT."""
    probs = np.nan_to_num(np.asarray(result.scores.probs, dtype=np.float64), nan=-1.0)
    chosen = np.sort(np.argsort(probs)[::-1][:count])
    fig = Figure(figsize=(2.2 * count, 2.6))  # matplotlib's object API: no pyplot state, no backend switch
    axes = fig.subplots(1, count)
    for ax, z in zip(np.atleast_1d(axes), chosen, strict=False):
        ax.imshow(np.clip(result.volume.array[z], -1000, 0), cmap="gray")
        cam = np.ma.masked_less_equal(result.cams.maps[z], 0.05)
        ax.imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
        ax.contour(result.lung_mask.lungs[z], [0.5], colors="w", linewidths=0.4)
        ax.set_title(f"z{z} p={probs[z]:.2f} {'inf' if infected[z] else 'clean'}", fontsize=7)
        ax.axis("off")
    fig.savefig(path, dpi=70, bbox_inches="tight")


def lopo(
    data: Path, runs: Path, config: PipelineConfig, output: Path, only: list[str] | None = None
) -> dict[str, Any]:
    """Each COVID-CT-MD patient run end to end by the model of ``runs/lopo-<patient>`` trained without it."""
    out: dict[str, Any] = {"patients": {}}
    for patient in only or CTMD_PATIENTS:
        weights = runs / f"lopo-{patient}" / "model.safetensors"
        models = load_models(config, weights)
        folder = data / "covid-ct-md" / patient
        volume = load_study(folder, config.ingest)
        infected = ctmd_infection_labels(volume, data / "covid-ct-md" / "slice_labels.csv", patient)
        started = time.perf_counter()
        result = analyze_study(volume, models, config)
        evaluated = np.asarray(result.scores.evaluated)
        probs = np.asarray(result.scores.probs, dtype=np.float64)[evaluated]
        labels = infected[evaluated]
        called = probs >= config.classify.positive_threshold
        sev, case_probability = require_assessed(result, folder)
        positive_maps = np.asarray(result.cams.maps)[evaluated][called]
        lung_fraction = slice_lung_fraction(result.lung_mask.lungs)
        out["patients"][patient] = {
            "weights": str(weights),
            "evaluated_slices": int(evaluated.sum()),
            "infected_slices": int(labels.sum()),
            "slice_auc": auc_with_ci(labels, probs),
            "clean_called_positive": float(called[labels == 0].mean()) if (labels == 0).any() else None,
            "infected_called_positive": float(called[labels == 1].mean()) if (labels == 1).any() else None,
            "case_probability": case_probability,
            "corona_score_cm3": sev.corona_score_cm3,
            "affected_percent": sev.affected_percent,
            "lung_volume_cm3": sev.lung_volume_cm3,
            "positive_slices": sev.positive_slices,
            "positive_slices_with_empty_map": int(sum(1 for m in positive_maps if not (m > 0).any())),
            "seconds": round(time.perf_counter() - started, 1),
            "slices": [
                {
                    "index": int(i),
                    "infected": int(infected[i]),
                    "probability": float(result.scores.probs[i]),
                    "lung_fraction": float(lung_fraction[i]),
                }
                for i in np.flatnonzero(evaluated)
            ],
        }
        save_montage(result, infected, output / f"maps-{patient}.png")
        logging.info("%s: %s", patient, {k: v for k, v in out["patients"][patient].items() if k != "slices"})
    return out


#: Slices whose lung cross-section is below this share of the study's largest (apex, bases) are
#: reported apart: on P002 the held-out model's false calls lay there (docs/validation.md, stop 23).
SMALL_LUNG_FRACTION = 0.3


def by_lung_fraction(slices: list[dict[str, Any]], cut: float, threshold: float) -> dict[str, Any]:
    """Slice figures apart for slices with at least ``cut`` of the study's largest lung area and for
    the rest (apex, bases): how many, how many infected, AUC and the share of clean slices called
    positive (p ≥ ``threshold``). Rows without ``lung_fraction`` (older files) are left out."""
    rows = [row for row in slices if "lung_fraction" in row]
    out: dict[str, Any] = {"cut": cut}
    for name, keep in (("large_lung", lambda f: f >= cut), ("small_lung", lambda f: f < cut)):
        part = [row for row in rows if keep(row["lung_fraction"])]
        labels = np.array([row["infected"] for row in part], dtype=np.int64)
        probs = np.array([row["probability"] for row in part], dtype=np.float64)
        clean = probs[labels == 0]
        out[name] = {
            "slices": len(part),
            "infected": int(labels.sum()),
            "slice_auc": auc_with_ci(labels, probs),
            "clean_called_positive": float(np.mean(clean >= threshold)) if clean.size else None,
        }
    return out


def lopo_summary(patients: dict[str, Any], threshold: float = 0.5) -> dict[str, Any]:
    """Pooled slice AUC over the held-out patients scored so far, and COVID vs normal at case level;
    per patient and pooled, the slice figures apart for small and large lung cross-sections."""
    every_slice = [row for p in patients.values() for row in p["slices"]]
    labels = np.array([row["infected"] for row in every_slice])
    probs = np.array([row["probability"] for row in every_slice])
    out: dict[str, Any] = {"patients": patients, "pooled_slice_auc": auc_with_ci(labels, probs)}
    out["by_lung_fraction"] = {
        "pooled": by_lung_fraction(every_slice, SMALL_LUNG_FRACTION, threshold),
        **{
            name: by_lung_fraction(p["slices"], SMALL_LUNG_FRACTION, threshold)
            for name, p in patients.items()
        },
    }
    if {"P002", "normal001"} <= set(patients):
        out["covid_above_normal"] = {
            "corona_score": patients["P002"]["corona_score_cm3"] > patients["normal001"]["corona_score_cm3"],
            "probability": patients["P002"]["case_probability"] > patients["normal001"]["case_probability"],
        }
    return out


def clean_ct(data: Path, weights: Path | None, config: PipelineConfig) -> dict[str, Any]:
    """Slices called positive on non-COVID CT no model trained on (the epoch-selection patients)."""
    models = load_models(config, weights)
    out: dict[str, Any] = {}
    called_all: list[bool] = []
    for group in VAL_GROUPS:
        if group.startswith("LIDC"):
            result = analyze_study(load_study(data / "dicom" / group, config.ingest), models, config)
            evaluated = np.asarray(result.scores.evaluated)
            probs = np.asarray(result.scores.probs)[evaluated]
        elif group.startswith("TCGA"):
            probs = np.array(
                [
                    explain_slice(p, models, config)[0]
                    for p in sorted((data / "tcga-slices" / group).glob("*.dcm"))
                ]
            )
        else:
            continue
        called = probs >= config.classify.positive_threshold
        called_all += called.tolist()
        out[group] = {"evaluated_slices": int(probs.size), "called_positive": int(called.sum()),
                      "max_probability": float(probs.max()) if probs.size else None}  # fmt: skip
    out["all"] = {"evaluated_slices": len(called_all), "positive_fraction": float(np.mean(called_all))}
    return out


def localisation(data: Path, runs: Path, config: PipelineConfig) -> dict[str, Any]:
    """Grad-CAM of each LOPO model against the infection masks of texture fold B (never trained on)."""
    cam_threshold, positive = config.cam.activation_threshold, config.classify.positive_threshold
    dice_key = f"mean_dice_cam_{cam_threshold:g}"
    images = data / "covid-semiseg" / "train" / "Imgs"
    fold_b = [p for p in sorted(images.iterdir()) if texture_fold(p.stem) == "B"]
    out: dict[str, Any] = {"slices": [p.stem for p in fold_b], "cam_threshold": cam_threshold, "models": {}}
    for patient in CTMD_PATIENTS:
        weights = runs / f"lopo-{patient}" / "model.safetensors"
        if not weights.is_file():
            logging.warning("localisation: %s is missing, skipped", weights)
            continue
        models = load_models(config, weights)
        dices, by_threshold, hits, probabilities, empty_positive = [], [], [], [], 0
        for path in fold_b:
            with Image.open(data / "covid-semiseg" / "train" / "GT" / f"{path.stem}.png") as handle:
                infection = np.asarray(handle.convert("L")) > 127
            probability, cam, _ = explain_slice(path, models, config)
            probabilities.append(probability)
            dices.append(dice(cam > cam_threshold, infection))
            by_threshold.append([dice(cam > t, infection) for t in THRESHOLDS])
            peak = np.unravel_index(int(np.argmax(cam)), cam.shape)
            hits.append(bool(infection[peak]) and cam.max() > 0)
            empty_positive += int(probability >= positive and not (cam > 0).any())
        mean_by_threshold = np.mean(by_threshold, axis=0)
        out["models"][f"lopo-{patient}"] = {
            dice_key: float(np.mean(dices)),
            "best_threshold": float(THRESHOLDS[int(np.argmax(mean_by_threshold))]),
            "mean_dice_best_threshold": float(mean_by_threshold.max()),
            "pointing_game": float(np.mean(hits)),
            "called_positive": float(np.mean(np.asarray(probabilities) >= positive)),
            "positive_slices_with_empty_map": empty_positive,
        }
        logging.info("localisation lopo-%s: %s", patient, out["models"][f"lopo-{patient}"])
    values = list(out["models"].values())
    out["mean"] = {
        k: float(np.mean([v[k] for v in values]))
        for k in (dice_key, "mean_dice_best_threshold", "pointing_game", "called_positive")
    }
    return out


def ucsd(data: Path, weights: Path | None, config: PipelineConfig) -> dict[str, Any]:
    """The final model on the UCSD COVID-CT figure crops (another source entirely): AUC and calls."""
    positive = config.classify.positive_threshold
    models = load_models(config, weights)
    labels, probs = [], []
    for label, folder in ((1, "CT_COVID"), (0, "CT_NonCOVID")):
        for path in sorted((data / "covid-ct" / folder).iterdir()):
            probs.append(explain_slice(path, models, config)[0])
            labels.append(label)
    y, p = np.asarray(labels), np.asarray(probs)
    return {"all": auc_with_ci(y, p), f"accuracy_at_{positive:g}": float(np.mean((p >= positive) == (y == 1))),
            "covid_called_positive": float((p[y == 1] >= positive).mean()),
            "noncovid_called_positive": float((p[y == 0] >= positive).mean())}  # fmt: skip


#: What a run without ``--only`` measures (``semiseg`` only when asked: its slices overlap the textures).
SECTIONS = ("lopo", "clean", "localisation", "ucsd")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--runs", type=Path, default=Path("runs/sm"), help="folder with lopo-<patient>/ runs")
    parser.add_argument(
        "--final", type=Path, help="final weights (default: models/weights/classifier.safetensors)"
    )
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--only", action="append", choices=(*SECTIONS, "semiseg"))
    parser.add_argument("--patient", action="append", help="LOPO: only these held-out patients (repeatable)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
        help=set_option_help(),
    )  # fmt: skip
    args = parser.parse_args(argv)

    try:
        config = load_config(overrides=args.overrides).replace({"runtime.device": "cpu"})
    except ConfigError as error:
        raise SystemExit(f"--set: {error}") from None
    final = args.final or default_weights("classifier")
    args.output.mkdir(parents=True, exist_ok=True)
    path = args.output / "validation.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    sections = args.only or list(SECTIONS)
    for section in sections:
        started = time.perf_counter()
        if section == "lopo":
            scored = lopo(args.data, args.runs, config, args.output, args.patient)["patients"]
            results["lopo"] = lopo_summary(
                {**results.get("lopo", {}).get("patients", {}), **scored}, config.classify.positive_threshold
            )
        elif section == "clean":
            results["clean_ct_final"] = clean_ct(args.data, final, config)
        elif section == "localisation":
            results["localisation_fold_b"] = localisation(args.data, args.runs, config)
        elif section == "ucsd":
            results["ucsd_final"] = ucsd(args.data, final, config)
        elif section == "semiseg":
            semiseg = validate_semiseg(args.data, load_models(config, final), config)
            results["localisation_semiseg_train"] = classifier_localisation(semiseg, with_slices=False)
        logging.info("%s done in %.0f s", section, time.perf_counter() - started)
        path.write_text(json.dumps(results, indent=1, default=float) + "\n")
    summary = json.loads(json.dumps(results, default=float))
    for row in summary.get("lopo", {}).get("patients", {}).values():
        row.pop("slices", None)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":  # logging is the process's: a caller of main() keeps its own
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    main()
