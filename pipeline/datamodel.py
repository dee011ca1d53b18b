"""Typed objects that flow between the pipeline stages.

Array convention everywhere: numpy arrays indexed (z, y, x) = (slice, row, column).
World coordinates are DICOM patient coordinates (LPS, millimetres). All
dataclasses are frozen and their arrays are made read-only, so a stage can never
silently modify what another stage holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from corona_ct.pipeline.errors import GeometryError, UnsupportedInputError

FloatArray = npt.NDArray[np.float32]
MaskArray = npt.NDArray[np.uint8]
BoolArray = npt.NDArray[np.bool_]

#: Label values of a lung mask.
BACKGROUND, RIGHT_LUNG, LEFT_LUNG = 0, 1, 2
#: A study's status (summary.csv, report.json): analysed; not assessable (no plausible lungs,
#: no call made, see :mod:`pipeline.assess`); failed.
STATUS_OK, STATUS_NOT_ASSESSABLE, STATUS_FAILED = "ok", "not-assessable", "failed"


def _readonly(array: np.ndarray) -> None:
    array.flags.writeable = False


@dataclass(frozen=True)
class Geometry:
    """Voxel grid of a (z, y, x) array in patient space.

    ``spacing_mm`` and the rows of ``axes_lps`` are in array order (z, y, x):
    ``axes_lps[0]`` is the LPS unit vector along increasing slice index,
    ``axes_lps[1]`` along increasing row index, ``axes_lps[2]`` along increasing
    column index. ``origin_lps`` is the LPS position (mm) of voxel (0, 0, 0).
    """

    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    origin_lps: tuple[float, float, float] = (0.0, 0.0, 0.0)
    axes_lps: tuple[tuple[float, float, float], ...] = (
        (0.0, 0.0, 1.0),
        (0.0, 1.0, 0.0),
        (1.0, 0.0, 0.0),
    )

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise GeometryError(f"volume shape {self.shape} is not a 3D (z, y, x) shape")
        if len(self.spacing_mm) != 3 or not all(s > 0 and np.isfinite(s) for s in self.spacing_mm):
            raise GeometryError(f"voxel spacing {self.spacing_mm} mm must be three positive numbers")

    @property
    def voxel_volume_mm3(self) -> float:
        """Volume of one voxel in mm³."""
        return float(np.prod(self.spacing_mm))

    @property
    def voxel_ml(self) -> float:
        """Volume of one voxel in millilitres (= cm³)."""
        return self.voxel_volume_mm3 / 1000.0

    def affine_lps(self) -> npt.NDArray[np.float64]:
        """4×4 matrix mapping (z, y, x, 1) indices to LPS millimetres."""
        axes = np.asarray(self.axes_lps, dtype=np.float64)  # rows: array axes
        affine = np.eye(4)
        affine[:3, :3] = (axes * np.asarray(self.spacing_mm)[:, None]).T
        affine[:3, 3] = self.origin_lps
        return affine

    def affine_ras(self) -> npt.NDArray[np.float64]:
        """NIfTI affine mapping (x, y, z) = (i, j, k) indices to RAS millimetres.

        Use with the array transposed to (x, y, z), as NIfTI stores it.
        """
        lps = self.affine_lps()
        ijk_from_kji = np.eye(4)[[2, 1, 0, 3]].T  # reorders (i, j, k) -> (k, j, i)
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps @ ijk_from_kji

    def slice_positions_mm(self) -> npt.NDArray[np.float64]:
        """Signed position of each slice along the slice axis, in mm (z of the report)."""
        normal = np.asarray(self.axes_lps[0], dtype=np.float64)
        first = float(np.dot(np.asarray(self.origin_lps), normal))
        return first + np.arange(self.shape[0], dtype=np.float64) * self.spacing_mm[0]


@dataclass(frozen=True)
class SourceOrder:
    """How a canonical (z, y, x) array maps back to the voxel order of its source file.

    ``source = np.flip(canonical.transpose(perm), axis=flip_axes)``; ``affine`` is the
    source file's own 4×4 affine (NIfTI RAS), written back unchanged so that
    outputs overlay the input voxel for voxel.
    """

    perm: tuple[int, int, int]
    flip_axes: tuple[int, ...]
    affine: tuple[tuple[float, ...], ...]

    def to_source(self, canonical: np.ndarray) -> np.ndarray:
        """Re-order a canonical (z, y, x) array into the source file's voxel order."""
        return np.flip(canonical.transpose(self.perm), axis=self.flip_axes)


@dataclass(frozen=True)
class Volume:
    """One CT series as the pipeline sees it.

    ``units == "HU"``: ``array`` holds Hounsfield units. ``units == "window"``: the
    input was pre-windowed 8-bit images (PNG/JPEG); ``array`` holds [0, 1] grey
    values and there are no HU. ``spacing_known`` is False when the source carried
    no physical spacing (slice images); volumes in cm³ are then in nominal 1 mm voxels.
    ``meta`` holds only whitelisted technical fields, never patient identity.
    """

    array: FloatArray
    units: Literal["HU", "window"]
    geometry: Geometry
    study_id: str
    source: str
    meta: Mapping[str, str | int | float] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    spacing_known: bool = True
    source_order: SourceOrder | None = None

    def __post_init__(self) -> None:
        if self.array.dtype != np.float32 or self.array.ndim != 3:
            raise GeometryError(
                f"{self.source}: volume array must be float32 (z, y, x), got {self.array.dtype} "
                f"with shape {self.array.shape}"
            )
        if tuple(self.array.shape) != tuple(self.geometry.shape):
            raise GeometryError(
                f"{self.source}: array shape {self.array.shape} differs from geometry {self.geometry.shape}"
            )
        _readonly(self.array)

    @property
    def hu(self) -> FloatArray:
        """The HU array; refuses pre-windowed slice images, which have no HU."""
        if self.units != "HU":
            raise UnsupportedInputError(
                f"{self.source}: this is a pre-windowed image stack without Hounsfield units; "
                "HU-based measures need CT (DICOM, NIfTI or raw TIFF) input"
            )
        return self.array

    @property
    def n_slices(self) -> int:
        return int(self.array.shape[0])


@dataclass(frozen=True)
class LungMask:
    """Lung labels on the CT grid: 0 background, 1 right lung, 2 left lung."""

    labels: MaskArray
    method: str  # "unet" or "classical"
    warnings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _readonly(self.labels)

    @property
    def lungs(self) -> BoolArray:
        return self.labels > 0


@dataclass(frozen=True)
class SliceScores:
    """Per-slice COVID probability; NaN where the slice was not evaluated (no lung)."""

    probs: FloatArray  # (z,)
    evaluated: BoolArray  # (z,)

    def __post_init__(self) -> None:
        _readonly(self.probs)
        _readonly(self.evaluated)


@dataclass(frozen=True)
class CamStack:
    """Fused Grad-CAM maps in [0, 1] on the CT grid (zeros on slices not evaluated)."""

    maps: FloatArray  # (z, y, x)
    layers: tuple[str, ...]
    fusion: str = "product"

    def __post_init__(self) -> None:
        _readonly(self.maps)


@dataclass(frozen=True)
class SliceFeatures:
    """Per evaluated slice: pooled last-conv features and their Grad-CAM channel weights."""

    slice_index: npt.NDArray[np.int64]  # (n,)
    features: FloatArray  # (n, C) global-average-pooled activations of the last conv layer
    weights: FloatArray  # (n, C) Grad-CAM weights (spatial mean of the gradients)


@dataclass(frozen=True)
class SideSeverity:
    """One lung's share of :class:`Severity` (cm³; percent of that lung's volume or assessed part)."""

    lung_volume_cm3: float
    corona_score_cm3: float  # the counted Grad-CAM voxels inside this lung
    affected_percent: float
    ggo_percent: float | None = None  # None without HU
    consolidation_percent: float | None = None


@dataclass(frozen=True)
class Severity:
    """Severity measures in physical units (cm³ and percent of lung volume)."""

    corona_score_cm3: float
    corona_score_in_lung_cm3: float
    lung_volume_cm3: float
    affected_percent: float
    right: SideSeverity
    left: SideSeverity
    ggo_percent: (
        float | None
    )  # % of assessed lung in ground glass (pipeline.hu_maps.hu_maps); None without HU
    consolidation_percent: float | None
    positive_slices: int


@dataclass(frozen=True)
class StudyFailure:
    """Why a study could not be analysed."""

    study_id: str
    source: str
    stage: str
    error_type: str
    message: str


@dataclass(frozen=True)
class LungCheck:
    """What the not-assessable gate (:mod:`pipeline.assess`) measured; ``reasons`` empty when assessable."""

    lung_volume_cm3: float  # nominal 1 mm voxels when the spacing is unknown
    largest_area_cm2: float | None  # largest per-slice lung cross-section; None when spacing unknown
    largest_body_fraction: float | None  # largest per-slice lung / body area; only when spacing unknown
    median_hu: float | None  # None without HU or without lung voxels
    slices_with_lung: int  # slices with any lung voxel
    lung_slices: int  # slices passing the area (or body-fraction) rule
    n_slices: int
    reasons: tuple[str, ...]
    rules: tuple[tuple[str, float], ...]  # the gate's limits: (name, value) in cm², fraction, HU, slices

    @property
    def assessable(self) -> bool:
        return not self.reasons

    @property
    def reason(self) -> str | None:
        """One human-readable line, or None when the study is assessable."""
        return "; ".join(self.reasons) if self.reasons else None

    def to_dict(self) -> dict[str, object]:
        """JSON-ready, rounded."""
        return {
            "assessable": self.assessable,
            "reason": self.reason,
            "lung_volume_cm3": round(self.lung_volume_cm3, 3),
            "largest_area_cm2": None if self.largest_area_cm2 is None else round(self.largest_area_cm2, 2),
            "largest_body_fraction": (
                None if self.largest_body_fraction is None else round(self.largest_body_fraction, 4)
            ),
            "median_hu": self.median_hu,
            "slices_with_lung": self.slices_with_lung,
            "lung_slices": self.lung_slices,
            "n_slices": self.n_slices,
            "rules": dict(self.rules),
        }


@dataclass(frozen=True)
class StudyResult:
    """Everything the pipeline computed for one study.

    A study whose lungs fail the gate (:mod:`pipeline.assess`) is not classified: no slice is
    evaluated, its maps are zero, and ``severity`` and ``case_probability`` are None.
    """

    volume: Volume
    lung_mask: LungMask
    lung_check: LungCheck
    scores: SliceScores
    cams: CamStack
    features: SliceFeatures
    thumbnails: npt.NDArray[np.uint8]  # (n_evaluated, 112, 112): windowed lung-ROI crops
    cam_thumbnails: npt.NDArray[np.uint8]  # (n_evaluated, 112, 112): fused map × 255 on the crop
    severity: Severity | None
    case_probability: float | None
    timings_s: dict[str, float]  # seconds per stage
    warnings: tuple[str, ...]

    @property
    def assessable(self) -> bool:
        return self.lung_check.assessable

    @property
    def status(self) -> str:
        """``ok`` or ``not-assessable``."""
        return STATUS_OK if self.assessable else STATUS_NOT_ASSESSABLE

    @property
    def not_assessable_reason(self) -> str | None:
        return self.lung_check.reason


def empty_map_positive_slices(result: StudyResult, threshold: float) -> BoolArray:
    """(z,) bool: slices called positive (p ≥ ``threshold``) whose fused Grad-CAM map is all zero."""
    scores = result.scores
    with np.errstate(invalid="ignore"):  # NaN probabilities of unevaluated slices compare False
        positive = scores.evaluated & (scores.probs >= threshold)
    maps = np.asarray(result.cams.maps).reshape(positive.shape[0], -1)
    return positive & ~maps.any(axis=1)
