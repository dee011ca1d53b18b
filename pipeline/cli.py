"""Command line: ``corona-ct SUBCOMMAND`` (also ``python run_pipeline.py SUBCOMMAND``).

Each subcommand lives in ``pipeline/commands/<name>.py`` with ``register(subparsers)``;
heavy libraries (torch, pydicom) are imported inside the handlers so that ``--help``
is instant. Project errors become one line on stderr and exit code 2; a study
that fails inside a batch makes the batch exit with 1; a missing dependency names
the package and how to install it. SIGTERM (``kill``, batch schedulers) is handled
like Ctrl-C: finished results are kept, exit code 143 (130 for Ctrl-C).

Nothing is written outside the output folder: matplotlib's and torch's caches go to
a temporary folder of the run, removed at exit, unless the user set
``MPLCONFIGDIR`` / ``TORCH_HOME`` / ``XDG_CACHE_HOME`` themselves.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType

from corona_ct.pipeline import __version__
from corona_ct.pipeline.commands.options import thread_limit_from_argv
from corona_ct.pipeline.errors import CoronaCTError
from corona_ct.pipeline.progress import log_progress_to_stderr
from corona_ct.pipeline.threads import set_thread_env

COMMAND_MODULES = (
    "corona_ct.pipeline.commands.inspect",
    "corona_ct.pipeline.commands.run",
    "corona_ct.pipeline.commands.train",
    "corona_ct.pipeline.commands.analyze",
)

EXIT_OK, EXIT_STUDY_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # 128 + SIGINT, 128 + SIGTERM

#: Cache locations redirected into the run's temporary folder when the user has not set them.
CACHE_VARIABLES = ("MPLCONFIGDIR", "TORCH_HOME", "XDG_CACHE_HOME")

#: Import name → distribution to install, where they differ.
_DISTRIBUTIONS = {
    "PIL": "pillow",
    "skimage": "scikit-image",
    "sklearn": "scikit-learn",
    "segmentation_models_pytorch": "segmentation-models-pytorch",
    "yaml": "pyyaml",
}
_OPTIONAL = {"timm": "xception"}  # extras of setup.cfg


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived; raised from the signal handler so the run stops like on Ctrl-C."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into ``Terminated`` while the command runs (main thread only)."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _caches_in_temporary_folder() -> Iterator[None]:
    """Point library caches at a temporary folder removed at exit, so nothing lands under $HOME."""
    unset = [name for name in CACHE_VARIABLES if not os.environ.get(name)]
    if not unset:
        yield
        return
    folder = tempfile.mkdtemp(prefix="corona-ct-cache-")
    for name in unset:
        os.environ[name] = str(Path(folder) / name.lower())
    try:
        yield
    finally:
        for name in unset:
            os.environ.pop(name, None)
        shutil.rmtree(folder, ignore_errors=True)


def missing_dependency_message(error: ModuleNotFoundError) -> str | None:
    """One line naming the missing third-party package and how to install it; None for our own modules."""
    module = (error.name or "").split(".")[0]
    if not module or module == "corona_ct":
        return None
    distribution = _DISTRIBUTIONS.get(module, module)
    if module in _OPTIONAL:
        how = f"pip install -e '.[{_OPTIONAL[module]}]' (an optional extra)"
    else:
        how = "`make venv` in the project folder (or pip install -c constraints.txt -e .)"
    return (
        f"the Python package {distribution!r} (module {module}) is not installed for {sys.executable}; "
        f"install the project's dependencies with {how}, or run the venv's python"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="corona-ct",
        description="COVID-19 pneumonia detection and quantification on chest CT. Research use only.",
    )
    parser.add_argument("--version", action="version", version=f"corona-ct {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks of unexpected errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    threads = thread_limit_from_argv(sys.argv[1:] if argv is None else argv)
    if threads is not None:
        set_thread_env(threads)  # before the parser's imports load numpy and its BLAS
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_USAGE
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    log_progress_to_stderr()  # one line per study (without a terminal) and per epoch
    try:
        with _caches_in_temporary_folder(), _sigterm_as_interrupt():
            return int(args.handler(args))
    except CoronaCTError as error:
        print(f"corona-ct: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as interrupt:
        how = "terminated (SIGTERM)" if isinstance(interrupt, Terminated) else "interrupted"
        print(f"corona-ct: {how}; finished results are kept", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(interrupt, Terminated) else EXIT_INTERRUPTED
    except Exception as error:
        if args.debug:
            raise
        message = missing_dependency_message(error) if isinstance(error, ModuleNotFoundError) else None
        if message is not None:
            print(f"corona-ct: error: {message}", file=sys.stderr)
            return EXIT_USAGE
        print(
            f"corona-ct: internal error ({type(error).__name__}: {error}); "
            "rerun with --debug for the traceback and please report it",
            file=sys.stderr,
        )
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
