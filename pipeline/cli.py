"""Command line: ``corona-ct SUBCOMMAND`` (also ``python run_pipeline.py SUBCOMMAND``).

Each subcommand lives in ``pipeline/commands/<name>.py`` with ``register(subparsers)``;
heavy libraries (torch, pydicom) are imported inside the handlers so that ``--help``
is instant. Project errors become one line on stderr and exit code 2; a study
that fails inside a batch makes the batch exit with 1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
from collections.abc import Sequence

from corona_ct.pipeline import __version__
from corona_ct.pipeline.errors import CoronaCTError

COMMAND_MODULES = (
    "corona_ct.pipeline.commands.inspect",
    "corona_ct.pipeline.commands.run",
    "corona_ct.pipeline.commands.train",
    "corona_ct.pipeline.commands.analyze",
)

EXIT_OK, EXIT_STUDY_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # 128 + SIGINT, 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: files are written atomically, so finished results are kept."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated


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
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_USAGE
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return int(args.handler(args))
    except CoronaCTError as error:
        print(f"corona-ct: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as interrupt:
        print("corona-ct: interrupted; finished results are kept", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(interrupt, Terminated) else EXIT_INTERRUPTED
    except Exception as error:
        if args.debug:
            raise
        print(
            f"corona-ct: internal error ({type(error).__name__}: {error}); "
            "rerun with --debug for the traceback and please report it",
            file=sys.stderr,
        )
        return EXIT_USAGE
    finally:
        signal.signal(signal.SIGTERM, previous)
