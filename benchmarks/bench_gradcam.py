"""Seconds per slice of multi-scale Grad-CAM: one batch vs one slice at a time.

    python benchmarks/bench_gradcam.py [--batch 8] [--size 224] [--repeats 3] [--device cpu]

Random-weight ResNet-50 (the cost does not depend on the weights). Prints the
median time per slice for each mode and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from corona_ct.models.checkpoint import load_classifier
from corona_ct.models.classifier import backbone_spec
from corona_ct.pipeline.device import resolve_device
from corona_ct.pipeline.explain import explain_batch


def _seconds(run: Callable[[], None], repeats: int, device: torch.device) -> float:
    timings = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    spec = backbone_spec("resnet50")
    model = load_classifier(None, device=device).module
    images = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    images = images.to(device)

    def batched() -> None:
        explain_batch(model, spec, images, amp=args.amp)

    def one_by_one() -> None:
        for k in range(args.batch):
            explain_batch(model, spec, images[k : k + 1], amp=args.amp)

    batched()  # warm-up: allocator and kernel selection
    one_by_one()
    per_slice_batched = _seconds(batched, args.repeats, device) / args.batch
    per_slice_single = _seconds(one_by_one, args.repeats, device) / args.batch
    print(f"device {device}, threads {args.threads}, input {args.size}², batch {args.batch}, amp {args.amp}")
    print(f"batched     {per_slice_batched:.3f} s/slice")
    print(f"one-by-one  {per_slice_single:.3f} s/slice")
    print(f"speed-up    {per_slice_single / per_slice_batched:.2f}×")


if __name__ == "__main__":
    main()
