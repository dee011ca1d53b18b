"""Release tooling, run from the repository root as ``python -m tools.<name>`` (not installed, not used at run time).

* ``default_models``: training manifests of the first default models and their installation;
* ``validate_defaults``: the figures of the first default models (docs/validation.md);
* ``validate_source_matched``: the figures of the shipped source-matched classifier (docs/models.md);
* ``phantom_cohort``: Corona score and HU measures against the true lesion volume of seeded phantoms;
* ``hu_measures``: the weights-free HU measures on real CT, old vs new.

Timing scripts stay in ``benchmarks/``.
"""
