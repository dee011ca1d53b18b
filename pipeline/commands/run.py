"""``run``, ``explain`` and ``demo``: the pipeline's main jobs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def _common(parser: argparse.ArgumentParser, *, weights: bool = True) -> None:
    parser.add_argument("--output", "-o", type=Path, required=True, help="output folder (created)")
    parser.add_argument("--config", type=Path, help="JSON config file (see docs/usage.md)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one config value, e.g. --set cam.activation_threshold=0.5 (repeatable)",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="compute device (default: auto)")
    if weights:
        parser.add_argument(
            "--cls-weights", type=Path, help="classifier checkpoint (.safetensors with .json card)"
        )
        parser.add_argument("--seg-weights", type=Path, help="U-Net lung segmenter checkpoint (.safetensors)")
        parser.add_argument(
            "--allow-untrained",
            action="store_true",
            help="run without classifier weights (random weights; every report says so)",
        )


def register(subparsers: Any) -> None:
    run = subparsers.add_parser(
        "run",
        help="analyse every CT study found under the inputs; write reports and summary.csv",
        description="Detect, localise and quantify COVID-19 pneumonia in every study under INPUT.",
    )
    run.add_argument(
        "inputs", nargs="+", type=Path, metavar="INPUT", help="study folder, folder of studies, NIfTI"
    )
    _common(run)
    run.add_argument("--resume", action="store_true", help="skip studies already complete for this config")
    series = run.add_mutually_exclusive_group()
    series.add_argument("--series", metavar="UID", help="analyse this series (full or unique short UID)")
    series.add_argument(
        "--all-series", action="store_true", help="analyse every usable series of each study, one row each"
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.set_defaults(handler=_run)

    explain = subparsers.add_parser(
        "explain",
        help="classify single 2D slices (files or folders of them) and write their fused Grad-CAM maps",
        description=(
            "Slice probability and fused multi-scale Grad-CAM for PNG/JPEG/BMP/TIFF/DICOM slices. A folder "
            "stands for every slice image below it (recursively, sorted); a folder of masks is refused."
        ),
    )
    explain.add_argument("images", nargs="+", metavar="IMAGE", help="slice image file or folder of them")
    _common(explain)
    explain.add_argument(
        "--roi",
        choices=("lung", "none"),
        default="lung",
        help="crop to the slice's lung box like the pipeline (default) or use the whole image",
    )
    explain.set_defaults(handler=_explain)

    demo = subparsers.add_parser(
        "demo",
        help="write two phantom CT studies as DICOM and run the whole pipeline on them",
    )
    demo.add_argument("--output", "-o", type=Path, default=Path("demo_out"), help="output folder")
    demo.add_argument("--device", choices=("auto", "cpu", "cuda"))
    demo.add_argument("--cls-weights", type=Path, help="classifier checkpoint to use instead of the default")
    demo.set_defaults(handler=_demo)


def _config(args: argparse.Namespace) -> Any:
    from corona_ct.pipeline.config import load_config

    overrides = list(getattr(args, "overrides", []))
    if getattr(args, "device", None):
        overrides.append(f"runtime.device={args.device}")
    return load_config(getattr(args, "config", None), overrides)


def _print_rows(rows: list[dict[str, object]]) -> None:
    """One line per study; not-assessable studies are listed again below with their reasons."""
    from corona_ct.pipeline.run import STATUS_NOT_ASSESSABLE

    header = (
        f"{'study_id':<24} {'status':<14} {'slices':>6} {'p(case)':>8} {'score cm3':>10} {'lung cm3':>9}  "
        "error / reason"
    )
    print(header)
    ordered = sorted(rows, key=lambda r: str(r["study_id"]))
    for row in ordered:
        print(
            f"{row['study_id']!s:<24} {row['status']!s:<14} {row['slices_evaluated']!s:>6} "
            f"{row['case_probability']!s:>8} {row['corona_score_cm3']!s:>10} {row['lung_volume_cm3']!s:>9}  "
            f"{row['error'] or row.get('reason', '')}"
        )
    not_assessable = [row for row in ordered if row["status"] == STATUS_NOT_ASSESSABLE]
    if not_assessable:
        print("NOT ASSESSABLE (no COVID-19 call was made; is the lung in view?):")
        for row in not_assessable:
            print(f"  {row['study_id']}: {row.get('reason', '')}")


def _run(args: argparse.Namespace) -> int:
    from corona_ct.pipeline.ingest import refuse_slice_sets
    from corona_ct.pipeline.run import load_models, run_batch

    config = _config(args)
    refuse_slice_sets(args.inputs, config.ingest)  # a slice set is for explain: say so before loading models
    models = load_models(config, args.cls_weights, args.seg_weights, allow_untrained=args.allow_untrained)
    if models.untrained:
        print(
            "WARNING: running with UNTRAINED classifier weights; the numbers are meaningless.",
            file=sys.stderr,
        )
    outcome = run_batch(
        args.inputs,
        args.output,
        config,
        models,
        resume=args.resume,
        series_uid=args.series,
        all_series=args.all_series,
        show_progress=False if args.no_progress else None,
    )
    _print_rows(outcome.rows)
    not_assessable = len(outcome.not_assessable)
    done = len(outcome.rows) - len(outcome.failures) - not_assessable
    print(
        f"{done} ok, {len(outcome.failures)} failed, {not_assessable} not assessable, "
        f"{len(outcome.skipped)} resumed; summary: {args.output / 'summary.csv'}"
    )
    return outcome.exit_code  # not-assessable studies are answers, not failures: exit 0


def _explain(args: argparse.Namespace) -> int:
    from corona_ct.pipeline.ingest import collect_slice_images
    from corona_ct.pipeline.run import explain_images, load_models

    config = _config(args)
    images = collect_slice_images(args.images)  # folders expanded, mask folders refused, before any model
    models = load_models(config, args.cls_weights, args.seg_weights, allow_untrained=args.allow_untrained)
    rows, failures = explain_images(images, args.output, config, models, roi=args.roi)
    for row in rows:
        print(f"{row['input']}: p = {row['probability']} (roi: {row['roi']})")
    for failure in failures:
        print(f"failed: {failure}", file=sys.stderr)
    print(f"{len(rows)} explained, {len(failures)} failed; {args.output / 'predictions.csv'}")
    return 1 if failures else 0


def _demo(args: argparse.Namespace) -> int:
    from corona_ct.pipeline.run import run_demo

    config = _config(args)
    return run_demo(args.output, config, cls_weights=args.cls_weights)
