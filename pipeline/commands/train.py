"""``train-cls``, ``cv`` and ``train-seg``: train the slice classifier, compare backbones, train the U-Net.

Data for the classifier: ``--data manifest.csv`` (``path,label,group[,split]``) or
class folders ``--class covid=DIR --class normal=DIR`` grouped by ``--group-rule``
(see ``data/manifest.py`` and docs/training.md). Every recipe field can be overridden.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from corona_ct.pipeline.commands.options import add_compute_options, apply_compute_options
from corona_ct.pipeline.errors import ConfigError

log = logging.getLogger(__name__)

#: Command-line option → TrainConfig field (only options the user actually gave override the recipe).
_OVERRIDES = {
    "backbone": "backbone", "input_size": "input_size", "epochs": "epochs", "lr": "lr",
    "batch_size": "batch_size", "patience": "patience", "balance": "balance", "val_fraction": "val_fraction",
    "seed": "seed", "workers": "workers", "device": "device", "weight_decay": "weight_decay",
    "num_outputs": "num_outputs", "optimizer": "optimizer", "lstm_hidden": "lstm_hidden",
    "rotation_deg": "rotation_deg", "zoom": "zoom", "shift": "shift", "crop_scale": "crop_scale",
    "lr_schedule": "lr_schedule", "ema_decay": "ema_decay",
}  # fmt: skip


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--data", type=Path, help="manifest CSV with columns path,label,group[,split]")
    data.add_argument(
        "--class", dest="class_dirs", action="append", default=[], metavar="NAME=DIR",
        help="a class folder (repeat: --class covid=DIR --class normal=DIR)",
    )  # fmt: skip
    data.add_argument("--positive", default="covid", help="name of the positive class (default: covid)")
    data.add_argument(
        "--group-rule", default="auto",
        help="patient grouping of class-folder file names: auto, covid-ctset, ucsd, semiseg or regex:PATTERN",
    )  # fmt: skip
    data.add_argument(
        "--roi", choices=("lung", "none"), default="lung",
        help="lung: HU window + lung bounding-box crop (CT); none: the image as given (pre-windowed slices)",
    )  # fmt: skip
    data.add_argument("--config", type=Path, help="pipeline config JSON (window, ROI margin, segmentation)")


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    train = parser.add_argument_group("training (override the recipe)")
    train.add_argument(
        "--recipe", choices=("gozes", "covid-ctset"), default="gozes",
        help="base settings: gozes (Gozes et al. 2020, the default) or covid-ctset (Rahimzadeh et al.); "
        "docs/training.md lists their values",
    )  # fmt: skip
    train.add_argument("--input-size", type=int, help="network input side, px")
    train.add_argument("--epochs", type=int, help="maximum number of epochs")
    train.add_argument("--lr", type=float, help="learning rate")
    train.add_argument(
        "--lr-schedule",
        choices=("constant", "cosine"),
        help="constant (the recipes') or cosine decay over --epochs",
    )
    train.add_argument(
        "--ema-decay", type=float,
        help="keep an exponential average of the weights, per step (e.g. 0.995); 0: off (the recipes')",
    )  # fmt: skip
    train.add_argument("--batch-size", type=int, help="slices per batch")
    train.add_argument("--weight-decay", type=float, help="L2 weight decay")
    train.add_argument("--optimizer", choices=("adam", "nadam"), help="optimizer")
    train.add_argument("--num-outputs", type=int, choices=(1, 2), help="1: sigmoid/BCE, 2: softmax/CE")
    train.add_argument("--patience", type=int, help="early-stopping patience on validation AUC (0: off)")
    train.add_argument(
        "--balance", choices=("sampler", "loss", "none"),
        help="class balance: weighted sampling, weighted loss, or none",
    )  # fmt: skip
    train.add_argument("--val-fraction", type=float, help="patient groups held out for validation")
    train.add_argument("--rotation-deg", type=float, help="augmentation: largest rotation, degrees")
    train.add_argument("--zoom", type=float, help="augmentation: largest zoom, fraction (0.1: ±10 %%)")
    train.add_argument("--shift", type=float, help="augmentation: largest shift, fraction of the side")
    train.add_argument(
        "--crop-scale", type=float, help="augmentation: smallest random-crop area, fraction of the image"
    )
    train.add_argument("--lstm-hidden", type=int, help="resnet152_lstm: LSTM units (study: 2048)")
    train.add_argument("--seed", type=int, help="random seed (weights, splits, augmentation)")
    train.add_argument("--workers", type=int, help="DataLoader worker processes")
    train.add_argument("--no-amp", action="store_true", help="no bf16 autocast/channels_last on CUDA")
    train.add_argument(
        "--resume", action="store_true", help="continue from the last finished epoch in --output"
    )


def register(subparsers: Any) -> None:
    cls = subparsers.add_parser("train-cls", help="train a slice classifier (COVID vs other)")
    _add_data_options(cls)
    _add_training_options(cls)
    cls.add_argument(
        "--backbone",
        help="resnet50 (default), resnet152, vgg16, vgg19, inception_v3, xception, resnet152_lstm; resnet18 (not the seed's)",
    )
    add_compute_options(cls, "run folder (checkpoint, card, curves)")
    cls.set_defaults(handler=run_train_classifier)

    cv = subparsers.add_parser("cv", help="patient-grouped stratified K-fold comparison of backbones")
    _add_data_options(cv)
    _add_training_options(cv)
    cv.add_argument("--backbones", default="resnet50", help="comma-separated backbone names")
    cv.add_argument("--folds", type=int, default=5, help="number of patient-grouped folds (default 5)")
    add_compute_options(cv, "folder for the per-fold runs, per_fold.csv, summary.md and plots")
    cv.set_defaults(handler=run_cross_validation, val_fraction_default=0.0)

    seg = subparsers.add_parser("train-seg", help="train the lung U-Net (VGG16 encoder)")
    seg.add_argument(
        "--data", type=Path, action="append", default=[], help="manifest CSV with columns image,mask"
    )
    seg.add_argument(
        "--unlabeled", type=Path, action="append", default=[],
        help="CT study (DICOM folder, NIfTI, slice folder) labelled by --pseudo-labels (repeatable)",
    )  # fmt: skip
    seg.add_argument(
        "--pseudo-labels", choices=("classical",), help="label --unlabeled CT with this segmenter"
    )
    seg.add_argument("--classes", type=int, choices=(2, 3), default=3, help="3: bg/right/left; 2: bg/lung")
    seg.add_argument("--input-size", type=int, default=256, help="network input side, px (default 256)")
    seg.add_argument("--epochs", type=int, default=30, help="maximum number of epochs (default 30)")
    seg.add_argument("--lr", type=float, default=1e-4, help="learning rate (default 1e-4)")
    seg.add_argument("--batch-size", type=int, default=8, help="slices per batch (default 8)")
    seg.add_argument(
        "--patience",
        type=int,
        default=5,
        help="early-stopping patience on validation Dice (0: off; default 5)",
    )
    seg.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="share of volumes held out for validation (default 0.2)",
    )
    seg.add_argument(
        "--val-group", action="append", default=[], metavar="GROUP",
        help="hold out this group (manifest group column) for validation; repeatable (default: random groups)",
    )  # fmt: skip
    seg.add_argument(
        "--lesion-probability", type=float, default=0.5, help="share of slices given synthetic lesions"
    )
    seg.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    seg.add_argument("--workers", type=int, default=0, help="data loading worker processes (default 0)")
    seg.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    seg.add_argument("--config", type=Path, help="pipeline config JSON (window, segmentation)")
    add_compute_options(seg, "run folder (checkpoint, card, curves)")
    seg.add_argument(
        "--resume", action="store_true", help="continue from the last finished epoch in --output"
    )
    seg.set_defaults(handler=run_train_segmenter)


def _train_config(args: argparse.Namespace) -> Any:
    from corona_ct.models.train_classifier import TrainConfig

    overrides = {field: getattr(args, option) for option, field in _OVERRIDES.items()
                 if getattr(args, option, None) is not None}  # fmt: skip
    if "val_fraction" not in overrides and getattr(args, "val_fraction_default", None) is not None:
        overrides["val_fraction"] = args.val_fraction_default
    if args.no_amp:
        overrides["amp"] = False
    return TrainConfig.from_recipe(args.recipe, **overrides)


def _manifest(args: argparse.Namespace) -> Any:
    from corona_ct.data.manifest import manifest_from_class_folders, read_manifest_csv

    if (args.data is None) == (not args.class_dirs):
        raise ConfigError("give either --data MANIFEST.csv or --class NAME=DIR (at least two), not both")
    if args.data is not None:
        return read_manifest_csv(args.data, positive=args.positive)
    folders: dict[str, str] = {}
    for item in args.class_dirs:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ConfigError(f"--class {item!r} must look like NAME=DIR")
        folders[name] = folder
    return manifest_from_class_folders(folders, rule=args.group_rule, positive=args.positive)


def _prepared(args: argparse.Namespace, config: Any) -> tuple[Any, Any, Any]:
    from corona_ct.data.datasets import build_slice_dataset
    from corona_ct.pipeline.config import load_config

    pipeline_config = load_config(args.config)
    manifest = _manifest(args)
    print(f"data: {manifest.summary()}", flush=True)
    dataset = build_slice_dataset(
        manifest, args.roi, config.input_size, pipeline_config, workers=config.workers
    )
    return manifest, dataset, pipeline_config


def _card_roi(args: argparse.Namespace, pipeline_config: Any) -> str:
    """The card's ``input.roi``: the lung box (blanked outside the lungs under the config's
    ``roi.mask_outside_lungs``), or ``none`` for whole images."""
    from corona_ct.pipeline.preprocess import roi_name

    return roi_name(pipeline_config.roi) if args.roi == "lung" else "none"


def _card_extra(manifest: Any, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "manifest_sha256": manifest.sha256(),
        "grouping": manifest.grouping,
        "n_images": len(manifest),
        "preprocessing": "pipeline.preprocess (window, lung box, to_model_input)" if args.roi == "lung"
        else "pipeline.preprocess (image as given, to_model_input)",
    }  # fmt: skip


def run_train_classifier(args: argparse.Namespace) -> int:
    from corona_ct.pipeline.preflight import check_output_folder

    check_output_folder(args.output)  # before any data or model is loaded
    apply_compute_options(args)
    from corona_ct.data.folds import manifest_splits
    from corona_ct.models.metrics import binary_report
    from corona_ct.models.train_classifier import predict_probabilities, train_classifier
    from corona_ct.pipeline.atomic import write_json, write_text
    from corona_ct.pipeline.device import resolve_device

    config = _train_config(args)
    manifest, dataset, pipeline_config = _prepared(args, config)
    args.output.mkdir(parents=True, exist_ok=True)
    write_text(args.output / "manifest.csv", manifest.to_csv())
    train_idx, val_idx, test_idx = manifest_splits(manifest, config.val_fraction, seed=config.seed)
    window_hu = (pipeline_config.window.hu_min, pipeline_config.window.hu_max)
    result = train_classifier(
        dataset.subset(train_idx),
        dataset.subset(val_idx) if val_idx.size else None,
        config,
        args.output,
        class_names=manifest.class_names,
        roi=_card_roi(args, pipeline_config),
        window_hu=window_hu,
        card_extra=_card_extra(manifest, args),
        resume=args.resume,
    )
    print(f"best epoch {result.best_epoch}: {json.dumps(result.best_metrics)}")
    if test_idx.size:
        test = dataset.subset(test_idx)
        device = resolve_device(config.device)
        probs = predict_probabilities(result.model, test, config.batch_size, device, config.amp)
        report = binary_report(test.labels.numpy(), probs, manifest.class_names)
        write_json(args.output / "test_metrics.json", report)  # an undefined metric is null
        print(f"test: accuracy {report['accuracy']:.3f}, AUC {report['auc']:.3f} (n={report['n']})")
    print(f"checkpoint: {result.checkpoint}")
    return 0


def run_cross_validation(args: argparse.Namespace) -> int:
    from corona_ct.pipeline.preflight import check_output_folder

    check_output_folder(args.output)  # before any data or model is loaded
    apply_compute_options(args)
    from corona_ct.models.crossval import cross_validate

    config = _train_config(args)
    backbones = [name.strip() for name in args.backbones.split(",") if name.strip()]
    if not backbones:
        raise ConfigError("--backbones must name at least one backbone")
    manifest, dataset, pipeline_config = _prepared(args, config)
    rows = cross_validate(
        dataset, manifest.groups, backbones, config, args.output, n_folds=args.folds,
        class_names=manifest.class_names, roi=_card_roi(args, pipeline_config),
        card_extra=_card_extra(manifest, args), resume=args.resume,
    )  # fmt: skip
    print((args.output / "summary.md").read_text(encoding="utf-8"))
    print(f"{len(rows)} fold results in {args.output}")
    return 0


def run_train_segmenter(args: argparse.Namespace) -> int:
    from corona_ct.pipeline.preflight import check_output_folder

    check_output_folder(args.output)  # before any data or model is loaded
    device = apply_compute_options(args)
    from corona_ct.data.datasets import load_segmentation_data
    from corona_ct.models.train_segmenter import SegTrainConfig, train_segmenter
    from corona_ct.pipeline.config import load_config

    if not args.data and not args.unlabeled:
        raise ConfigError("give --data MANIFEST.csv (image,mask) and/or --unlabeled CT with --pseudo-labels")
    if args.unlabeled and args.pseudo_labels is None:
        raise ConfigError("--unlabeled CT needs --pseudo-labels classical to obtain its lung masks")
    pipeline_config = load_config(args.config)
    config = SegTrainConfig(
        num_classes=args.classes, input_size=args.input_size, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, patience=args.patience, val_fraction=args.val_fraction,
        val_groups=tuple(args.val_group),
        lesion_probability=args.lesion_probability, seed=args.seed, workers=args.workers,
        device=device, amp=not args.no_amp,
    )  # fmt: skip
    slices, groups = load_segmentation_data(
        args.data, args.unlabeled, config.input_size, pipeline_config, binary=config.num_classes == 2
    )
    print(f"segmentation data: {len(slices)} slices from {len(set(groups))} volumes/groups", flush=True)
    result = train_segmenter(
        slices, groups, config, args.output,
        window_hu=(pipeline_config.window.hu_min, pipeline_config.window.hu_max),
        card_extra={"pseudo_labels": args.pseudo_labels or "none"}, resume=args.resume,
    )  # fmt: skip
    print(f"best epoch {result.best_epoch}: validation Dice {result.best_metrics}")
    print(f"checkpoint: {result.checkpoint}")
    return 0
