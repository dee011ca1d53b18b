"""DICOM CT series: header scan, series planning with guardrails, pixel decoding to HU.

Modules, each usable alone, in the order they are used (lower ones never import higher ones):

- ``codecs``: transfer syntaxes, decoder availability, and the project's one DICOM
  pixel decoder (``decode_stored_values``: stored values, masked and sign-extended).
- ``header``: ``scan_file`` reads one file's header (no pixel data) into a
  ``SliceHeader`` or says why the file is skipped (not DICOM, DICOMDIR, report,
  screenshot...); series and orientation labels.
- ``plan``: ``plan_series`` checks one series from headers only (modality,
  localizers, matrix, orientation, duplicates, spacing, gantry tilt, size limits,
  transfer syntax, decoder) as a pipeline of named checks and returns the ordered
  slices, or raises the error a user can act on.
- ``describe``: ``describe_series`` summarises a series as a ``SeriesInfo`` for
  listing (``inspect``) and choosing; problems become ``problem``, not exceptions.
- ``read``: ``read_series`` decodes the planned slices and returns a ``Volume`` in
  HU, in the canonical (+S, +P, +L) array orientation.

pydicom does all reading; SimpleITK's series reader is not used because it
silently stacks stray slices, ignores gantry tilt, missing rescale and pixel
padding (see docs/ingest.md).
"""
