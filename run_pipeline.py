"""Entry point: ``python run_pipeline.py --help`` (same as the ``corona-ct`` command)."""

from corona_ct.pipeline.cli import main

raise SystemExit(main())
