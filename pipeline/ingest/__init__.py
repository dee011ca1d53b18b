"""Find studies under input paths and load one CT series as a ``Volume``: the public API.

``discover(paths)`` walks the inputs and returns one ``StudyInput`` per study:
a NIfTI file, a folder of TIFF or PNG/JPEG slices, or one (PatientID,
StudyInstanceUID) of DICOM files found anywhere below a folder.
``choose_series`` picks the series to analyse by a documented rule,
``load_input`` reads it, ``load_study(path)`` does all three for one study.
A slice-image folder that is no CT volume (a set of independent 2D images, or
masks) is found but carries its ``problem``; ``refuse_slice_sets`` raises it
before models are loaded, ``collect_slice_images`` lists images for ``explain``.

Where the logic lives: ``discovery`` (walking folders, recognising inputs),
``select`` (which series is analysed), ``load`` (reading), ``slice_checks``
(one CT, a slice set or masks?), ``slice_sets`` (slice sets and ``explain``
images), ``dicom/`` (the DICOM reader), ``nifti`` and ``slices`` (the other
readers), ``deid`` (safe ids and names).

Example::

    from corona_ct.pipeline.ingest import load_study
    volume = load_study("LIDC-IDRI-0001")   # float32 HU, (z, y, x), +S +P +L
"""

from corona_ct.pipeline.ingest.dicom.describe import SeriesInfo
from corona_ct.pipeline.ingest.discovery import (
    StudyInput,
    discover,
    first_image_file,
    input_path_problem,
    is_output_folder,
)
from corona_ct.pipeline.ingest.load import load_all_series, load_input, load_study
from corona_ct.pipeline.ingest.select import choose_series, find_series, find_studies_holding
from corona_ct.pipeline.ingest.slice_sets import SliceImage, collect_slice_images, refuse_slice_sets

__all__ = [
    "SeriesInfo",
    "SliceImage",
    "StudyInput",
    "choose_series",
    "collect_slice_images",
    "discover",
    "find_series",
    "find_studies_holding",
    "first_image_file",
    "input_path_problem",
    "is_output_folder",
    "load_all_series",
    "load_input",
    "load_study",
    "refuse_slice_sets",
]
