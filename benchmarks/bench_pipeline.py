"""Pipeline speed: seconds per slice for each stage and per study, batched vs one slice at a time.

    python benchmarks/bench_pipeline.py [--study ../shared/data/dicom/LIDC-IDRI-0001] [--device cpu]

Random classifier weights are used (speed does not depend on the weights). Prints a table
of seconds per slice per stage for each batch size and the one-batch / one-slice ratio.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DEFAULT_STUDY = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom" / "LIDC-IDRI-0001"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--study", type=Path, default=DEFAULT_STUDY)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--batch-sizes", default="1,16", help="comma-separated classifier batch sizes")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = parser.parse_args()

    import torch

    from corona_ct.pipeline.config import PipelineConfig
    from corona_ct.pipeline.ingest import load_study
    from corona_ct.pipeline.modelset import load_models
    from corona_ct.pipeline.run import analyze_study

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    volume = load_study(args.study)
    load_s = time.perf_counter() - start
    n = volume.n_slices
    print(
        f"study {args.study.name}: {volume.array.shape} slices, loaded in {load_s:.2f} s ({load_s / n:.4f} s/slice)"
    )
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")

    per_batch: dict[int, float] = {}
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        config = PipelineConfig().replace({"runtime.device": args.device, "classify.batch_size": batch})
        models = load_models(config, allow_untrained=True)
        analyze_study(volume, models, config)  # warm-up: allocator, kernels, page cache
        start = time.perf_counter()
        result = analyze_study(volume, models, config)
        total = time.perf_counter() - start
        per_batch[batch] = total
        evaluated = int(result.scores.evaluated.sum())
        print(f"\nbatch size {batch}: {total:.2f} s per study, {evaluated}/{n} slices evaluated")
        print(f"  {'stage':<18} {'s/study':>9} {'s/slice':>9}")
        for stage, seconds in result.timings_s.items():
            print(f"  {stage:<18} {seconds:>9.3f} {seconds / n:>9.4f}")
        print(f"  {'total':<18} {total:>9.3f} {total / n:>9.4f}")
    if len(per_batch) >= 2:
        sizes = sorted(per_batch)
        smallest, largest = sizes[0], sizes[-1]
        ratio = per_batch[smallest] / per_batch[largest]
        print(f"\nbatch {largest} vs batch {smallest}: {ratio:.2f}× faster per study")


if __name__ == "__main__":
    main()
