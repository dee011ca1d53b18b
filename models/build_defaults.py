"""Build the default classifier from source-matched data (release tooling, not used at run time).

    python -m corona_ct.models.build_defaults prepare --data ../shared/data --output runs/sm
    python -m corona_ct.models.build_defaults train --prepared runs/sm/prepared-foldA.safetensors \\
        --exclude P002 --output runs/sm/lopo-P002
    python -m corona_ct.models.build_defaults train --prepared runs/sm/prepared-all.safetensors --output runs/sm/final

``prepare`` segments every volume once with the shipped U-Net (the segmenter inference
uses), caches the lung masks, and writes two training sets that differ only in the real
lesion textures pasted into clean slices: ``foldA`` takes them from the COVID-SemiSeg
masked slices of texture fold A (so that fold B stays unseen for the localisation
check), ``all`` from all 50. ``train`` trains a ResNet-50 (Gozes recipe: Adam 1e-4,
BCE, rotation, flips, crops) with the auxiliary lesion-mask loss, choosing the epoch on
held-out patients (``VAL_GROUPS``) that are never the validated COVID-CT-MD patient.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from corona_ct.data.datasets import SliceDataset
from corona_ct.data.lesions import TextureBank
from corona_ct.data.source_matched import CTMD_DIAGNOSES, CTMD_PATIENTS, PreparedSlices, build_source_matched
from corona_ct.models.checkpoint import load_checkpoint, load_classifier, read_card, save_checkpoint
from corona_ct.models.classifier import BACKBONES, build_classifier
from corona_ct.models.train_classifier import TrainConfig, predict_probabilities, train_classifier
from corona_ct.pipeline.atomic import write_json
from corona_ct.pipeline.config import PipelineConfig
from corona_ct.pipeline.datamodel import Volume
from corona_ct.pipeline.errors import CoronaCTError
from corona_ct.pipeline.modelset import load_models
from corona_ct.pipeline.preprocess import ROI_LUNG_BOX, ROI_LUNG_ONLY, roi_name
from corona_ct.pipeline.segment import segment_lungs, slice_lung_labels

log = logging.getLogger("build_defaults")

#: Patients held out for choosing the epoch (never trained on, never a validated COVID-CT-MD patient).
VAL_GROUPS = (
    "LIDC-IDRI-0002",
    "TCGA-17-Z011",
    "TCGA-17-Z017",
    "TCGA-17-Z019",
    "TCGA-17-Z020",
    "phantom-1002",
)
#: Network input side (px). The seed's 224 gives Grad-CAM maps of 28×28 and 14×14; on the 2-core CPU
#: this was built on, a 224 px epoch took 7.5 min, so the shipped model uses 128 (maps 16×16 and 8×8).
INPUT_SIZE = 128
#: What the card's ``training_data`` says in words (reports show it beside the key numbers).
TRAINING_WORDS = {
    "positive": "slices radiologists labelled infected in a COVID-19 and a pneumonia patient (COVID-CT-MD, "
    "one scanner), phantom slices with lesions, and every clean slice again with counterfactual lesions "
    "(real COVID-SemiSeg infection textures and procedural ground glass/consolidation blended into its lungs)",
    "negative": "clean slices of the COVID-19, pneumonia and normal patients of COVID-CT-MD, 25 TCGA "
    "lung-cancer patients (two vendors), LIDC-IDRI-0001 and phantom slices without lesions",
    "split": "epoch chosen on patients never trained on: LIDC-IDRI-0002, 4 TCGA patients, phantom 1002",
}


def training_words(excluded: Sequence[str]) -> tuple[str, dict[str, str]]:
    """(intended use, training-data words) of a run that leaves the groups ``excluded`` out."""
    kept = [name for name in CTMD_PATIENTS if name not in excluded]
    use = (
        f"research only; trained on {len(kept)} patient{'s' if len(kept) != 1 else ''} of one scanner "
        "plus lung-cancer CT and phantoms, with counterfactual lesions; not a clinical population"
    )
    if not excluded:
        return use, dict(TRAINING_WORDS)
    left_out = "; left out of training (validation): " + ", ".join(
        f"{name} ({CTMD_DIAGNOSES[name]})" if name in CTMD_DIAGNOSES else name for name in excluded
    )
    return use, {key: words + left_out if key != "split" else words for key, words in TRAINING_WORDS.items()}


def texture_fold(stem: str) -> str:
    """COVID-SemiSeg masked slices 0–24 are texture fold A, the rest fold B (neighbouring numbers
    come from the same patient, so contiguous blocks keep patients apart as far as names tell)."""
    return "A" if int(stem) < 25 else "B"


def _segmenter(config: PipelineConfig, cache_dir: Path) -> object:
    models = load_models(config)
    if models.segmenter is None:
        raise SystemExit("the shipped U-Net is needed: models/weights/segmenter.safetensors")
    unet = models.segmenter
    size = models.segmenter_input_size
    cache_dir.mkdir(parents=True, exist_ok=True)

    def segment(volume: Volume) -> np.ndarray:
        digest = hashlib.sha256(volume.source.encode()).hexdigest()[:12]
        key = cache_dir / f"{volume.study_id}-{digest}.npz"
        if key.is_file():
            return np.load(key)["labels"]
        if volume.n_slices == 1:
            labels = slice_lung_labels(
                volume.array[0], volume.units, config, volume.source, unet.module, "cpu", size
            )
        else:
            labels = segment_lungs(volume, config.segment, config.window, unet.module, "cpu", size).labels
        np.savez_compressed(key, labels=labels)
        return np.asarray(labels)

    return segment


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def prepare(args: argparse.Namespace) -> None:
    config = PipelineConfig().replace({"roi.mask_outside_lungs": args.roi == ROI_LUNG_ONLY})
    semiseg = args.data / "covid-semiseg" / "train"
    needed = [
        semiseg / "Imgs",
        semiseg / "GT",
        args.data / "covid-ct-md",
        args.data / "tcga-slices",
        args.data / "dicom",
    ]
    missing = [str(path) for path in needed if not path.is_dir()]
    if missing:
        raise SystemExit(
            f"{args.data}: not the shared data folder; missing {', '.join(missing)} (see its README)"
        )
    stems = sorted(p.stem for p in (semiseg / "Imgs").iterdir())
    output: Path = args.output
    output.mkdir(parents=True, exist_ok=True)
    segment = _segmenter(PipelineConfig(), output / "lungs")  # the shipped segmenter, whatever the roi
    for name, fold in (("foldA", "A"), ("all", None)):
        names = [s for s in stems if fold is None or texture_fold(s) == fold]
        bank = TextureBank.from_folders(semiseg / "Imgs", semiseg / "GT", names)
        started = time.perf_counter()
        prepared = build_source_matched(
            args.data, segment, config, args.size, bank, seed=args.seed, twins=args.twins,  # type: ignore[arg-type]
            phantom_lesion_free=args.phantom_lesion_free, progress=lambda g: log.info("prepared %s", g),
        )  # fmt: skip
        prepared.save(output / f"prepared-{name}.safetensors")
        kinds = {k: prepared.kinds.count(k) for k in sorted(set(prepared.kinds))}
        log.info("%s: %d slices %s, %d textures from %d slices, %.0f s", name, len(prepared), kinds,
                 len(bank), len(bank.sources), time.perf_counter() - started)  # fmt: skip


def train(args: argparse.Namespace) -> None:
    prepared = PreparedSlices.load(args.prepared)
    groups = np.asarray(prepared.groups)
    excluded = np.isin(groups, args.exclude)
    is_val = np.isin(groups, VAL_GROUPS) & ~excluded
    is_train = ~is_val & ~excluded
    train_part, val_part = prepared.select(is_train), prepared.select(is_val)
    # the left-out patients' real slices (no counterfactual twins), logged per epoch, never used to choose
    is_monitor = excluded & np.isin(np.asarray(prepared.kinds), ("clean", "infected"))
    monitor = prepared.select(is_monitor) if len(set(prepared.labels[is_monitor].tolist())) == 2 else None
    config = TrainConfig.gozes(
        input_size=int(prepared.images.shape[-1]), epochs=args.epochs, patience=args.patience, workers=0, lr=args.lr,
        batch_size=args.batch_size, zero_init_residual=True, lr_schedule=args.lr_schedule, ema_decay=args.ema_decay,
        lesion_mask_weight=args.lesion_mask_weight, seed=args.seed, backbone=args.backbone,
    )  # fmt: skip
    kinds = {k: train_part.kinds.count(k) for k in sorted(set(train_part.kinds))}
    command = "python -m corona_ct.models.build_defaults " + " ".join(sys.argv[1:])
    intended_use, words = training_words(args.exclude)
    card_extra = {
        "intended_use": intended_use,
        "segmenter": "segmenter/unet-vgg16 (models/weights/segmenter.safetensors) with keep_plausible_lung",
        "training_data": {"command": command, **words},
        "training_details": {
            "prepared": str(args.prepared),
            "excluded_groups": list(args.exclude),
            "validation_groups": sorted(set(groups[is_val].tolist())),
            "train_slices": int(is_train.sum()),
            "train_kinds": kinds,
            "train_groups": sorted(set(groups[is_train].tolist())),
        },
    }
    log.info("training on %d slices %s, choosing the epoch on %d", is_train.sum(), kinds, is_val.sum())
    result = train_classifier(
        SliceDataset(train_part.images, train_part.labels, train_part.masks),
        SliceDataset(val_part.images, val_part.labels),
        config,
        args.output,
        class_names=("normal", "covid"),
        roi=prepared.roi,
        window_hu=(PipelineConfig().window.hu_min, PipelineConfig().window.hu_max),
        card_extra=card_extra,
        resume=args.resume,
        monitor_set=None if monitor is None else SliceDataset(monitor.images, monitor.labels),
    )
    print(
        json.dumps(
            {"best_epoch": result.best_epoch, "best": result.best_metrics, "seconds": round(result.seconds)}
        )
    )


def install(args: argparse.Namespace) -> None:
    """Copy a trained run to ``models/weights/classifier`` as fp16 with its contract and figures; with
    ``--figures-only``, store new validation figures in the shipped card and leave its weights alone."""
    if args.figures_only:
        card_path = args.weights_dir / "classifier.json"
        card = read_card(card_path)  # validated; the figures touch only `validation` and `intended_use`
        _store_figures(card, args.validation, args.cohort, args.rerun)
        write_json(card_path, card, sort_keys=True)
        print(f"classifier: {card_path} figures {sorted(card['validation'])}; weights unchanged")
        return
    if args.run is None:
        raise SystemExit("install: --run RUN (a run folder holding model.safetensors) or --figures-only")
    source = args.run / "model.safetensors"
    card = read_card(source)
    state, _ = load_checkpoint(source, expected_architecture=card["architecture"])
    model = build_classifier(card["backbone"], card["num_outputs"], **card.get("backbone_options", {}))
    model.load_state_dict(state)
    if "training_details" not in card:  # a run from before the card kept words and details apart
        details = dict(card["training_data"])
        card["training_data"] = {"command": details.pop("command"), **TRAINING_WORDS}
        card["training_details"] = details
    segmenter = read_card(args.weights_dir / "segmenter.safetensors")
    card["input"] = {
        **card["input"],
        "segmenter": {"architecture": segmenter["architecture"], "sha256": segmenter["sha256"]},
    }
    card.pop("validation", None)  # a run's card has none; figures belong to these weights only
    _store_figures(card, args.validation, args.cohort, args.rerun)
    path = save_checkpoint(model, args.weights_dir / "classifier.safetensors", card, half=True)
    print(
        f"classifier: {path} ({path.stat().st_size / 1e6:.1f} MB, sha256 {read_card(path)['sha256'][:16]}…)"
    )


def _store_figures(
    card: dict[str, Any], validation: Sequence[Path], cohort: Path | None, rerun: Path | None = None
) -> None:
    """Merge the sections of ``validation`` (validation.json files) and the phantom ``cohort`` metrics over
    the card's ``validation`` figures, and restate its intended use with the weakest of them. ``rerun``:
    the validation.json of the same leave-one-patient-out recipe trained again, stored as ``lopo_rerun``."""
    figures: dict[str, Any] = dict(card.get("validation") or {})
    for path in validation:
        figures.update(_figures_file(Path(path), "python -m tools.validate_source_matched"))
    if rerun is not None:
        again = _figures_file(rerun, "python -m tools.validate_source_matched").get("lopo")
        if not again:
            raise SystemExit(f"install: {rerun} holds no 'lopo' section; give a --only lopo validation.json")
        figures["lopo_rerun"] = again
    for section in ("lopo", "lopo_rerun"):
        # per-slice rows and the split by lung area (a cut chosen after looking) stay in validation.json
        figures.get(section, {}).pop("by_lung_fraction", None)
        for row in figures.get(section, {}).get("patients", {}).values():
            row.pop("slices", None)
    if cohort is not None:
        figures["phantom_cohort"] = _figures_file(cohort, "python -m tools.phantom_cohort")
    if figures:
        card["validation"] = figures
        excluded = card.get("training_details", {}).get("excluded_groups", [])
        card["intended_use"] = f"{training_words(excluded)[0]}; {_weakness(figures)}"


def _figures_file(path: Path, writer: str) -> dict[str, Any]:
    """The JSON object in ``path`` (figures written by ``writer``); a clear exit before anything is written."""
    try:
        figures = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SystemExit(
            f"install: cannot read figures from {path} ({error}); give the JSON that {writer} wrote"
        ) from None
    if not isinstance(figures, dict):
        raise SystemExit(f"install: {path} holds no JSON object; give the JSON that {writer} wrote")
    return figures


def calibrate(args: argparse.Namespace) -> None:
    """Shift a run's output bias so that p = 0.5 keeps ``--specificity`` of the epoch-selection negatives.

    A from-scratch network trained for minutes ranks slices better than it places them:
    its probabilities sit around 0.5-0.7 for every slice, so the pipeline's p ≥ 0.5 calls
    almost everything positive. The bias of the last layer is lowered by the logit of the
    threshold that keeps the wanted specificity on ``VAL_GROUPS`` (never the validated
    patients). Ranking (AUC) and Grad-CAM maps (gradients of the logit) do not change.
    """
    prepared = PreparedSlices.load(args.prepared)
    is_val = np.isin(np.asarray(prepared.groups), VAL_GROUPS)
    val = prepared.select(is_val)
    loaded = load_classifier(args.run / "model.safetensors")
    model = loaded.module
    probs = predict_probabilities(model, SliceDataset(val.images, val.labels), 32, "cpu")
    negatives = np.sort(probs[val.labels == 0])
    threshold = float(np.quantile(negatives, args.specificity, method="higher")) + 1e-6
    shift = float(np.log(threshold / (1.0 - threshold)))
    fc = model.get_submodule("fc")
    if not isinstance(fc, torch.nn.Linear) or fc.bias is None:
        raise SystemExit(f"{args.run}: calibrate expects a ResNet with a linear fc layer")
    with torch.no_grad():
        fc.bias.sub_(shift)
    card = dict(loaded.card)
    card["calibration"] = {
        "method": "output bias shifted by -logit(t); t keeps the wanted specificity on the epoch-selection negatives",
        "specificity_target": args.specificity,
        "threshold_before": threshold,
        "logit_shift": shift,
        "negatives": int(negatives.size),
        "groups": list(VAL_GROUPS),
    }
    save_checkpoint(model, args.run / "model.safetensors", card)
    print(json.dumps(card["calibration"]))


def _weakness(figures: dict[str, Any]) -> str:
    """The held-out figures a report reader must see first, in one line (from the validation run);
    where the recipe's leave-one-patient-out models were trained again (``lopo_rerun``), that run's
    figure beside each, so that the reader sees how far one training run is from the next."""
    parts = []
    runs = [figures.get("lopo") or {}, figures.get("lopo_rerun") or {}]

    def both(read: Callable[[dict[str, Any]], float | None], form: str) -> str | None:
        values = [read(run) for run in runs]
        if values[0] is None:
            return None
        again = f" ({form.format(values[1])} when trained again)" if values[1] is not None else ""
        return form.format(values[0]) + again

    def patient(run: dict[str, Any], name: str) -> dict[str, Any]:
        return (run.get("patients") or {}).get(name) or {}

    covid = both(lambda run: (patient(run, "P002").get("slice_auc") or {}).get("auc"), "AUC {:.2f}")
    if covid:
        parts.append(f"infected vs clean slices of a held-out COVID-19 patient: {covid}")
    normal = both(
        lambda run: None if (share := patient(run, "normal001").get("clean_called_positive")) is None
        else 100 * share,
        "{:.0f} %",
    )  # fmt: skip
    if normal:
        parts.append(f"{normal} of a held-out normal patient's slices positive")
    pooled = both(lambda run: (run.get("pooled_slice_auc") or {}).get("auc"), "AUC {:.2f}")
    if pooled:
        parts.append(f"pooled over the held-out patients: {pooled}")
    cohort = (figures.get("phantom_cohort") or {}).get("corona_score_cm3") or {}
    if cohort:
        parts.append(f"Corona score vs true lesion volume r {cohort['pearson_r']:.2f}")
    lesion_free = ((figures.get("phantom_cohort") or {}).get("case_called_positive") or {}).get(
        "without_lesions"
    )
    if lesion_free:
        parts.append(f"{100 * lesion_free:.0f} % of lesion-free phantoms called positive")
    return "under-trained (CPU only), does not meet its targets: " + "; ".join(parts) + " (docs/models.md)"


def main(argv: list[str] | None = None) -> None:
    """The command line (logging is the process's, set up under ``__main__``: a caller's stays as it is)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="segment the volumes and write the two training sets")
    p.add_argument("--data", type=Path, required=True, help="the shared data folder (../shared/data)")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--size", type=int, default=INPUT_SIZE, help=f"network input side in px (default {INPUT_SIZE})"
    )
    p.add_argument(
        "--roi", choices=(ROI_LUNG_BOX, ROI_LUNG_ONLY), default=roi_name(PipelineConfig().roi),
        help="classifier input: the lung box, or the lung box blanked outside the lungs (the config's "
        "roi.mask_outside_lungs; default: the pipeline's)",
    )  # fmt: skip
    p.add_argument(
        "--twins", type=_at_least_one, default=1,
        help="counterfactual twins per clean slice, each with lesions of its own (default 1)",
    )  # fmt: skip
    p.add_argument(
        "--phantom-lesion-free", action="store_true",
        help="each phantom slice with lesions also drawn without them, as a negative (without it 72 %% of "
        "phantom slices are positive); measured in docs/models.md, not used by the shipped model",
    )  # fmt: skip
    t = sub.add_parser("train", help="train one classifier on a prepared set")
    t.add_argument("--prepared", type=Path, required=True)
    t.add_argument("--output", type=Path, required=True)
    t.add_argument("--exclude", action="append", default=[], help="group (patient) left out; repeatable")
    t.add_argument("--epochs", type=int, default=8)
    t.add_argument("--patience", type=int, default=4)
    t.add_argument("--lesion-mask-weight", type=float, default=1.0)
    t.add_argument("--batch-size", type=int, default=8, help="8: twice the optimizer steps of 16 per epoch")
    t.add_argument(
        "--lr", type=float, default=1e-3,
        help="Adam learning rate (the seed's 1e-4 barely moved a from-scratch ResNet-50 in 4 CPU epochs)",
    )  # fmt: skip
    t.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant")
    t.add_argument(
        "--ema-decay", type=float, default=0.0,
        help="evaluate, select and keep an exponential average of the weights (per step); 0: off",
    )  # fmt: skip
    t.add_argument(
        "--backbone", choices=sorted(BACKBONES), default="resnet50",
        help="resnet50: the seed's; resnet18 trains 3-4x faster on a CPU (docs/models.md compares them)",
    )  # fmt: skip
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true")
    i = sub.add_parser("install", help="copy a trained run into models/weights as fp16")
    i.add_argument("--run", type=Path, help="run folder holding model.safetensors")
    i.add_argument(
        "--figures-only", action="store_true",
        help="only store --validation/--cohort figures in the shipped card (sections merged; weights unchanged)",
    )  # fmt: skip
    i.add_argument("--weights-dir", type=Path, default=Path(__file__).resolve().parent / "weights")
    i.add_argument("--validation", action="append", default=[], help="validation.json to store in the card")
    i.add_argument("--cohort", type=Path, help="metrics.json of python -m tools.phantom_cohort")
    i.add_argument(
        "--rerun", type=Path,
        help="validation.json (--only lopo) of the same LOPO recipe trained again: stored beside the first",
    )  # fmt: skip
    c = sub.add_parser("calibrate", help="shift a run's output bias to a specificity on the held-out groups")
    c.add_argument("--run", type=Path, required=True)
    c.add_argument("--prepared", type=Path, required=True, help="the prepared set the run was trained from")
    c.add_argument("--specificity", type=float, default=0.95)
    args = parser.parse_args(argv)
    try:
        {"prepare": prepare, "train": train, "install": install, "calibrate": calibrate}[args.command](args)
    except CoronaCTError as error:  # a bad file or setting: its message, not a traceback
        raise SystemExit(f"build_defaults {args.command}: {error}") from None


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    main()
