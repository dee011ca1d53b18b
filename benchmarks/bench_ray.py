"""Throughput of one batch: one process vs a local Ray cluster of N workers (``run --ray``).

    .venv/bin/python benchmarks/bench_ray.py                      # 6 phantom studies, 2 workers
    .venv/bin/python benchmarks/bench_ray.py --studies DIR [DIR ...] --workers 2

The same studies, the shipped default models, into fresh output folders: first in this process
with ``--threads`` torch threads (default: every core), then on Ray with ``--workers`` workers of
``threads / workers`` threads each. Prints the wall time of each, the Ray cluster's start-up apart,
and the throughput ratio (studies/min on Ray / in one process). With 2 cores expect at most 2×.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import ray

from corona_ct.data.phantom import make_phantom
from corona_ct.data.writers import write_dicom_series
from corona_ct.pipeline.batch import run_batch
from corona_ct.pipeline.config import PipelineConfig
from corona_ct.pipeline.device import set_threads
from corona_ct.pipeline.modelset import load_models
from corona_ct.pipeline.ray_batch import RayOptions


def _phantom_studies(folder: Path, count: int) -> list[Path]:
    """``count`` phantom DICOM studies (48 slices of 192², every second one with lesions)."""
    paths = []
    for seed in range(count):
        path = folder / f"phantom{seed}"
        lesions = "mixed" if seed % 2 else "none"
        write_dicom_series(
            make_phantom(seed=seed, shape=(48, 192, 192), lesions=lesions), path, patient_id=f"P{seed}"
        )
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", nargs="*", type=Path, help="study folders (default: phantoms)")
    parser.add_argument("--phantoms", type=int, default=6, help="phantom studies when --studies is not given")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="threads of the one-process run"
    )
    args = parser.parse_args()

    config = PipelineConfig().replace({"runtime.device": "cpu"})
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        root = Path(tmp)
        studies = args.studies or _phantom_studies(root / "in", args.phantoms)
        set_threads(args.threads)
        models = load_models(config)

        start = time.perf_counter()
        local = run_batch(studies, root / "local", config, models, show_progress=False)
        local_s = time.perf_counter() - start

        per_worker = max(1, args.threads // args.workers)
        start = time.perf_counter()
        ray.init(num_cpus=args.workers * per_worker, include_dashboard=False, log_to_driver=False)
        startup_s = time.perf_counter() - start
        start = time.perf_counter()
        options = RayOptions(workers=args.workers, cpus_per_worker=per_worker)
        on_ray = run_batch(studies, root / "ray", config, models, show_progress=False, ray=options)
        ray_s = time.perf_counter() - start
        ray.shutdown()

    n = len(studies)
    failed = len(local.failures) + len(on_ray.failures)
    print(f"{n} studies ({failed} failed), cores: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
    print(
        f"one process, {args.threads} threads:        {local_s:7.1f} s  {60 * n / local_s:6.2f} studies/min"
    )
    print(
        f"Ray, {args.workers} workers × {per_worker} thread(s):  {ray_s:7.1f} s  {60 * n / ray_s:6.2f} studies/min"
    )
    print(f"  (+ {startup_s:.1f} s to start the local Ray cluster, paid once per run)")
    print(
        f"throughput ratio Ray / one process: {local_s / ray_s:.2f}× (with start-up: {local_s / (ray_s + startup_s):.2f}×)"
    )


if __name__ == "__main__":
    main()
