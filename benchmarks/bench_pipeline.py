"""Pipeline speed on CPU: seconds per stage of one study, and the whole run against its bare model passes.

    python benchmarks/bench_pipeline.py [--study ../shared/data/dicom/LIDC-IDRI-0001] [--threads 2]
        [--repeats 2] [--batch-sizes 1,16]

Loads the shipped default models (models/weights; speed does not depend on the weights) and
prints, for each repeat (the first repeat follows one warm-up batch of each network):

* the stage timings ``analyze_study`` records itself (``StudyResult.timings_s``), plus reading
  the study and writing its outputs (NIfTI, features.npz, report.html/json);
* the same stages taken apart: each sub-step run on its own on the same arrays, at the
  pipeline's batch sizes, among them the bare passes of the two networks — the U-Net forward
  on the same windowed slices already resized to its input, and the ResNet-50 forward plus the
  Grad-CAM backward (``autograd.grad`` of the summed score w.r.t. the same hooked layers) on
  the same crops;
* the ratio of the whole run (``analyze_study``, and reading + analysis + writing) to the sum
  of those bare passes. The target (issue 13) is under 1.5.

Every figure comes as wall time and process CPU time (s, all threads): on a shared machine the
CPU time is the steadier one. The whole run and the bare passes are minutes apart, so the bench
also gives the steps taken apart over the bare passes run beside them ("interleaved") and, after
the tables, the best of the repeats (least analyze_study over least bare passes).

``--batch-sizes`` additionally compares whole-study times at several classifier batch sizes.
``--release-freed-memory`` runs with glibc's default malloc (``runtime.hold_freed_memory=false``), the A/B
of :func:`pipeline.memory.hold_freed_memory`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from corona_ct.models.classifier import BackboneSpec, positive_score
from corona_ct.models.segmenter import is_binary_unet, labels_from_scores, predict_lung_labels
from corona_ct.pipeline.assess import check_lungs
from corona_ct.pipeline.classify import case_probability
from corona_ct.pipeline.config import PipelineConfig
from corona_ct.pipeline.datamodel import CamStack, LungMask, SliceScores, Volume
from corona_ct.pipeline.explain import explain_batch
from corona_ct.pipeline.hu_maps import hu_maps
from corona_ct.pipeline.ingest import load_study
from corona_ct.pipeline.memory import hold_freed_memory
from corona_ct.pipeline.modelset import ModelSet, load_models
from corona_ct.pipeline.preprocess import (
    evaluable_slices,
    input_lungs,
    lung_bounding_box,
    paste_back,
    resize_batch,
    to_model_input,
    window,
)
from corona_ct.pipeline.report import write_study_outputs
from corona_ct.pipeline.run import analyze_study, thumbnail
from corona_ct.pipeline.segment.cleanup import clean_lung_mask, keep_plausible_lung, trim_dense_rim
from corona_ct.pipeline.segment.regions import low_density
from corona_ct.pipeline.segment.sides import split_sides
from corona_ct.pipeline.severity import severity
from corona_ct.pipeline.summary import summary_values

DEFAULT_STUDY = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom" / "LIDC-IDRI-0001"
T = TypeVar("T")
#: Sub-steps that are bare network passes (the denominator of the ratio).
BARE = ("U-Net forward (bare)", "ResNet-50 fwd + Grad-CAM bwd (bare)")
#: Key suffix of the process CPU time (s, summed over threads) that goes with a wall time.
CPU = " [cpu]"
#: Sub-step: U-Net class scores → labels at the slice size.
UNET_LABELS = "  of which: U-Net scores → labels at slice size"


def timed(seconds: dict[str, float], name: str, work: Callable[[], T]) -> T:
    """Run ``work()``, add its wall time (s) to ``seconds[name]`` and its process CPU time (s, all
    threads) to ``seconds[name + CPU]``, and return its result."""
    start, cpu_start = time.perf_counter(), time.process_time()
    value = work()
    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
    seconds[name + CPU] = seconds.get(name + CPU, 0.0) + time.process_time() - cpu_start
    return value


def bare_unet_seconds(
    seconds: dict[str, float], model: torch.nn.Module, windowed: np.ndarray, batch: int, size: int
) -> None:
    """Add to ``seconds`` the U-Net forward alone (s, ``BARE[0]``) on ``windowed`` slices resized to
    ``size`` beforehand, ``batch`` at a time, and the time (s, ``UNET_LABELS``) to turn its class
    scores into labels at the slice size as :func:`predict_lung_labels` does."""
    inputs = resize_batch(torch.from_numpy(np.ascontiguousarray(windowed, np.float32)), (size, size))[:, None]
    image_shape = (int(windowed.shape[1]), int(windowed.shape[2]))
    with torch.inference_mode():
        for start in range(0, inputs.shape[0], batch):
            part = inputs[start : start + batch].contiguous()
            logits = timed(seconds, BARE[0], lambda part=part: model(part).float())
            timed(seconds, UNET_LABELS, partial(labels_from_scores, logits, image_shape))


def bare_gradcam_pass(
    model: torch.nn.Module, spec: BackboneSpec, inputs: torch.Tensor, layers: Sequence[str]
) -> None:
    """ResNet forward + one backward to the hooked layers' activations, nothing else (no maps, no copies)."""
    captured: dict[str, torch.Tensor] = {}
    names = list(dict.fromkeys([*layers, spec.feature_layer]))
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda _m, _a, out, name=name: captured.__setitem__(name, out)
        )
        for name in names
    ]
    try:
        with torch.enable_grad():
            batch = inputs.clone().requires_grad_(True)
            logits = model(batch)
            torch.autograd.grad(positive_score(logits).sum(), [captured[name] for name in names])
    finally:
        for handle in handles:
            handle.remove()


def whole_run(volume: Volume, models: ModelSet, config: PipelineConfig, out_dir: Path) -> dict[str, float]:
    """``analyze_study``'s own stage timings, the total, and the time to write the outputs (s)."""
    seconds: dict[str, float] = {}
    result = timed(seconds, "analyze_study total", lambda: analyze_study(volume, models, config))
    seconds.update({f"analyze: {name}": value for name, value in result.timings_s.items()})
    values = summary_values(
        volume.study_id, str(volume.source), result, threshold=config.classify.positive_threshold
    )
    timed(seconds, "write outputs", lambda: write_study_outputs(out_dir, result, models, config, values))
    return seconds


def stage_breakdown(volume: Volume, models: ModelSet, config: PipelineConfig) -> dict[str, float]:
    """``analyze_study``'s steps run one by one on the same arrays (s), bare passes included."""
    s: dict[str, float] = {}
    assert models.segmenter is not None
    unet = models.segmenter.module.eval()
    seg_size = models.segmenter_input_size or 256
    seg = config.segment
    spacing = volume.geometry.spacing_mm
    hu = volume.array

    windowed = timed(s, "seg: window", lambda: window(hu, volume.units, config.window))
    raw = timed(
        s, "seg: U-Net incl. resize in/out + argmax",
        lambda: predict_lung_labels(unet, windowed, seg.batch_size, "cpu", input_size=seg_size),
    )  # fmt: skip
    bare_unet_seconds(s, unet, windowed, seg.batch_size, seg_size)
    if is_binary_unet(unet) and raw.any():
        raw = timed(s, "seg: split_sides", lambda: split_sides(raw > 0, windowed))
    rim_px = int(np.ceil(max(hu.shape[1:]) / seg_size))
    low = timed(s, "seg: low_density", lambda: low_density(hu, volume.units, seg))
    raw = timed(s, "seg: trim_dense_rim", lambda: trim_dense_rim(raw, low, rim_px))
    raw = timed(
        s, "seg: keep_plausible_lung", lambda: keep_plausible_lung(raw, hu, volume.units, spacing, low)
    )
    labels = timed(s, "seg: clean_lung_mask", lambda: clean_lung_mask(raw, spacing, seg, intensity=hu))
    lung_mask = LungMask(labels=labels, method="unet")
    timed(s, "assess", lambda: check_lungs(volume, lung_mask, seg))

    lungs = lung_mask.lungs
    box = timed(s, "roi: lung box", lambda: lung_bounding_box(lungs, config.roi))
    evaluated = timed(s, "roi: evaluable slices", lambda: evaluable_slices(lungs, config.roi))
    windowed = timed(s, "roi: window (again)", lambda: window(hu, volume.units, config.window))

    classifier = models.classifier.module.eval()
    spec = models.spec
    size = models.input_size(config)
    layers = tuple(config.cam.layers or spec.cam_layers)
    batch = config.classify.batch_size
    eval_index = np.flatnonzero(evaluated)
    probs = np.full(volume.n_slices, np.nan, np.float32)
    cam_volume = timed(s, "paste: allocate cam volume", lambda: np.zeros(hu.shape, np.float32))
    for start in range(0, len(eval_index), batch):
        chunk = eval_index[start : start + batch]
        inputs = timed(
            s, "cls: crop + resize (to_model_input)",
            partial(to_model_input, windowed[chunk], box, size, input_lungs(lungs[chunk], config.roi)),
        )  # fmt: skip
        out = timed(
            s, "cls: explain_batch (fwd + bwd + maps)",
            partial(explain_batch, classifier, spec, inputs, layers=layers, fusion=config.cam.fusion),
        )  # fmt: skip
        timed(s, BARE[1], partial(bare_gradcam_pass, classifier, spec, inputs, layers))
        fused = torch.as_tensor(out.fused)
        probs[chunk] = out.probabilities
        cam_volume[chunk] = timed(s, "paste: paste_back", partial(paste_back, fused, box, hu.shape[1:]))
        timed(s, "paste: thumbnails", partial(_thumbnails, inputs[:, 0], fused))
    scores = SliceScores(probs=probs, evaluated=evaluated)
    cams = CamStack(maps=cam_volume, layers=layers, fusion=config.cam.fusion)
    timed(s, "severity", lambda: severity(volume, lung_mask, cams, scores, config))
    if volume.units == "HU":
        timed(
            s, "  of which: hu_maps (GGO/consolidation)",
            lambda: hu_maps(volume.hu, lungs, spacing, config.severity),
        )  # fmt: skip
    timed(s, "case probability", lambda: case_probability(probs[evaluated], config.classify))
    return s


def _thumbnails(images: torch.Tensor, maps: torch.Tensor) -> None:
    """The two thumbnail stacks the runner keeps per batch (slices and fused maps)."""
    thumbnail(images)
    thumbnail(maps)


def print_table(title: str, runs: Sequence[dict[str, float]], n_slices: int) -> None:
    """One row per stage; per repeat its wall and process CPU time (s/study; "-": not measured), and
    the wall s/slice of the last repeat."""
    print(f"\n{title}")
    header = "".join(f"{'wall ' + str(i + 1):>9}{'cpu ' + str(i + 1):>9}" for i in range(len(runs)))
    print(f"  {'stage':<48}{header} {'s/slice':>9}")
    for key in (k for k in runs[0] if not k.endswith(CPU)):
        cells = "".join(
            f"{run.get(key, 0.0):>9.3f}" + (f"{run[key + CPU]:>9.3f}" if key + CPU in run else f"{'-':>9}")
            for run in runs
        )
        per_slice = f"{runs[-1].get(key, 0.0) / n_slices:>9.4f}" if not key.startswith("ratio") else ""
        print(f"  {key:<48}{cells} {per_slice}")


def warm_up(volume: Volume, models: ModelSet, config: PipelineConfig) -> None:
    """One batch through each network: allocator, kernels and page cache before the first timing."""
    assert models.segmenter is not None
    windowed = window(volume.array[: config.segment.batch_size], volume.units, config.window)
    seg_size = models.segmenter_input_size or 256
    bare_unet_seconds({}, models.segmenter.module.eval(), windowed, config.segment.batch_size, seg_size)
    inputs = to_model_input(
        window(volume.array[: config.classify.batch_size], volume.units, config.window),
        None,
        models.input_size(config),
    )
    spec = models.spec
    explain_batch(models.classifier.module, spec, inputs, layers=spec.cam_layers)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--study", type=Path, default=DEFAULT_STUDY)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats of every measurement")
    parser.add_argument(
        "--batch-sizes", default="", help="also compare whole runs at these classifier batch sizes, e.g. 1,16"
    )
    parser.add_argument(
        "--release-freed-memory",
        action="store_true",
        help="runtime.hold_freed_memory=false: glibc's default malloc, freed blocks handed back (the A/B)",
    )
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    config = PipelineConfig().replace(
        {"runtime.device": "cpu", "runtime.hold_freed_memory": not args.release_freed_memory}
    )
    # as analyze_study does, but before anything is timed (the bare passes too)
    if config.runtime.hold_freed_memory:
        print(f"freed memory held for reuse (runtime.hold_freed_memory): {hold_freed_memory()}")
    reads: list[dict[str, float]] = [{} for _ in range(args.repeats)]
    for read in reads:
        volume = timed(read, "read study (load_study)", partial(load_study, args.study))
    n = volume.n_slices
    models = load_models(config, None, None)
    print(
        f"study {args.study.name}: {volume.array.shape} voxels, read in "
        + ", ".join(f"{r['read study (load_study)']:.2f}" for r in reads)
        + " s"
    )
    print(
        f"torch {torch.__version__}, cpu, threads {torch.get_num_threads()}; U-Net input "
        f"{models.segmenter_input_size} px, batch {config.segment.batch_size}; {models.spec.name} input "
        f"{models.input_size(config)} px, batch {config.classify.batch_size}, Grad-CAM layers "
        f"{', '.join(config.cam.layers or models.spec.cam_layers)}"
    )
    warm_up(volume, models, config)

    wholes: list[dict[str, float]] = []
    parts: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            whole = dict(reads[repeat])
            whole.update(whole_run(volume, models, config, Path(tmp) / f"run{repeat}"))
            wholes.append(whole)
            parts.append(stage_breakdown(volume, models, config))
    for whole, part in zip(wholes, parts, strict=True):
        for suffix in ("", CPU):  # wall, then process CPU time
            bare = part[BARE[0] + suffix] + part[BARE[1] + suffix]
            whole["bare passes (sum)" + suffix] = bare
            whole["ratio analyze_study / bare" + suffix] = whole["analyze_study total" + suffix] / bare
            end_to_end = sum(
                whole[key + suffix]
                for key in ("read study (load_study)", "analyze_study total", "write outputs")
            )
            whole["read + analyze + write" + suffix] = end_to_end
            whole["ratio read+analyze+write / bare" + suffix] = end_to_end / bare
            steps = sum(
                v
                for k, v in part.items()
                if k.endswith(CPU) == bool(suffix)
                and k.removesuffix(CPU) not in BARE
                and not k.startswith((" ", "sum of", "ratio"))
            )
            part["sum of sub-steps (bare rows excluded)" + suffix] = steps
            # each step beside its bare pass, moments apart: less exposed to a changing load
            part["ratio sub-steps / bare (interleaved)" + suffix] = steps / bare
    print_table(
        "whole run (StudyResult.timings_s: wall only; the ratio rows are plain ratios of wall, of CPU)",
        wholes,
        n,
    )
    print_table("stages taken apart (same arrays, same batch sizes)", parts, n)
    best = {
        key: min(run[key] for run in runs)
        for runs, key in [
            (wholes, "analyze_study total"),
            (wholes, "analyze_study total" + CPU),
            (parts, BARE[0]),
            (parts, BARE[0] + CPU),
            (parts, BARE[1]),
            (parts, BARE[1] + CPU),
        ]
    }
    print(
        f"\nbest of {len(wholes)} (s, wall / CPU): analyze_study {best['analyze_study total']:.2f} / "
        f"{best['analyze_study total' + CPU]:.2f}, bare passes "
        + " / ".join(f"{best[BARE[0] + suffix] + best[BARE[1] + suffix]:.2f}" for suffix in ("", CPU))
        + ", ratio "
        + " / ".join(
            f"{best['analyze_study total' + suffix] / (best[BARE[0] + suffix] + best[BARE[1] + suffix]):.3f}"
            for suffix in ("", CPU)
        )
    )

    if args.batch_sizes:
        for size in (int(b) for b in args.batch_sizes.split(",")):
            sized = config.replace({"classify.batch_size": size})
            start = time.perf_counter()
            analyze_study(volume, models, sized)
            print(f"classifier batch {size}: analyze_study {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
