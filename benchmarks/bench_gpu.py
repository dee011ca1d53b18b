"""GPU throughput: a whole study end to end against the bare U-Net and ResNet-50 passes, batched, bf16.

    .venv/bin/python benchmarks/bench_gpu.py                          # cuda, 300 slices of 512²
    .venv/bin/python benchmarks/bench_gpu.py --device cpu --slices 16 --side 256 --repeats 1   # CI-size check

Target (issue 13): a 300-slice study in under 5 s on one GPU, with the model time within 2× of
the bare passes. Prints, per repeat (after one warm-up study):

* ``analyze_study`` end to end on a phantom study of ``--slices`` slices (``--side``² pixels), its
  stage timings, and the time to write its outputs;
* the bare passes on the same number of slices, batched as the config batches them, in bf16 on
  CUDA (fp32 on CPU): the U-Net forward at its trained input size, and the ResNet-50 forward plus
  the Grad-CAM backward (``autograd.grad`` of the summed score w.r.t. the hooked layers) at the
  classifier's input size;
* the ratios: end to end / bare, and the models' own stages (segment + classify) / bare.

The shipped default weights are used; speed does not depend on their values. On CUDA each timed
region is closed by ``torch.cuda.synchronize()``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from corona_ct.data.phantom import make_phantom
from corona_ct.data.writers import write_nifti
from corona_ct.pipeline.config import PipelineConfig
from corona_ct.pipeline.explain import explain_batch
from corona_ct.pipeline.ingest import load_study
from corona_ct.pipeline.modelset import load_models
from corona_ct.pipeline.report import write_study_outputs
from corona_ct.pipeline.run import analyze_study
from corona_ct.pipeline.summary import summary_values

T = TypeVar("T")


def _timed(device: torch.device, work: Callable[..., T], *args: object) -> tuple[float, T]:
    """(seconds ``work(*args)`` takes, its result), the device's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = work(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--side", type=int, default=512, help="pixels per slice side")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    config = PipelineConfig().replace({"runtime.device": args.device})
    device = torch.device(args.device)
    models = load_models(config)
    amp = config.runtime.amp and device.type == "cuda"
    spacing_yx = 350.0 / args.side  # a 35 cm field of view
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        phantom = make_phantom(
            seed=1,
            shape=(args.slices, args.side, args.side),
            spacing_mm=(1.0, spacing_yx, spacing_yx),
            lesions="mixed",
        )
        path = write_nifti(phantom, root / "study.nii.gz")
        print(f"phantom {args.slices}×{args.side}² written in {time.perf_counter() - start:.1f} s")
        volume = load_study(path, config.ingest)
        warm = load_study(
            write_nifti(make_phantom(seed=2, shape=(8, 128, 128)), root / "warm.nii.gz"), config.ingest
        )
        analyze_study(warm, models, config)  # warm-up: CUDA context, cuDNN autotuning, allocator

        n = volume.n_slices
        seg_size = models.segmenter_input_size or 256
        cls_size = models.input_size(config)
        seg_input = torch.rand(n, 1, seg_size, seg_size, device=device)
        cls_input = torch.rand(n, 3, cls_size, cls_size)
        seg_batch, cls_batch = config.segment.batch_size, config.classify.batch_size
        assert models.segmenter is not None, "the benchmark needs the U-Net (segment.method auto or unet)"
        unet = models.segmenter.module.eval()

        def unet_pass() -> None:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                for part in seg_input.split(seg_batch):
                    unet(part)

        def resnet_pass() -> None:
            for part in cls_input.split(cls_batch):
                explain_batch(
                    models.classifier.module, models.spec, part, amp=amp, layers=config.cam.layers or None
                )

        for repeat in range(1, args.repeats + 1):
            end_to_end, study = _timed(device, analyze_study, volume, models, config)
            values = summary_values("bench", "bench", study, threshold=config.classify.positive_threshold)
            write_s, _ = _timed(
                device, write_study_outputs, root / f"out{repeat}", study, models, config, values
            )
            unet_s, _ = _timed(device, unet_pass)
            resnet_s, _ = _timed(device, resnet_pass)
            bare = unet_s + resnet_s
            stages = study.timings_s
            model_stages = stages.get("segment", 0.0) + stages.get("classify+gradcam", 0.0)
            print(f"\nrepeat {repeat}: {n} slices, {args.side}², device {device}, bf16 {amp}")
            for name, seconds in stages.items():
                print(f"  {name:<24} {seconds:7.2f} s")
            print(f"  {'analyze_study total':<24} {end_to_end:7.2f} s   (target < 5 s on a GPU)")
            print(f"  {'write outputs':<24} {write_s:7.2f} s")
            print(f"  {'bare U-Net forward':<24} {unet_s:7.2f} s   batch {seg_batch}, {seg_size}²")
            print(f"  {'bare ResNet + Grad-CAM':<24} {resnet_s:7.2f} s   batch {cls_batch}, {cls_size}²")
            print(f"  ratio end to end / bare:          {end_to_end / bare:5.2f}")
            print(f"  ratio segment + classify / bare:  {model_stages / bare:5.2f}   (target < 2)")


if __name__ == "__main__":
    main()
