"""Options that every computing subcommand spells the same way: ``-o/--output``, ``--device``, ``--threads``.

``add_compute_options`` adds them to a subparser; ``apply_compute_options`` is the first
call of its handler: it limits the thread pools and checks that the device exists before
any model or data is loaded. ``thread_limit_from_argv`` lets ``cli.main`` set the thread
environment variables before numpy is imported (BLAS reads them once, at load time).
``--set``'s help is generated from the config dataclasses (:func:`set_option_help`).
This module imports nothing heavy, so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path

DEVICE_HELP = (
    "compute device: auto (CUDA when available, else CPU; the default), cpu, cuda or cuda:N "
    "(GPU number N); a device this machine lacks is an error that lists the ones it has"
)
THREADS_HELP = (
    "CPU threads for torch (intra-op) and numpy/BLAS (default: the libraries' own choice, "
    "usually one per core); at least 1"
)
_DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def device_name(text: str) -> str:
    """argparse type of ``--device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (spelling only)."""
    name = text.strip().lower()
    if not _DEVICE_PATTERN.fullmatch(name):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use auto, cpu, cuda or cuda:N")
    return name


def thread_count(text: str) -> int:
    """argparse type of ``--threads``: an integer of at least 1."""
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of threads") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"{count} threads is impossible; give 1 or more")
    return count


def add_output_option(
    parser: argparse.ArgumentParser, help_text: str, *, default: Path | None = None
) -> None:
    """``-o/--output DIR``: required unless a default is given."""
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        required=default is None,
        default=default,
        metavar="DIR",
        help=help_text if default is None else f"{help_text} (default: {default})",
    )


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """``--device auto|cpu|cuda|cuda:N`` (default None: the config's or ``auto``)."""
    parser.add_argument("--device", type=device_name, metavar="DEVICE", help=DEVICE_HELP)


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """``--threads N`` (N ≥ 1)."""
    parser.add_argument("--threads", type=thread_count, metavar="N", help=THREADS_HELP)


def add_compute_options(
    parser: argparse.ArgumentParser, output_help: str, *, output_default: Path | None = None
) -> None:
    """``-o/--output``, ``--device`` and ``--threads``, with the same spelling and help everywhere."""
    add_output_option(parser, output_help, default=output_default)
    add_device_option(parser)
    add_threads_option(parser)


def apply_compute_options(args: argparse.Namespace) -> str:
    """Limit threads to ``--threads`` and check ``--device``; returns the device name to use.

    Raises ConfigError naming the device and the devices that exist, before anything is loaded.
    Without ``--device`` the answer is ``"auto"`` (a config file's ``runtime.device`` still
    applies for ``run``/``explain``/``demo``, which check it before loading the models).
    A command without ``--device`` (statistics on numbers) only has its threads limited.
    """
    from corona_ct.pipeline.device import resolve_device, set_threads

    if getattr(args, "threads", None) is not None:
        set_threads(args.threads)
    name: str = getattr(args, "device", None) or "auto"
    if hasattr(args, "device"):
        resolve_device(name)
    return name


def thread_limit_from_argv(argv: Sequence[str]) -> int | None:
    """``N`` of ``--threads N`` / ``--threads=N`` in a command line, when it is a valid count.

    Read before the parser is built (building it imports numpy). An invalid value gives
    None here; the parser then reports it.
    """
    for index, item in enumerate(argv):
        if item == "--":
            break
        value: str | None = None
        if item == "--threads" and index + 1 < len(argv):
            value = argv[index + 1]
        elif item.startswith("--threads="):
            value = item.partition("=")[2]
        if value is not None:
            try:
                return thread_count(value)
            except argparse.ArgumentTypeError:
                return None
    return None


def set_option_help() -> str:
    """Help of ``--set``: every config section with its fields, read from the config dataclasses."""
    import dataclasses

    from corona_ct.pipeline.config import PipelineConfig

    sections = []
    for section in dataclasses.fields(PipelineConfig):
        default = getattr(PipelineConfig(), section.name)
        names = ", ".join(field.name for field in dataclasses.fields(default))
        sections.append(f"{section.name} ({names})")
    return (
        "override one config value, e.g. --set cam.activation_threshold=0.5 (repeatable; values are "
        "JSON, else text; defaults in pipeline/config.py). Sections and fields: " + "; ".join(sections)
    )
