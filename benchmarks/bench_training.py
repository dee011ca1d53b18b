"""Classifier training and inference throughput (images per second), CPU and CUDA when available.

    python benchmarks/bench_training.py                      # resnet50 at the recipe's 224
    python benchmarks/bench_training.py --backbone vgg16 --input-size 112 --steps 3

Training images/s include the vectorised batch augmentation, forward, backward and
the optimizer step; inference images/s a no-grad forward. On CUDA, bf16 autocast
and channels_last (the training defaults) are compared with plain fp32. Random
weights and random images: throughput does not depend on what is learnt.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from corona_ct.data.datasets import as_network_input
from corona_ct.models.augment import augment_batch
from corona_ct.models.classifier import build_classifier
from corona_ct.models.fit import autocast
from corona_ct.models.train_classifier import TrainConfig


def _timed(step: Callable[[], None], steps: int, device: torch.device) -> float:
    """Seconds per call of ``step`` after one warm-up call."""
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def measure(
    config: TrainConfig, device: torch.device, batch: int, steps: int, amp: bool
) -> tuple[float, float]:
    """(training images/s, inference images/s) of ``config.backbone`` at ``config.input_size``."""
    torch.manual_seed(0)
    model = build_classifier(config.backbone, config.num_outputs, **config.backbone_options()).to(device)
    channels_last = amp and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    grey = torch.rand(batch, 1, config.input_size, config.input_size, device=device)
    labels = torch.randint(0, 2, (batch,), device=device).float()
    generator = torch.Generator().manual_seed(0)

    def prepare(images: torch.Tensor) -> torch.Tensor:
        inputs = as_network_input(images)
        return inputs.contiguous(memory_format=torch.channels_last) if channels_last else inputs

    def train_step() -> None:
        model.train()
        augmented, _ = augment_batch(grey, config, generator)
        with autocast(device, amp):
            logits = model(prepare(augmented))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0].float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    @torch.no_grad()
    def infer_step() -> None:
        model.eval()
        with autocast(device, amp):
            model(prepare(grey))

    return batch / _timed(train_step, steps, device), batch / _timed(infer_step, steps, device)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--recipe", default="gozes", choices=("gozes", "covid-ctset"))
    parser.add_argument("--input-size", type=int, help="default: the recipe's (224)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = {"backbone": args.backbone}
    if args.input_size:
        overrides["input_size"] = args.input_size
    config = TrainConfig.from_recipe(args.recipe, **overrides)
    print(f"{config.backbone} at {config.input_size}², batch {args.batch}, {args.steps} timed steps")
    cpu_train, cpu_infer = measure(config, torch.device("cpu"), args.batch, args.steps, amp=False)
    print(f"cpu ({args.threads} threads): train {cpu_train:8.1f} img/s   inference {cpu_infer:8.1f} img/s   "
          f"inference/train {cpu_infer / cpu_train:.1f}×")  # fmt: skip
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        fp32_train, fp32_infer = measure(config, cuda, args.batch, args.steps * 5, amp=False)
        bf16_train, bf16_infer = measure(config, cuda, args.batch, args.steps * 5, amp=True)
        print(f"cuda fp32:          train {fp32_train:8.1f} img/s   inference {fp32_infer:8.1f} img/s")
        print(f"cuda bf16+CL:       train {bf16_train:8.1f} img/s   inference {bf16_infer:8.1f} img/s   "
              f"bf16/fp32 train {bf16_train / fp32_train:.2f}×   cuda/cpu train {bf16_train / cpu_train:.0f}×")  # fmt: skip
    else:
        print("cuda: not available (CPU-only torch or no GPU)")


if __name__ == "__main__":
    main()
