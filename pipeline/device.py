"""Compute device selection and CPU thread limits, shared by the pipeline, training and cohort analysis."""

from __future__ import annotations

import torch

from corona_ct.pipeline.errors import ConfigError
from corona_ct.pipeline.threads import set_thread_env


def available_devices() -> list[str]:
    """The devices this machine offers, e.g. ``["cpu", "cuda:0 (NVIDIA H200)"]``."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            try:
                devices.append(f"cuda:{index} ({torch.cuda.get_device_name(index)})")
            except (RuntimeError, AssertionError):  # a GPU that cannot be queried is still listed
                devices.append(f"cuda:{index}")
    return devices


def _no_cuda_reason() -> str:
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    return "no CUDA GPU is visible (driver missing, or CUDA_VISIBLE_DEVICES hides them)"


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` as given.

    A device the machine lacks raises ConfigError naming it and listing the devices that exist.
    """
    choice = name.strip().lower()
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda" or choice.startswith("cuda:"):
        try:
            device = torch.device(choice)
        except RuntimeError:
            raise ConfigError(f"unknown device {name!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {name!r} was requested but CUDA is not available: {_no_cuda_reason()}; "
                f"devices here: {', '.join(available_devices())}; use --device cpu or --device auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {name!r} does not exist; this machine has {torch.cuda.device_count()} GPU(s): "
                f"{', '.join(available_devices())}"
            )
        return device
    raise ConfigError(f"unknown device {name!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'")


def set_threads(count: int) -> None:
    """Use at most ``count`` CPU threads: torch intra-op, and the BLAS/OpenMP pools already loaded.

    The environment variables are set too, for libraries and worker processes started later.
    """
    if count < 1:
        raise ConfigError(f"threads={count} is impossible; give 1 or more")
    set_thread_env(count)
    torch.set_num_threads(count)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return
    threadpool_limits(limits=count)
