"""Batch on a Ray cluster: the studies of one batch spread over workers that load the models once.

``corona-ct run STUDIES --output OUT --ray [ADDRESS]``: without an address a local cluster is
started for the run (and stopped after it); with one (``ray start --head`` printed it; ``auto``
finds a cluster started on this machine) the batch joins that cluster.

The driver (the ``run`` process, :func:`pipeline.batch.run_batch`) keeps what makes a batch safe:
the output lock, discovery and study ids, the resume checks, summary.csv after every finished
study. Workers are Ray actors, one per ``cpus_per_worker`` CPUs, each holding the models loaded
once; each runs one study at a time with :func:`pipeline.study_job.run_study_job`, which writes
that study's outputs and, last, its completion record, exactly as a local run does. So a batch
interrupted at any point and run again with ``--resume`` ends with every study done once.

A study that fails, or whose worker dies (killed, out of memory, node lost; a new worker replaces
it and loads the models), costs that study only: it is queued again, once, behind the others. A second failure
is its row's error. A failure to write the output folder stops the batch, as in a local run.

On a multi-node cluster every node must see the inputs and the output folder at the same paths
(a shared filesystem) and have corona-ct with the same weights: a worker that cannot see the
output folder, or whose weights differ from the driver's, refuses to start and the batch stops.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corona_ct.pipeline.config import PipelineConfig
from corona_ct.pipeline.device import set_threads
from corona_ct.pipeline.errors import ConfigError, CoronaCTError, OutputError, StageError
from corona_ct.pipeline.modelset import ModelSet, load_models, models_key
from corona_ct.pipeline.study_job import JobOptions, JobOutcome, StudyJob, record_failure, run_study_job

log = logging.getLogger(__name__)

#: Attempts per study: the first and one retry.
ATTEMPTS = 2
#: How long (s) the batch waits for a replacement worker when no other worker is running a study.
START_TIMEOUT_S = 600.0

INSTALL_HINT = "Ray is an optional extra: pip install -c constraints.txt 'corona-ct[ray]' (or make venv, whose dev extra has it)"


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide a batch runs on Ray."""

    address: str | None = (
        None  # None: start a local cluster for this run; else join (``auto``, ``host:6379``)
    )
    workers: int | None = None  # None: as many as the cluster's CPUs allow
    cpus_per_worker: float = 1.0  # Ray CPUs per worker; also its torch threads (at least 1)
    gpus_per_worker: float = 0.0  # 1 (or 0.5 to share a GPU) on a GPU cluster, with runtime.device=cuda/auto

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--ray-workers {self.workers}: give at least 1")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise ConfigError("--ray-cpus-per-worker must be > 0 and --ray-gpus-per-worker >= 0")


class StudyWorker:
    """A Ray actor: the models loaded once, then one study at a time (:func:`run_study_job`)."""

    def __init__(
        self,
        config: PipelineConfig,
        weights: tuple[Path | None, Path | None],
        allow_untrained: bool,  # the driver runs without classifier weights
        expected_models_key: str,
        options: JobOptions,
        threads: int,
    ) -> None:
        self.problem = ""  # why this worker cannot run studies; reported by ready()
        set_threads(threads)  # torch, BLAS and the z-slab threads of pipeline.morphology
        self.config, self.options = config, options
        try:
            if not options.output.is_dir():
                raise OutputError(
                    f"output folder {options.output} is not visible on this node; --ray needs the inputs and "
                    "the output folder on a filesystem every node mounts at the same path"
                )
            self.models = load_models(config, *weights, allow_untrained=allow_untrained, use_defaults=False)
            if models_key(self.models) != expected_models_key:
                raise ConfigError(
                    "this node's model weights differ from the driver's (another corona-ct version or "
                    "weights file); install the same version and weights on every node"
                )
        except CoronaCTError as error:
            self.problem = f"{type(error).__name__}: {error}"

    def ready(self) -> tuple[str, int, str]:
        """(host name, process id, problem or "") once the models are loaded."""
        return platform.node(), os.getpid(), self.problem

    def run(self, job: StudyJob) -> JobOutcome:
        """Analyse and write one study."""
        return run_study_job(job, self.models, self.config, self.options)


def run_on_ray(
    jobs: Sequence[StudyJob],
    models: ModelSet,
    config: PipelineConfig,
    options: JobOptions,
    ray_options: RayOptions,
    *,
    allow_untrained: bool = False,
) -> Iterator[JobOutcome]:
    """Run ``jobs`` on Ray workers; yield each study's outcome as it finishes (in finishing order)."""
    if not jobs:
        return
    try:
        import ray  # optional dependency, loaded only for --ray
    except ImportError as error:
        raise ConfigError(f"--ray: Ray is not installed. {INSTALL_HINT}") from error
    started_here = _connect(ray, ray_options)
    try:
        workers, start = _start_workers(ray, len(jobs), models, config, options, ray_options, allow_untrained)
        yield from _dispatch(ray, workers, start, jobs)
    finally:
        if started_here:
            ray.shutdown()


def _connect(ray: Any, ray_options: RayOptions) -> bool:
    """Join the cluster at ``address``, or start a local one; True when this run started it."""
    if ray.is_initialized():
        return False
    quiet: dict[str, Any] = {
        "log_to_driver": False,
        "logging_level": logging.WARNING,
        "configure_logging": False,
    }
    if ray_options.address is None:
        cpus = max(os.cpu_count() or 1, int(ray_options.cpus_per_worker * (ray_options.workers or 1)))
        ray.init(num_cpus=cpus, include_dashboard=False, **quiet)
        log.info("Ray: started a local cluster with %d CPUs", cpus)
        return True
    how = "start one with `ray start --head` and pass the address it prints, or give --ray without an address"
    unreachable = _unreachable(ray_options.address)
    if unreachable:  # ray.init would retry for minutes
        raise ConfigError(f"--ray {ray_options.address}: no Ray cluster answers there ({unreachable}); {how}")
    try:
        ray.init(address=ray_options.address, **quiet)
    except (ConnectionError, RuntimeError) as error:
        raise ConfigError(
            f"--ray {ray_options.address}: cannot join the Ray cluster ({error}); {how}"
        ) from error
    return False


def _unreachable(address: str, timeout_s: float = 5.0) -> str:
    """Why nothing listens at a ``host:port`` address ("" when something does, or for ``auto``/``ray://``)."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return ""
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return ""
    except OSError as error:
        return error.strerror or str(error)


def _start_workers(
    ray: Any,
    n_jobs: int,
    models: ModelSet,
    config: PipelineConfig,
    options: JobOptions,
    ray_options: RayOptions,
    allow_untrained: bool,
) -> tuple[list[Any], Callable[[], Any]]:
    """Start the workers and wait until each has its models; returns them and how to start one more.

    A worker that cannot start (models, weights, output folder not visible) stops the batch.
    """
    cluster_cpus = float(ray.cluster_resources().get("CPU", 1.0))
    count = ray_options.workers or max(1, int(cluster_cpus // ray_options.cpus_per_worker))
    count = min(count, n_jobs)
    actor = ray.remote(
        num_cpus=ray_options.cpus_per_worker,
        num_gpus=ray_options.gpus_per_worker,
        max_restarts=0,  # a dead worker is replaced by _dispatch, once the new one has its models
        max_task_retries=0,
    )(StudyWorker)
    weights = (models.classifier.path, models.segmenter.path if models.segmenter is not None else None)
    threads = max(1, int(ray_options.cpus_per_worker))
    key = models_key(models)

    def start() -> Any:
        return actor.remote(config, weights, allow_untrained, key, options, threads)

    workers = [start() for _ in range(count)]
    for ready in ray.get([worker.ready.remote() for worker in workers]):
        _check_ready(ready)
    log.info(
        "Ray: %d worker(s), %g CPU each, models loaded once per worker", count, ray_options.cpus_per_worker
    )
    return workers, start


def _check_ready(ready: tuple[str, int, str]) -> None:
    host, pid, problem = ready
    if problem:
        raise ConfigError(f"Ray worker on {host} (pid {pid}) cannot run studies: {problem}")


def _dispatch(
    ray: Any, workers: list[Any], start: Callable[[], Any], jobs: Sequence[StudyJob]
) -> Iterator[JobOutcome]:
    """One study in flight per worker; a failed study or a dead worker's study is queued again, once.

    A dead worker is replaced by a new one, which gets studies once its models are loaded.
    """
    queue: deque[StudyJob] = deque(jobs)
    attempts: dict[str, int] = {}
    idle = list(workers)
    studies: dict[Any, tuple[Any, StudyJob]] = {}  # in flight: result ref → (worker, job)
    starting: dict[Any, Any] = {}  # replacement workers loading their models: ready ref → worker
    while queue or studies:
        while idle and queue:
            worker, job = idle.pop(), queue.popleft()
            attempts[job.item.study_id] = attempts.get(job.item.study_id, 0) + 1
            studies[worker.run.remote(job)] = (worker, job)
        done, _ = ray.wait([*studies, *starting], num_returns=1, timeout=None if studies else START_TIMEOUT_S)
        if not done:
            raise ConfigError(
                f"no Ray worker could be restarted within {START_TIMEOUT_S:.0f} s (the cluster has no free CPUs "
                "or GPUs for it); finished studies are kept: rerun with --resume"
            )
        ref = done[0]
        if ref in starting:
            worker = starting.pop(ref)
            try:
                _check_ready(ray.get(ref))
            except ray.exceptions.RayActorError as error:
                raise ConfigError(
                    f"a replacement Ray worker died while loading its models ({type(error).__name__}); "
                    "finished studies are kept: rerun with --resume"
                ) from error
            idle.append(worker)
            continue
        worker, job = studies.pop(ref)
        outcome, why, worker_died = _result(ray, ref)
        if worker_died:
            worker = start()
            starting[worker.ready.remote()] = worker
        else:
            idle.append(worker)
        if why and attempts[job.item.study_id] < ATTEMPTS:
            log.warning("%s: %s; retrying it once", job.item.study_id, why)
            queue.append(job)
            continue
        if why:
            log.warning("%s: %s again; giving up on it", job.item.study_id, why)
        yield outcome if outcome is not None else _worker_failure(job, why)


def _result(ray: Any, ref: Any) -> tuple[JobOutcome | None, str, bool]:
    """(the study's outcome, or None when its worker did not return one; why it should be retried,
    or ""; whether its worker died)."""
    try:
        outcome: JobOutcome = ray.get(ref)
    except ray.exceptions.RayActorError as error:
        return None, f"its Ray worker died ({type(error).__name__})", True
    except ray.exceptions.RayTaskError as error:
        cause = error.cause
        if isinstance(cause, OutputError):
            raise cause from None  # the output folder cannot be written: stop, as a local run does
        return None, f"unexpected {type(cause).__name__} in its Ray worker: {cause}", False
    if outcome.failures:
        return outcome, f"failed ({outcome.failures[0].message})", False
    return outcome, "", False


def _worker_failure(job: StudyJob, why: str) -> JobOutcome:
    """The failed row of a study whose worker returned nothing (it died, or raised an unexpected error)."""
    outcome = JobOutcome()
    record_failure(outcome, job.item.study_id, job.source, StageError("worker", job.item.study_id, why))
    return outcome
