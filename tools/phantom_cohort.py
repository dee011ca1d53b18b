"""Phantom cohort: does the pipeline measure what was put in?

    python -m tools.phantom_cohort --output runs/phantom-cohort [--n 20] [--cls-weights W]

Writes N seeded phantom studies as DICOM (a quarter without lesions, the rest with
ground-glass and consolidation lesions from 10 to 300 cm³), runs the pipeline on
them, and prints the Pearson correlation of each severity measure with the true
lesion volume and the case-level AUC (lesion vs none). Also writes ``labels.csv``
and ``severity.csv`` beside the results for `corona-ct analyze`.
Without classifier weights (``--allow-untrained``) only the weights-free HU
measures are meaningful.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
from scipy.stats import pearsonr

from corona_ct.data.phantom import make_phantom
from corona_ct.data.writers import write_dicom_series
from corona_ct.pipeline.batch import run_batch
from corona_ct.pipeline.commands.options import set_option_help
from corona_ct.pipeline.config import load_config
from corona_ct.pipeline.errors import ConfigError
from corona_ct.pipeline.modelset import load_models
from corona_ct.pipeline.stats import roc_auc


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--n", type=int, default=20, help="number of phantom studies")
    parser.add_argument("--max-ml", type=float, default=300.0, help="largest total lesion volume (cm³)")
    parser.add_argument("--cls-weights", type=Path)
    parser.add_argument("--allow-untrained", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--resume", action="store_true", help="reuse finished studies")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
        help=set_option_help(),
    )  # fmt: skip
    args = parser.parse_args(argv)

    n_normal = max(1, args.n // 4)
    volumes_ml = np.concatenate([np.zeros(n_normal), np.linspace(10.0, args.max_ml, args.n - n_normal)])
    inputs = args.output / "inputs"
    truth: dict[str, float] = {}
    for index, lesion_ml in enumerate(volumes_ml):
        name = f"phantom-{index:03d}"
        folder = inputs / name
        lesions = "none" if lesion_ml == 0 else "mixed"
        phantom = make_phantom(seed=100 + index, lesions=lesions, lesion_volume_ml=lesion_ml or None)
        truth[name] = phantom.lesion_volume_ml
        if not folder.is_dir():
            write_dicom_series(
                phantom, folder, patient_name=f"Anonymous^{index}", patient_id=f"COHORT-{index}"
            )

    try:
        config = load_config(overrides=args.overrides).replace({"runtime.device": args.device})
    except ConfigError as error:
        raise SystemExit(f"--set: {error}") from None
    models = load_models(config, args.cls_weights, allow_untrained=args.allow_untrained)
    results = args.output / "results"
    run_batch(
        sorted(inputs.iterdir()), results, config, models, resume=args.resume, overwrite=not args.resume
    )

    with (results / "summary.csv").open() as handle:
        rows = {row["study_id"]: row for row in csv.DictReader(handle) if row["status"] == "ok"}
    names = sorted(set(rows) & set(truth))
    true_ml = np.array([truth[n] for n in names])
    label = (true_ml > 0).astype(int)
    _write_csv(args.output / "labels.csv", ["study_id", "label"], [(n, int(truth[n] > 0)) for n in names])
    _write_csv(
        args.output / "severity.csv",
        ["study_id", "group"],
        [(n, "severe" if truth[n] >= args.max_ml / 2 else "non-severe") for n in names],
    )

    def column(name: str) -> np.ndarray:
        return np.array([float(rows[n][name] or "nan") for n in names])

    lung_ml = column("lung_volume_cm3")
    measures = {
        "corona_score_cm3": column("corona_score_cm3"),
        "corona_score_in_lung_cm3": column("corona_score_in_lung_cm3"),
        "case_probability": column("case_probability"),
        "opacity_cm3 (HU, GGO+consolidation)": (column("ggo_percent") + column("consolidation_percent"))
        / 100
        * lung_ml,
        "ggo_percent": column("ggo_percent"),
    }
    print(
        f"\n{len(names)} phantom studies ({int(label.sum())} with lesions, {int((label == 0).sum())} without)"
    )
    print(f"weights: {'UNTRAINED (random)' if models.untrained else models.describe()['classifier']}")
    print(f"{'measure':<38} {'Pearson r vs true lesion cm3':>28} {'AUC lesion vs none':>19}")
    figures: dict[str, object] = {
        "n_studies": len(names), "n_with_lesions": int(label.sum()),
        "true_lesion_cm3_range": [float(true_ml.min()), float(true_ml.max())],
        "untrained_weights": models.untrained,
    }  # fmt: skip
    for name, values in measures.items():
        ok = np.isfinite(values)
        r = pearsonr(values[ok], true_ml[ok])[0] if np.ptp(values[ok]) > 0 else float("nan")
        auc = roc_auc(label[ok], values[ok]) if len(set(label[ok])) == 2 else float("nan")
        print(f"{name:<38} {r:>28.3f} {auc:>19.3f}")
        # JSON has no NaN: an undefined r (a constant measure) is null.
        figures[name] = {
            key: float(v) if np.isfinite(v) else None for key, v in (("pearson_r", r), ("auc", auc))
        }
    # the case call a report makes (case probability at the slice threshold), per group
    threshold = config.classify.positive_threshold
    called = case_called_positive(measures["case_probability"], label, threshold)
    figures["case_called_positive"] = {"threshold": threshold, **called}
    with_lesions, without = (f"{100 * v:.0f} %" if v is not None else "-" for v in called.values())
    print(
        f"case called positive (p ≥ {threshold:g}): {with_lesions} of phantoms with lesions, {without} of those without"
    )
    (args.output / "metrics.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(f"true lesion volumes: {true_ml.min():.1f}–{true_ml.max():.1f} cm³; outputs in {results}")


def case_called_positive(
    probability: np.ndarray, has_lesions: np.ndarray, threshold: float
) -> dict[str, float | None]:
    """Share of the studies with and without lesions whose case probability is at least ``threshold``
    (the call a report makes); None for a group with no study."""
    return {
        group: float(np.mean(probability[mask] >= threshold)) if mask.any() else None
        for group, mask in (("with_lesions", has_lesions == 1), ("without_lesions", has_lesions == 0))
    }


def _write_csv(path: Path, header: list[str], rows: list[tuple[object, ...]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


if __name__ == "__main__":
    main()
