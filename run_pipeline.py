"""Entry point: ``python run_pipeline.py --help`` (same as the ``corona-ct`` command)."""

try:
    from corona_ct.pipeline.cli import main
except ModuleNotFoundError as error:
    if error.name not in {"corona_ct", "corona_ct.pipeline", "corona_ct.pipeline.cli"}:
        raise
    raise SystemExit(
        "corona-ct is not installed: run `make venv` (or pip install -e .), then use that environment's python"
    ) from None

raise SystemExit(main())
