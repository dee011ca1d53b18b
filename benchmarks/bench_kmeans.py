"""k-means timing: pipeline.cluster.kmeans (torch, CPU and CUDA) against scikit-learn's KMeans.

Data: N × D float32 vectors shaped like z-scored gradient-weighted slice features (8 latent
manifestations plus noise, then z-scored). For each k, both libraries run the same
number of k-means++ restarts, the same Lloyd iteration cap and tolerance, on the same
number of CPU threads. Printed: seconds per fit, the speed ratio sklearn / torch, and
the inertia ratio torch / sklearn (≤ 1.01 means torch found an equally good solution).

    python benchmarks/bench_kmeans.py                 # N = 100 000, D = 2048, k = 3..10
    python benchmarks/bench_kmeans.py --n 5000        # a quick run
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import numpy as np
import torch
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

from corona_ct.pipeline.cluster import KMeansResult, kmeans, zscore

T = TypeVar("T")


def synthetic_features(n: int, dim: int, *, n_latent: int = 8, seed: int = 0) -> torch.Tensor:
    """Z-scored mixture of ``n_latent`` Gaussian manifestations in ``dim`` dimensions (float32, CPU)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_latent, dim, generator=generator) * 0.8
    labels = torch.randint(n_latent, (n,), generator=generator)
    return zscore(centres[labels] + torch.randn(n, dim, generator=generator))


def _timed(fn: Callable[[], T]) -> tuple[T, float]:
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=100_000, help="number of slices (rows)")
    parser.add_argument("--dim", type=int, default=2048, help="feature dimension")
    parser.add_argument("--k-min", type=int, default=3)
    parser.add_argument("--k-max", type=int, default=10)
    parser.add_argument("--restarts", type=int, default=3, help="k-means++ restarts (n_init) per fit")
    parser.add_argument("--max-iter", type=int, default=100)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads for both")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    x_cpu = synthetic_features(args.n, args.dim, seed=args.seed)
    x_np = x_cpu.numpy()
    cuda = torch.cuda.is_available()
    x_cuda = x_cpu.cuda() if cuda else None
    print(
        f"k-means on {args.n} × {args.dim} float32, {args.restarts} restarts, max_iter {args.max_iter}, "
        f"tol {args.tol:g}, {args.threads} CPU thread(s); torch {torch.__version__}"
        + (f", CUDA {torch.cuda.get_device_name(0)}" if cuda else ", no CUDA")
    )
    # Warm-up outside the timings: thread pools, BLAS and first-call dispatch of both libraries.
    with threadpool_limits(limits=args.threads):
        KMeans(n_clusters=2, n_init=1, random_state=0).fit(x_np[:500])
    kmeans(x_cpu[:500], 2, restarts=1)
    header = f"{'k':>3} {'sklearn s':>10} {'torch-cpu s':>12} {'speed-up':>9} {'inertia ratio':>14} {'iters sk/torch':>15}"
    if cuda:
        header += f" {'torch-cuda s':>13} {'cuda speed-up':>14}"
    print(header)
    totals = {"sklearn": 0.0, "cpu": 0.0, "cuda": 0.0}

    def fit_torch(x: torch.Tensor, k: int) -> KMeansResult:
        result = kmeans(x, k, restarts=args.restarts, max_iter=args.max_iter, tol=args.tol, seed=args.seed)
        if x.is_cuda:
            torch.cuda.synchronize()  # time the work, not the kernel launches
        return result

    for k in range(args.k_min, args.k_max + 1):
        reference = KMeans(
            n_clusters=k, n_init=args.restarts, max_iter=args.max_iter, tol=args.tol, random_state=args.seed
        )
        with threadpool_limits(limits=args.threads):
            _, sk_seconds = _timed(partial(reference.fit, x_np))
        ours, cpu_seconds = _timed(partial(fit_torch, x_cpu, k))
        totals["sklearn"] += sk_seconds
        totals["cpu"] += cpu_seconds
        line = (
            f"{k:>3} {sk_seconds:>10.2f} {cpu_seconds:>12.2f} {sk_seconds / cpu_seconds:>8.2f}× "
            f"{ours.inertia / reference.inertia_:>14.4f} {reference.n_iter_:>7}/{ours.n_iter:<7}"
        )
        if x_cuda is not None:
            fit_torch(x_cuda, k)  # warm-up: kernels and the CUDA context
            _, cuda_seconds = _timed(partial(fit_torch, x_cuda, k))
            totals["cuda"] += cuda_seconds
            line += f" {cuda_seconds:>13.3f} {sk_seconds / cuda_seconds:>13.1f}×"
        print(line)
    summary = (
        f"total: sklearn {totals['sklearn']:.1f} s, torch-cpu {totals['cpu']:.1f} s "
        f"(sklearn / torch-cpu = {totals['sklearn'] / totals['cpu']:.2f})"
    )
    if cuda:
        summary += f", torch-cuda {totals['cuda']:.2f} s (sklearn / torch-cuda = {totals['sklearn'] / totals['cuda']:.1f})"
    print(summary)
    print(f"(n_iter of torch is that of the best restart; sklearn's likewise; numpy {np.__version__})")


if __name__ == "__main__":
    main()
