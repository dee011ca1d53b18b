"""``run``, ``explain`` and ``demo``: the pipeline's main jobs."""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corona_ct.pipeline.commands.options import add_compute_options, apply_compute_options, set_option_help

if TYPE_CHECKING:
    from corona_ct.pipeline.config import PipelineConfig


def _common(parser: argparse.ArgumentParser, *, weights: bool = True) -> None:
    add_compute_options(parser, "output folder (created)")
    parser.add_argument("--config", type=Path, help="JSON config file (see docs/usage.md)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help=set_option_help(),
    )
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
        epilog="An output folder that holds results of an earlier run (summary.csv, finished study folders) "
        "is refused (exit 2) unless you pass --resume (keep them: finished studies whose checksums, config, "
        "model weights and input still match are reused; summary.csv rows are merged by study id) or "
        "--overwrite (recompute; summary.csv is replaced by this run's studies once the batch has finished). "
        "One run at a time per output folder: a second one stops and names the pid holding OUT/.corona-ct.lock.",
    )
    run.add_argument(
        "inputs", nargs="+", type=Path, metavar="INPUT", help="study folder, folder of studies, NIfTI"
    )
    _common(run)
    earlier = run.add_mutually_exclusive_group()
    earlier.add_argument(
        "--resume",
        action="store_true",
        help="continue in an output folder with earlier results: reuse every study whose completion record "
        "(output checksums, config, model weights, input) still matches, recompute the others, keep earlier "
        "summary.csv rows (merged by study id)",
    )
    earlier.add_argument(
        "--overwrite",
        action="store_true",
        help="recompute every study into an output folder with earlier results; summary.csv then lists this "
        "run's studies only (the previous one stays until this batch has finished)",
    )
    run.add_argument(
        "--study-id",
        dest="study_naming",
        choices=("deidentified", "folder"),
        default="deidentified",
        help="deidentified (default): the folder or file name when it holds no patient name, id, birth date or "
        "accession number, else a hash; folder: the folder (or NIfTI) name as given. Two different inputs "
        "with one name get name, name-2, ...",
    )
    run.add_argument(
        "--ids-file",
        type=Path,
        metavar="FILE",
        help="write study_id,input,name,kind as CSV to FILE (kept up to date across runs) so that labels can be "
        "joined; it links ids to input paths, so keep it private: it is refused inside --output",
    )
    run.add_argument(
        "--ids-file-in-output",
        action="store_true",
        help="allow --ids-file inside the output folder (then the output folder links ids to paths)",
    )
    series = run.add_mutually_exclusive_group()
    series.add_argument("--series", metavar="UID", help="analyse this series (full or unique short UID)")
    series.add_argument(
        "--all-series", action="store_true", help="analyse every usable series of each study, one row each"
    )
    run.add_argument(
        "--dicom-out",
        action="store_true",
        help="also write per study a DICOM SEG (lungs, Corona score opacity) and a DICOM SR (TID 1500 measurements) "
        "referencing the source series; DICOM inputs only (needs the extra corona-ct[dicom-out]); the patient and "
        "study modules of the source are copied into them",
    )
    cluster = run.add_argument_group("batch on a Ray cluster (needs the extra corona-ct[ray])")
    cluster.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="spread the studies over Ray workers, each loading the models once; without ADDRESS a local cluster "
        "is started for this run, with one (from `ray start --head`, or auto) that cluster is joined. Every node "
        "must see the inputs and the output folder at the same paths. A study that fails or whose worker dies "
        "is retried once; summary.csv, --resume and atomic writes work as in a local run",
    )
    cluster.add_argument(
        "--ray-workers", type=int, metavar="N", help="number of Ray workers (default: the cluster's CPUs)"
    )
    cluster.add_argument(
        "--ray-cpus-per-worker",
        type=float,
        default=1.0,
        metavar="N",
        help="CPUs (and torch threads) per Ray worker (default 1)",
    )
    cluster.add_argument(
        "--ray-gpus-per-worker",
        type=float,
        default=0.0,
        metavar="N",
        help="GPUs per Ray worker on a GPU cluster (1, or 0.5 to share one; default 0)",
    )
    run.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars: one log line per study instead (the default without a terminal)",
    )
    run.set_defaults(handler=_run)

    explain = subparsers.add_parser(
        "explain",
        help="classify single 2D slices (files or folders of them) and write their fused Grad-CAM maps",
        description=(
            "Slice probability and fused multi-scale Grad-CAM for PNG/JPEG/BMP/TIFF/DICOM slices. A folder "
            "stands for every slice image below it (recursively, sorted); a folder of masks is refused."
        ),
    )
    explain.add_argument(
        "images",
        nargs="+",  # no type=Path: each path is kept as given (./a/1.png stays ./a/1.png in predictions.csv)
        metavar="IMAGE",
        help="slice image file (PNG, JPEG, BMP, TIFF, DICOM) or folder of them",
    )
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
    add_compute_options(demo, "output folder", output_default=Path("demo_out"))
    demo.add_argument("--cls-weights", type=Path, help="classifier checkpoint to use instead of the default")
    demo.set_defaults(handler=_demo)


def _config(args: argparse.Namespace) -> Any:
    """The pipeline config of ``--config`` and ``--set``, its ranges checked; a GPU asked for is checked too.

    Settings come first so that a wrong one is named before anything else. Only a GPU device
    needs torch to be checked; threads are limited (``apply_compute_options``) after the quick input checks.
    """
    from corona_ct.pipeline.config import load_config

    overrides = list(getattr(args, "overrides", []))
    if getattr(args, "device", None):
        overrides.append(f"runtime.device={args.device}")
    config = load_config(getattr(args, "config", None), overrides)
    if config.runtime.device not in ("auto", "cpu"):
        from corona_ct.pipeline.device import resolve_device

        resolve_device(config.runtime.device)  # torch loads here: a GPU was asked for
    return config


def _print_rows(rows: list[dict[str, object]]) -> None:
    """One line per study; not-assessable studies are listed again below with their reasons."""
    from corona_ct.pipeline.datamodel import STATUS_NOT_ASSESSABLE

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
    from corona_ct.pipeline import preflight

    config = _config(args)
    preflight.check_volume_inputs(args.inputs)
    preflight.check_output_folder(args.output)
    from corona_ct.pipeline.ingest import refuse_slice_sets

    refuse_slice_sets(args.inputs, config.ingest)  # a slice set is for explain: say so before loading models
    apply_compute_options(args)  # threads and device (loads torch): after the quick checks
    ray_options = _ray_options(args)
    # torch loads with these: after the quick checks
    from corona_ct.pipeline.batch import run_batch
    from corona_ct.pipeline.modelset import load_models
    from corona_ct.pipeline.output_folder import check_ids_file, check_output, output_lock

    if args.ids_file is not None:
        check_ids_file(args.ids_file, args.output, inside_output_ok=args.ids_file_in_output)
    with output_lock(args.output):  # before the models load, so that a busy or used folder is named at once
        check_output(args.output, resume=args.resume, overwrite=args.overwrite)
        models = load_models(config, args.cls_weights, args.seg_weights, allow_untrained=args.allow_untrained)
        preflight.prepare_output_folder(args.output, "run")
        if models.untrained:
            print(
                "WARNING: running with UNTRAINED classifier weights; the numbers are meaningless.",
                file=sys.stderr,
            )
        if args.ids_file is not None:
            print(
                f"WARNING: {args.ids_file} links study ids to input paths (which may name patients); keep it "
                "with your private records and do not share it with the outputs.",
                file=sys.stderr,
            )
        outcome = run_batch(
            args.inputs,
            args.output,
            config,
            models,
            resume=args.resume,
            overwrite=args.overwrite,
            series_uid=args.series,
            all_series=args.all_series,
            show_progress=False if args.no_progress else None,
            study_naming=args.study_naming,
            ids_file=args.ids_file,
            ids_file_in_output=args.ids_file_in_output,
            dicom_out=args.dicom_out,
            ray=ray_options,
        )
    _print_rows(outcome.rows)
    not_assessable = len(outcome.not_assessable)
    done = len(outcome.rows) - len(outcome.failures) - not_assessable
    kept = f", {len(outcome.kept)} earlier rows kept" if outcome.kept else ""
    print(
        f"{done} ok, {len(outcome.failures)} failed, {not_assessable} not assessable, "
        f"{len(outcome.skipped)} resumed{kept}; summary: {args.output / 'summary.csv'}"
    )
    return outcome.exit_code  # not-assessable studies are answers, not failures: exit 0


def _ray_options(args: argparse.Namespace) -> Any:
    """The --ray options, checked before any model loads; None without --ray."""
    from corona_ct.pipeline.errors import ConfigError
    from corona_ct.pipeline.ray_batch import INSTALL_HINT, RayOptions

    if args.ray is None:
        if args.ray_workers is not None:
            raise ConfigError("--ray-workers needs --ray")
        return None
    if importlib.util.find_spec("ray") is None:
        raise ConfigError(f"--ray: Ray is not installed. {INSTALL_HINT}")
    return RayOptions(
        address=None if args.ray == "local" else args.ray,  # as in ray.init: "local" starts a new cluster
        workers=args.ray_workers,
        cpus_per_worker=args.ray_cpus_per_worker,
        gpus_per_worker=args.ray_gpus_per_worker,
    )


def _explain(args: argparse.Namespace) -> int:
    from corona_ct.pipeline import preflight
    from corona_ct.pipeline.ingest import collect_slice_images

    config = _config(args)
    preflight.check_image_inputs(args.images)
    preflight.check_output_folder(args.output)
    images = collect_slice_images(args.images)  # folders expanded, mask folders refused, before any model
    apply_compute_options(args)  # threads and device (loads torch): after the quick checks
    from corona_ct.pipeline.modelset import load_models  # torch: after the quick checks
    from corona_ct.pipeline.single_slice import explain_images

    models = load_models(config, args.cls_weights, args.seg_weights, allow_untrained=args.allow_untrained)
    preflight.prepare_output_folder(args.output, "explain")
    rows, failures = explain_images(images, args.output, config, models, roi=args.roi)
    for row in rows:
        print(f"{row['input']}: p = {row['probability']} (roi: {row['roi']})")
    for failure in failures:
        print(f"failed: {failure}", file=sys.stderr)
    print(f"{len(rows)} explained, {len(failures)} failed; {args.output / 'predictions.csv'}")
    return 1 if failures else 0


def _demo(args: argparse.Namespace) -> int:
    from corona_ct.pipeline import preflight

    config = _config(args)
    preflight.check_output_folder(args.output)
    apply_compute_options(args)  # threads and device (loads torch): after the quick checks
    return run_demo(args.output, config, cls_weights=args.cls_weights)


def _num(value: object, digits: int) -> str:
    """A summary cell as a fixed-precision number ("—" when empty)."""
    try:
        return f"{float(str(value)):.{digits}f}"
    except ValueError:
        return "—"


def run_demo(output: Path, config: PipelineConfig, *, cls_weights: Path | None = None) -> int:
    """Write two phantom studies (with and without lesions) as DICOM and run the pipeline on them."""
    # torch loads with these: after the quick checks
    from corona_ct.data.phantom import make_phantom
    from corona_ct.data.writers import write_dicom_series
    from corona_ct.pipeline.batch import run_batch
    from corona_ct.pipeline.layout import SUMMARY_NAME
    from corona_ct.pipeline.modelset import load_models

    inputs = output / "inputs"
    phantoms = {
        "phantom-lesions": make_phantom(seed=1, lesions="mixed"),
        "phantom-normal": make_phantom(seed=2, lesions="none"),
    }
    for number, (name, phantom) in enumerate(phantoms.items(), start=1):
        # patient strings that the folder names do not contain, so the ids stay readable
        write_dicom_series(
            phantom, inputs / name, patient_name=f"Anonymous^{number}", patient_id=f"DEMO-{number}"
        )
    print(f"wrote {len(phantoms)} phantom DICOM studies under {inputs}")
    models = load_models(config, cls_weights, allow_untrained=True)
    if models.untrained:
        print(
            "NOTE: no trained classifier weights are installed (models/weights/ is empty), so the demo runs with "
            "UNTRAINED random weights: probabilities and Corona scores below are meaningless; lung volumes and "
            "HU measures are real.",
            file=sys.stderr,
        )
    # the demo's own folder: a rerun replaces its results
    outcome = run_batch(
        [inputs / name for name in phantoms], output / "results", config, models, overwrite=True
    )
    print(
        f"{'study':<16} {'status':<14} {'p(case)':>8} {'score cm3':>10} {'lesions cm3 (true)':>18} "
        f"{'lung cm3':>9} {'lung cm3 (true)':>15} {'GGO %':>6} {'consol. %':>9}"
    )
    for row in outcome.rows:
        truth = phantoms.get(str(row["study_id"]))
        true_lesion = truth.lesion_volume_ml if truth is not None else math.nan
        true_lung = truth.lung_volume_ml if truth is not None else math.nan
        print(
            f"{row['study_id']!s:<16} {row['status']!s:<14} {_num(row['case_probability'], 3):>8} "
            f"{_num(row['corona_score_cm3'], 1):>10} {true_lesion:>18.1f} {_num(row['lung_volume_cm3'], 1):>9} "
            f"{true_lung:>15.1f} {_num(row['ggo_percent'], 2):>6} {_num(row['consolidation_percent'], 2):>9} "
            f"{row['error'] or row['reason']}"
        )
    print(f"reports: {output / 'results'}/<study>/report.html; summary: {output / 'results' / SUMMARY_NAME}")
    return outcome.exit_code
