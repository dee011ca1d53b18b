"""``python -m corona_ct.pipeline``: the ``corona-ct`` command line."""

from corona_ct.pipeline.cli import main

raise SystemExit(main())
