"""Seeded synthetic chest CT phantom with known lungs and lesions: ``make_phantom`` and its ``Phantom``.

The phantom is the project's main test asset: every array is integer Hounsfield
units (int16), so DICOM, NIfTI and TIFF round trips are exact, and every truth
(lung labels, lesion mask, lesion volumes in mm³) is known voxel for voxel.

Anatomy is laid out in coordinates normalised to the field of view, so a small
test grid (12×64×64) and the default (32×192×192, 5 × 1.6 × 1.6 mm) hold the same
chest at different sizes. Arrays are (z, y, x) in the canonical orientation:
slice index towards the head, row index towards the back, column index towards
the patient's left (patient's right lung = low column index = label 1).

Where the parts live: :mod:`data.phantom_anatomy` (tissue codes, HU, the
lesion-free chest), :mod:`data.phantom_lesions` (``LesionSpec``, drawing and
painting lesions), :mod:`data.writers` (DICOM, NIfTI, TIFF and PNG files).

Example:
    >>> phantom = make_phantom(seed=1, shape=(12, 64, 64), lesions="mixed")
    >>> bool(np.all(phantom.lung_labels[phantom.lesion_mask] > 0))
    True
"""

from __future__ import annotations

import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from corona_ct.data.phantom_anatomy import LESION, IntArray, build_anatomy
from corona_ct.data.phantom_lesions import LESION_CODE, LesionSpec, draw_lesion_specs, paint_lesions
from corona_ct.pipeline.datamodel import LEFT_LUNG, RIGHT_LUNG, Geometry, Volume
from corona_ct.pipeline.errors import ConfigError

_DEFAULT_SHAPE = (32, 192, 192)
_DEFAULT_SPACING = (5.0, 1.6, 1.6)


@dataclass(frozen=True)
class Phantom:
    """A synthetic chest CT and its ground truth, all on one (z, y, x) grid.

    ``hu`` int16 Hounsfield units; ``lung_labels`` 0 background, 1 right, 2 left
    lung (vessels and lesions included, airways excluded); ``lesion_mask`` and
    ``lesion_kind`` (0 none, 1 ground glass, 2 consolidation); ``tissue`` codes of
    ``TISSUE_NAMES``. Volumes are exact voxel counts × voxel volume, in mm³.
    """

    hu: IntArray
    geometry: Geometry
    lung_labels: npt.NDArray[np.uint8]
    lesion_mask: npt.NDArray[np.bool_]
    lesion_kind: npt.NDArray[np.uint8]
    tissue: npt.NDArray[np.uint8]
    lesion_specs: tuple[LesionSpec, ...]
    seed: int
    lesion_volume_mm3: float
    lesion_volume_by_kind_mm3: Mapping[str, float]
    lesion_volume_by_side_mm3: Mapping[str, float]
    lung_volume_mm3: float
    lung_volume_by_side_mm3: Mapping[str, float]

    def __post_init__(self) -> None:
        for array in (self.hu, self.lung_labels, self.lesion_mask, self.lesion_kind, self.tissue):
            array.flags.writeable = False

    @property
    def lesion_volume_ml(self) -> float:
        return self.lesion_volume_mm3 / 1000.0

    @property
    def lung_volume_ml(self) -> float:
        return self.lung_volume_mm3 / 1000.0

    @property
    def affected_percent(self) -> float:
        """Lesion volume as a percentage of lung volume."""
        return 100.0 * self.lesion_volume_mm3 / self.lung_volume_mm3

    def to_volume(self, study_id: str = "phantom") -> Volume:
        """The phantom as the pipeline's ``Volume`` (float32 HU, canonical geometry)."""
        return Volume(
            array=self.hu.astype(np.float32),
            units="HU",
            geometry=self.geometry,
            study_id=study_id,
            source=f"synthetic phantom (seed {self.seed})",
            meta={"Modality": "CT", "Manufacturer": "corona-ct phantom"},
        )


def _rngs(seed: int) -> tuple[np.random.Generator, np.random.Generator, np.random.Generator]:
    # Independent streams: lesions never change the anatomy or the noise of the same seed.
    anatomy_seq, noise_seq, lesion_seq = np.random.SeedSequence(seed).spawn(3)
    return (
        np.random.default_rng(anatomy_seq),
        np.random.default_rng(noise_seq),
        np.random.default_rng(lesion_seq),
    )


def _check_grid(
    shape: Sequence[int], spacing_mm: Sequence[float]
) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    if len(shape) != 3 or min(shape) < 2 or min(shape[1:]) < 24:
        raise ConfigError(f"phantom shape {tuple(shape)} must be (z, y, x) with z >= 2 and y, x >= 24")
    if len(spacing_mm) != 3 or min(spacing_mm) <= 0:
        raise ConfigError(f"phantom spacing {tuple(spacing_mm)} mm must be three positive numbers")
    return (int(shape[0]), int(shape[1]), int(shape[2])), (
        float(spacing_mm[0]),
        float(spacing_mm[1]),
        float(spacing_mm[2]),
    )


def lesion_specs_for_volume(
    total_ml: float,
    seed: int = 0,
    *,
    shape: tuple[int, int, int] = _DEFAULT_SHAPE,
    spacing_mm: tuple[float, float, float] = _DEFAULT_SPACING,
    kinds: Literal["mixed", "ggo", "consolidation"] = "mixed",
    n_lesions: int | None = None,
    noise_hu: float = 15.0,
    anatomy_jitter: float = 0.04,
) -> tuple[LesionSpec, ...]:
    """Lesions whose clipped, merged volume is ``total_ml`` (cm³) within ~0.5 % in the phantom of ``seed``.

    The specs belong to the phantom with the same seed, shape, spacing and jitter:
    ``make_phantom(seed, shape, spacing_mm, lesions=specs)`` equals
    ``make_phantom(seed, shape, spacing_mm, lesions=kinds, lesion_volume_ml=total_ml)``.
    Use it to build validation cohorts with lesion volumes from 0 to ~300 cm³.
    """
    shape, spacing_mm = _check_grid(shape, spacing_mm)
    anatomy_rng, noise_rng, lesion_rng = _rngs(seed)
    anatomy = build_anatomy(shape, spacing_mm, anatomy_rng, noise_rng, noise_hu, anatomy_jitter)
    return draw_lesion_specs(anatomy, lesion_rng, kinds, total_ml, n_lesions, noise_hu)


def make_phantom(
    seed: int = 0,
    shape: tuple[int, int, int] = _DEFAULT_SHAPE,
    spacing_mm: tuple[float, float, float] = _DEFAULT_SPACING,
    lesions: Sequence[LesionSpec] | str = "none",
    *,
    lesion_volume_ml: float | None = None,
    n_lesions: int | None = None,
    noise_hu: float = 15.0,
    anatomy_jitter: float = 0.04,
) -> Phantom:
    """A seeded synthetic chest CT (int16 HU) with exact lung and lesion truth.

    ``lesions``: ``"none"``, ``"mixed"`` (ground glass and consolidation), ``"ggo"``,
    ``"consolidation"``, or explicit ``LesionSpec`` objects. With a preset,
    ``lesion_volume_ml`` (cm³) sets the total lesion volume (met within ~0.5 %),
    otherwise ``n_lesions`` (default 4) random lesions are drawn. ``noise_hu`` is
    the standard deviation of the smooth parenchyma noise; ``anatomy_jitter`` the
    relative seeded variation of organ sizes. Same arguments, same arrays.
    """
    shape, spacing_mm = _check_grid(shape, spacing_mm)
    if noise_hu < 0 or not 0 <= anatomy_jitter <= 0.2:
        raise ConfigError(f"noise_hu={noise_hu} must be >= 0 and anatomy_jitter={anatomy_jitter} in [0, 0.2]")
    anatomy_rng, noise_rng, lesion_rng = _rngs(seed)
    anatomy = build_anatomy(shape, spacing_mm, anatomy_rng, noise_rng, noise_hu, anatomy_jitter)
    if isinstance(lesions, str):
        specs = draw_lesion_specs(anatomy, lesion_rng, lesions, lesion_volume_ml, n_lesions, noise_hu)
    else:
        if lesion_volume_ml is not None:
            raise ConfigError("lesion_volume_ml applies to lesion presets, not to explicit LesionSpec lists")
        specs = tuple(lesions)

    kind, lesion_hu = paint_lesions(specs, anatomy, noise_hu)
    lesion_mask = kind > 0
    hu = anatomy.hu.copy()
    hu[lesion_mask] = lesion_hu[lesion_mask]
    tissue = anatomy.tissue.copy()
    tissue[lesion_mask] = LESION

    voxel_mm3 = anatomy.geometry.voxel_volume_mm3
    labels = anatomy.lung_labels
    sides = {"right": RIGHT_LUNG, "left": LEFT_LUNG}
    return Phantom(
        hu=hu,
        geometry=anatomy.geometry,
        lung_labels=labels,
        lesion_mask=lesion_mask,
        lesion_kind=kind,
        tissue=tissue,
        lesion_specs=specs,
        seed=seed,
        lesion_volume_mm3=float(np.count_nonzero(lesion_mask)) * voxel_mm3,
        lesion_volume_by_kind_mm3=types.MappingProxyType(
            {name: float(np.count_nonzero(kind == code)) * voxel_mm3 for name, code in LESION_CODE.items()}
        ),
        lesion_volume_by_side_mm3=types.MappingProxyType(
            {
                name: float(np.count_nonzero(lesion_mask & (labels == code))) * voxel_mm3
                for name, code in sides.items()
            }
        ),
        lung_volume_mm3=float(np.count_nonzero(labels)) * voxel_mm3,
        lung_volume_by_side_mm3=types.MappingProxyType(
            {name: float(np.count_nonzero(labels == code)) * voxel_mm3 for name, code in sides.items()}
        ),
    )
