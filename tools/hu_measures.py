"""Do the weights-free HU measures separate infected from clean lung? Old vs new, on real CT.

    python -m tools.hu_measures --data ../shared/data --output runs/hu-measures

Prints and writes ``hu_measures.json``:

* slice level on COVID-CT-MD (one scanner for all three diagnoses: P002 COVID-19,
  cap002 community-acquired pneumonia, normal001 normal), radiologists' per-slice
  infection labels matched by slice position: AUC of the per-slice opacity fraction
  (ground glass + consolidation, % of the lung on that slice) for infected vs clean
  slices, pooled and per patient, for the raw thresholds ("old") and the
  noise-matched, vessel- and edge-free measure of :mod:`pipeline.hu_maps` ("new");
* case level: whole-lung ``ggo_percent`` / ``consolidation_percent`` per patient, old
  and new (COVID vs normal patient);
* reference range on lungs without COVID: normal001, LIDC-IDRI-0001 / -0002 and the
  52 TCGA lung-cancer slices (per slice and per patient);
* an operating point: upper reference limit = 95th percentile of the normal lungs' slices
  (normal001, LIDC), its sensitivity and specificity on the slices of P002 and cap002;
* with ``--sensitivity``: the slice AUCs for one-at-a-time changes of each new setting.

``--set severity.field=value`` changes the configuration (written to
``hu_measures_unet_set.json``); ``--lungs classical`` uses the weights-free segmenter.

Lungs come from the shipped U-Net (``pipeline.modelset.load_models``); the masks are cached
as ``OUTPUT/masks/<name>.npz`` (about a minute per volume on a CPU) and reused.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom

# The series: CTMD_PATIENTS (COVID-19, pneumonia, normal; one Siemens scanner), LIDC_SERIES (nodules, no COVID).
from corona_ct.data.source_matched import CTMD_PATIENTS, LIDC_SERIES, ctmd_infection_labels
from corona_ct.pipeline.config import PipelineConfig, SeverityConfig, load_config
from corona_ct.pipeline.datamodel import Volume
from corona_ct.pipeline.hu_maps import hu_maps, raw_hu_fractions
from corona_ct.pipeline.ingest import load_study
from corona_ct.pipeline.ingest.slices import read_slice_image
from corona_ct.pipeline.modelset import load_models
from corona_ct.pipeline.segment import segment_lungs, slice_lung_labels
from corona_ct.pipeline.stats import roc_analysis

MIN_SLICE_LUNG_CM2 = 10.0  # slices with less lung area than this (cm², after the edge margin) are not scored

BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float64]


def _cached_labels(
    path: Path, key: str, compute: Callable[[], npt.NDArray[np.uint8]]
) -> npt.NDArray[np.uint8]:
    """Lung labels from ``path`` when it was written for the same ``key`` (weights checksum), else computed."""
    if path.is_file():
        with np.load(path) as cached:
            if str(cached["key"]) == key:
                return np.asarray(cached["labels"], dtype=np.uint8)
    labels = np.asarray(compute(), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, labels=labels, key=np.array(key))
    return labels


class Lungs:
    """Loads the series of the benchmark and their (cached) lung labels: shipped U-Net or classical."""

    def __init__(self, data: Path, cache: Path, config: PipelineConfig, kind: str = "unet") -> None:
        self.data, self.cache, self.config, self.kind = data, cache, config, kind
        self.models = load_models(config) if kind == "unet" else None
        if self.models is not None and self.models.segmenter is None:
            raise SystemExit("no U-Net weights in models/weights: use --lungs classical")
        segmenter = self.models.segmenter if self.models is not None else None
        self.key = f"unet:{segmenter.sha256}" if segmenter is not None else "classical"
        self.suffix = "" if kind == "unet" else "_classical"
        self._loaded: dict[str, tuple[Any, npt.NDArray[np.uint8]]] = {}

    def describe(self) -> str:
        return self.key

    def _segmenter(self) -> tuple[Any, int | None]:
        if self.models is None or self.models.segmenter is None:
            return None, None
        return self.models.segmenter.module, self.models.segmenter_input_size

    def volume(self, folder: Path, name: str) -> tuple[Any, npt.NDArray[np.uint8]]:
        """(Volume, lung labels) of one series folder (kept in memory for the next call)."""
        if name not in self._loaded:
            self._loaded[name] = self._load(folder, name)
        return self._loaded[name]

    def _load(self, folder: Path, name: str) -> tuple[Volume, npt.NDArray[np.uint8]]:
        volume = load_study(folder, self.config.ingest)
        module, size = self._segmenter()

        def compute() -> npt.NDArray[np.uint8]:
            start = time.perf_counter()
            mask = segment_lungs(
                volume, self.config.segment, self.config.window, model=module, input_size=size
            )
            logging.info("%s: lungs segmented in %.0f s", name, time.perf_counter() - start)
            return np.asarray(mask.labels)

        return volume, _cached_labels(self.cache / f"{name}{self.suffix}.npz", self.key, compute)

    def tcga_slices(
        self,
    ) -> list[tuple[str, str, npt.NDArray[np.float32], tuple[float, float], npt.NDArray[np.uint8]]]:
        """(patient, file, HU (y, x), pixel spacing mm, lung labels (y, x)) of every TCGA slice."""
        module, size = self._segmenter()
        out = []
        for path in sorted((self.data / "tcga-slices").glob("*/*.dcm")):
            image, units = read_slice_image(path, self.config.ingest)
            if units != "HU":
                continue
            header = pydicom.dcmread(path, stop_before_pixels=True)
            dy, dx = (float(v) for v in header.PixelSpacing)

            def compute(
                image: npt.NDArray[np.float32] = image, name: str = path.name
            ) -> npt.NDArray[np.uint8]:
                return np.asarray(
                    slice_lung_labels(image, "HU", self.config, name, model=module, input_size=size)[0]
                )

            cached = self.cache / "tcga" / f"{path.parent.name}_{path.stem}{self.suffix}.npz"
            out.append(
                (path.parent.name, path.name, image, (dy, dx), _cached_labels(cached, self.key, compute))
            )
        return out


def raw_slice_percent(hu: FloatArray, lungs: BoolArray, config: SeverityConfig) -> FloatArray:
    """Per slice (z,): the old measure, % of lung voxels with raw HU in ground glass or consolidation range."""
    ggo_lo, _ = config.ggo_hu
    _, cons_hi = config.consolidation_hu
    opaque = lungs & (hu >= ggo_lo) & (hu <= cons_hi)
    whole = lungs.sum(axis=(1, 2)).astype(np.float64)
    return np.divide(100.0 * opaque.sum(axis=(1, 2)), whole, out=np.zeros_like(whole), where=whole > 0)


def measure(
    hu: npt.ArrayLike, labels: npt.ArrayLike, spacing_mm: tuple[float, float, float], config: PipelineConfig
) -> dict[str, Any]:
    """Old and new measures of one series: whole-lung % and per-slice arrays."""
    hu = np.asarray(hu, dtype=np.float32)
    lungs = np.asarray(labels) > 0
    start = time.perf_counter()
    maps = hu_maps(hu, lungs, spacing_mm, config.severity)
    seconds = time.perf_counter() - start
    ggo_z, cons_z = maps.slice_percent()
    pixel_cm2 = spacing_mm[1] * spacing_mm[2] / 100.0
    old_ggo, old_cons = raw_hu_fractions(hu, lungs, config.severity)
    new_ggo, new_cons = maps.percent()
    return {
        "old": {"ggo_percent": old_ggo, "consolidation_percent": old_cons},
        "new": {"ggo_percent": new_ggo, "consolidation_percent": new_cons},
        "assessed_percent_of_lung": 100.0 * float(maps.assessed.sum()) / max(float(lungs.sum()), 1.0),
        "seconds": seconds,
        "aerated_level_hu": maps.aerated_level_hu,
        "ggo_floor_hu": maps.ggo_floor_hu,
        "noise_sd_hu_median": float(np.nanmedian(maps.noise_sd_hu))
        if np.isfinite(maps.noise_sd_hu).any()
        else None,
        "smoothing_mm_median": float(np.nanmedian(maps.smoothing_mm))
        if np.isfinite(maps.smoothing_mm).any()
        else None,
        # per slice, not written to JSON
        "_lung_cm2": lungs.sum(axis=(1, 2)) * pixel_cm2,
        "_old": raw_slice_percent(hu, lungs, config.severity),
        "_new": ggo_z + cons_z,
        "_new_ggo": ggo_z,
        "_new_cons": cons_z,
    }


def auc_figures(labels: npt.NDArray[np.int64], scores: FloatArray) -> dict[str, Any]:
    """AUC with its DeLong 95 % CI (None when one class is missing)."""
    out: dict[str, Any] = {"n": int(labels.size), "n_infected": int(labels.sum())}
    if 0 < labels.sum() < labels.size:
        roc = roc_analysis(labels, scores)
        out.update(auc=round(roc.auc, 3), auc_ci95=[round(roc.ci_low, 3), round(roc.ci_high, 3)])
    else:
        out.update(auc=None, auc_ci95=None)
    return out


def spread(values: FloatArray) -> dict[str, float | int | None]:
    """Median, 95th percentile and maximum of per-slice percentages."""
    if not values.size:
        return {"n": 0, "median": None, "p95": None, "max": None}
    return {
        "n": int(values.size),
        "median": round(float(np.median(values)), 2),
        "p95": round(float(np.percentile(values, 95)), 2),
        "max": round(float(values.max()), 2),
    }


def whole(result: dict[str, Any]) -> dict[str, Any]:
    """The JSON-ready part of :func:`measure` (rounded)."""
    out: dict[str, Any] = {}
    for key, value in result.items():
        if key.startswith("_"):
            continue
        if isinstance(value, dict):
            out[key] = {k: round(v, 2) for k, v in value.items()}
            out[key]["opacity_percent"] = round(sum(value.values()), 2)
        else:
            out[key] = round(value, 2) if isinstance(value, float) else value
    return out


def run(lungs: Lungs, config: PipelineConfig) -> dict[str, Any]:
    """Every figure of the benchmark for one configuration."""
    data = lungs.data
    figures: dict[str, Any] = {
        "config": config.to_dict()["severity"],
        "lungs": lungs.describe(),
        "min_slice_lung_cm2": MIN_SLICE_LUNG_CM2,
    }

    # --- COVID-CT-MD: slice labels, one scanner ---
    pooled: dict[str, list[FloatArray]] = {"old": [], "new": [], "new_ggo": [], "new_cons": [], "y": []}
    ctmd: dict[str, Any] = {}
    ctmd_slices: dict[str, dict[str, npt.NDArray[Any]]] = {}
    for patient in CTMD_PATIENTS:
        volume, labels = lungs.volume(data / "covid-ct-md" / patient, patient)
        infected = ctmd_infection_labels(volume, data / "covid-ct-md" / "slice_labels.csv", patient)
        result = measure(volume.hu, labels, volume.geometry.spacing_mm, config)
        scored = result["_lung_cm2"] >= MIN_SLICE_LUNG_CM2
        y = infected[scored]
        entry = whole(result)
        entry["slices"] = {
            "total": int(volume.n_slices),
            "scored": int(scored.sum()),
            "infected_scored": int(y.sum()),
            "infected_not_scored": int(infected[~scored].sum()),
        }
        for name in ("old", "new", "new_ggo", "new_cons"):
            values = result[f"_{name}"][scored]
            pooled[name].append(values)
            entry[f"slice_{name}"] = {
                "auc": auc_figures(y, values),
                "clean": spread(values[y == 0]),
                "infected": spread(values[y == 1]),
            }
        pooled["y"].append(y)
        ctmd[patient] = entry
        ctmd_slices[patient] = {"old": result["_old"][scored], "new": result["_new"][scored], "y": y}
        logging.info("%s done (measures %.1f s)", patient, result["seconds"])
    y_all = np.concatenate(pooled["y"]).astype(np.int64)
    ctmd["pooled"] = {
        name: {
            "auc": auc_figures(y_all, np.concatenate(pooled[name])),
            "clean": spread(np.concatenate(pooled[name])[y_all == 0]),
            "infected": spread(np.concatenate(pooled[name])[y_all == 1]),
        }
        for name in ("old", "new", "new_ggo", "new_cons")
    }
    figures["covid_ct_md"] = ctmd

    # --- reference range: lungs without COVID from other scanners ---
    reference: dict[str, Any] = {}
    ref_old, ref_new = [], []
    lidc_slices: dict[str, dict[str, FloatArray]] = {}
    for study in LIDC_SERIES:
        volume, labels = lungs.volume(data / "dicom" / study, study)
        result = measure(volume.hu, labels, volume.geometry.spacing_mm, config)
        scored = result["_lung_cm2"] >= MIN_SLICE_LUNG_CM2
        entry = whole(result)
        entry["slice_old"], entry["slice_new"] = (
            spread(result["_old"][scored]),
            spread(result["_new"][scored]),
        )
        ref_old.append(result["_old"][scored])
        ref_new.append(result["_new"][scored])
        reference[study] = entry
        lidc_slices[study] = {"old": result["_old"][scored], "new": result["_new"][scored]}
    tcga_rows = []
    for patient, name, image, (dy, dx), slice_labels in lungs.tcga_slices():
        result = measure(image[None], slice_labels[None], (1.0, dy, dx), config)
        if result["_lung_cm2"][0] < MIN_SLICE_LUNG_CM2:
            continue
        tcga_rows.append((patient, name, float(result["_old"][0]), float(result["_new"][0])))
    tcga_old = np.array([r[2] for r in tcga_rows])
    tcga_new = np.array([r[3] for r in tcga_rows])
    patients = sorted({r[0] for r in tcga_rows})
    per_patient_new = np.array([np.mean([r[3] for r in tcga_rows if r[0] == p]) for p in patients])
    per_patient_old = np.array([np.mean([r[2] for r in tcga_rows if r[0] == p]) for p in patients])
    reference["tcga"] = {
        "slices_with_lungs": len(tcga_rows),
        "patients": len(patients),
        "slice_old": spread(tcga_old),
        "slice_new": spread(tcga_new),
        "patient_old": spread(per_patient_old),
        "patient_new": spread(per_patient_new),
    }
    ref_old.append(tcga_old)
    ref_new.append(tcga_new)
    other_old, other_new = np.concatenate(ref_old), np.concatenate(ref_new)
    reference["other_scanners_slices"] = {"old": spread(other_old), "new": spread(other_new)}
    figures["reference"] = reference

    # --- operating point: upper reference limit = p95 of the normal lungs' slices (normal001, LIDC),
    # applied to the slices of the two patients with pneumonia (P002, cap002) ---
    operating: dict[str, Any] = {}
    for name in ("old", "new"):
        normal = np.concatenate(
            [ctmd_slices["normal001"][name], *(lidc_slices[s][name] for s in LIDC_SERIES)]
        )
        limit = float(np.percentile(normal, 95))
        values = np.concatenate([ctmd_slices[p][name] for p in ("P002", "cap002")])
        y = np.concatenate([ctmd_slices[p]["y"] for p in ("P002", "cap002")])
        operating[name] = {
            "upper_reference_limit_percent": round(limit, 2),
            "sensitivity": round(float((values[y == 1] > limit).mean()), 3),
            "specificity": round(float((values[y == 0] <= limit).mean()), 3),
        }
    figures["operating_point"] = operating
    return figures


def _fmt(value: Any) -> str:
    return (
        "—" if value is None else f"{value:.3f}" if isinstance(value, float) and value <= 1.0 else str(value)
    )


#: One-at-a-time changes of the new measure's settings for ``--sensitivity`` (field, values).
SENSITIVITY = (
    ("ggo_contrast_hu", (0.0, 250.0)),
    ("edge_margin_mm", (1.0, 5.0)),
    ("edge_margin_slices", (0, 2)),
    ("vessel_hu", (-400.0, -200.0)),
    ("vessel_smoothing_mm", (0.35, 1.4)),
    ("vessel_width_mm", (3.5, 8.0)),
    ("vessel_contrast_hu", (0.0, 200.0)),
    ("vessel_margin_mm", (0.5, 3.0)),
    ("consolidation_reach_mm", (0.0, 20.0)),
    ("noise_target_hu", (20.0, 45.0)),
    ("max_smoothing_mm", (0.0, 5.0)),
)


def sensitivity(lungs: Lungs, config: PipelineConfig) -> list[dict[str, Any]]:
    """Slice AUCs of the new measure on COVID-CT-MD (pooled, P002, cap002) for each one-at-a-time change."""
    cases = []
    for patient in CTMD_PATIENTS:
        volume, labels = lungs.volume(lungs.data / "covid-ct-md" / patient, patient)
        infected = ctmd_infection_labels(volume, lungs.data / "covid-ct-md" / "slice_labels.csv", patient)
        cases.append((patient, volume, labels, infected))
    rows = []
    variants = [("default", None)] + [(field, value) for field, values in SENSITIVITY for value in values]
    for field, value in variants:
        changed = config if value is None else config.replace({f"severity.{field}": value})
        scores, ys, row = [], [], {"field": field, "value": value}
        for patient, volume, labels, infected in cases:
            result = measure(volume.hu, labels, volume.geometry.spacing_mm, changed)
            scored = result["_lung_cm2"] >= MIN_SLICE_LUNG_CM2
            scores.append(result["_new"][scored])
            ys.append(infected[scored])
            if patient != "normal001":
                row[patient] = auc_figures(infected[scored], result["_new"][scored])["auc"]
            else:
                new = result["new"]
                row["normal001_opacity_percent"] = round(new["ggo_percent"] + new["consolidation_percent"], 2)
        row["pooled"] = auc_figures(np.concatenate(ys).astype(np.int64), np.concatenate(scores))["auc"]
        logging.info("sensitivity %s", row)
        rows.append(row)
    return rows


def sensitivity_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`sensitivity`."""
    lines = [
        "| change | pooled slice AUC | P002 | cap002 | normal001 opacity % |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        name = "defaults" if row["value"] is None else f"{row['field']} = {row['value']}"
        lines.append(
            f"| {name} | {row['pooled']:.3f} | {row['P002']:.3f} | {row['cap002']:.3f} | "
            f"{row['normal001_opacity_percent']:.2f} |"
        )
    return "\n".join(lines)


def summary_table(figures: dict[str, Any]) -> str:
    """Markdown tables of the figures (the ones docs/validation.md quotes)."""
    ctmd = figures["covid_ct_md"]
    lines = [
        "| COVID-CT-MD slices (U-Net lungs) | n (infected) | old AUC (95 % CI) | new AUC (95 % CI) | new GGO only | new consolidation only |",
        "|---|---|---|---|---|---|",
    ]
    for name in (*CTMD_PATIENTS, "pooled"):
        entry = ctmd[name]
        get = (
            (lambda m, e=entry: e[m]["auc"])
            if name == "pooled"
            else (lambda m, e=entry: e[f"slice_{m}"]["auc"])
        )
        old, new, ggo, cons = get("old"), get("new"), get("new_ggo"), get("new_cons")

        def cell(a: dict[str, Any]) -> str:
            return (
                "—" if a["auc"] is None else f"{a['auc']:.3f} ({a['auc_ci95'][0]:.3f}–{a['auc_ci95'][1]:.3f})"
            )

        def short(a: dict[str, Any]) -> str:
            return "—" if a["auc"] is None else f"{a['auc']:.3f}"

        lines.append(
            f"| {name} | {old['n']} ({old['n_infected']}) | {cell(old)} | {cell(new)} | {short(ggo)} | {short(cons)} |"
        )
    lines += [
        "",
        "| whole lungs | old GGO % | old consolidation % | new GGO % | new consolidation % | new opacity % |",
        "|---|---|---|---|---|---|",
    ]
    rows = [(p, ctmd[p]) for p in CTMD_PATIENTS] + [(s, figures["reference"][s]) for s in LIDC_SERIES]
    for name, entry in rows:
        o, n = entry["old"], entry["new"]
        lines.append(
            f"| {name} | {o['ggo_percent']:.1f} | {o['consolidation_percent']:.1f} | {n['ggo_percent']:.1f} | "
            f"{n['consolidation_percent']:.1f} | {n['opacity_percent']:.1f} |"
        )
    lines += [
        "",
        "| per-slice opacity % (GGO + consolidation) | old median / p95 / max | new median / p95 / max |",
        "|---|---|---|",
    ]

    def trio(s: dict[str, Any]) -> str:
        return "—" if s["median"] is None else f"{s['median']:.1f} / {s['p95']:.1f} / {s['max']:.1f}"

    for name in CTMD_PATIENTS:
        for state in ("clean", "infected"):
            if ctmd[name]["slice_old"][state]["n"]:
                lines.append(
                    f"| {name}, {state} slices ({ctmd[name]['slice_old'][state]['n']}) | "
                    f"{trio(ctmd[name]['slice_old'][state])} | {trio(ctmd[name]['slice_new'][state])} |"
                )
    ref = figures["reference"]
    for study in LIDC_SERIES:
        lines.append(
            f"| {study} ({ref[study]['slice_old']['n']} slices) | {trio(ref[study]['slice_old'])} | {trio(ref[study]['slice_new'])} |"
        )
    tcga = ref["tcga"]
    lines.append(
        f"| TCGA lung cancer ({tcga['slices_with_lungs']} slices, {tcga['patients']} patients) | "
        f"{trio(tcga['slice_old'])} | {trio(tcga['slice_new'])} |"
    )
    op = figures["operating_point"]
    lines += [
        "",
        "| P002 + cap002 slices above the upper reference limit (p95 of normal001 + LIDC slices) | limit % "
        "| sensitivity | specificity |",
        "|---|---|---|---|",
    ]
    for name in ("old", "new"):
        o = op[name]
        lines.append(
            f"| {name} | {o['upper_reference_limit_percent']:.1f} | {o['sensitivity']:.3f} | {o['specificity']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--output", type=Path, default=Path("runs/hu-measures"))
    parser.add_argument(
        "--lungs", choices=("unet", "classical"), default="unet", help="lung masks (default: shipped U-Net)"
    )
    parser.add_argument(
        "--sensitivity", action="store_true", help="also one-at-a-time changes of the settings (~15 min more)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="section.field=value", help="config override"
    )
    args = parser.parse_args(argv)

    config = load_config(None, args.set)
    start = time.perf_counter()
    lungs = Lungs(args.data, args.output / "masks", config, args.lungs)
    figures = run(lungs, config)
    if args.sensitivity:
        figures["sensitivity"] = sensitivity(lungs, config)
    figures["seconds"] = round(time.perf_counter() - start, 1)
    args.output.mkdir(parents=True, exist_ok=True)
    name = (
        "hu_measures.json"
        if args.lungs == "unet" and not args.set
        else f"hu_measures_{args.lungs}{'_set' if args.set else ''}.json"
    )
    (args.output / name).write_text(json.dumps(figures, indent=2) + "\n")
    print(summary_table(figures))
    if args.sensitivity:
        print()
        print(sensitivity_table(figures["sensitivity"]))
    print(f"\nwritten {args.output / name} ({figures['seconds']:.0f} s)")


if __name__ == "__main__":  # logging is the process's: a caller of main() keeps its own
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("pydicom").setLevel(logging.ERROR)  # non-conformant UIDs of COVID-CT-MD, once per file
    main()
