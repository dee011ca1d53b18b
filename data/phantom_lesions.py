"""The phantom's lesions: ground glass and consolidation blobs, drawn at random or to an exact total volume.

Each lesion is a lobulated ellipsoid (:class:`LesionSpec`) clipped to the lung that
holds its centre, with HU inside its kind's range (``LESION_HU_RANGE``). Drawn
lesions hug the pleura three times in four; with a target volume, one common
scale factor is calibrated until the painted, merged volume meets it.
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from corona_ct.data.phantom_anatomy import LUNG, Anatomy
from corona_ct.pipeline.datamodel import LEFT_LUNG, RIGHT_LUNG
from corona_ct.pipeline.errors import ConfigError

LesionKind = Literal["ggo", "consolidation"]

#: HU ranges that a lesion of each kind is confined to (inclusive).
LESION_HU_RANGE: Mapping[str, tuple[int, int]] = types.MappingProxyType(
    {"ggo": (-750, -300), "consolidation": (-100, 50)}
)
#: Codes of ``Phantom.lesion_kind``.
LESION_CODE: Mapping[str, int] = types.MappingProxyType({"ggo": 1, "consolidation": 2})


@dataclass(frozen=True)
class LesionSpec:
    """One lesion: a smooth, lobulated ellipsoidal blob clipped to the lung holding its centre.

    ``center_lps_mm`` is an LPS position (mm) in the phantom's world coordinates,
    ``radii_zyx_mm`` the semi-axes along the slice, row and column axes. HU falls
    from ``hu_center`` to ``hu_edge`` (both inside the kind's range, see
    ``LESION_HU_RANGE``); ``irregularity`` (0 = ellipsoid) lobulates the outline,
    with a shape fixed by ``shape_seed``.
    """

    kind: LesionKind
    center_lps_mm: tuple[float, float, float]
    radii_zyx_mm: tuple[float, float, float]
    hu_center: float
    hu_edge: float
    irregularity: float = 0.25
    shape_seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in LESION_HU_RANGE:
            raise ConfigError(f"lesion kind {self.kind!r} must be one of {', '.join(LESION_HU_RANGE)}")
        low, high = LESION_HU_RANGE[self.kind]
        for name, value in (("hu_center", self.hu_center), ("hu_edge", self.hu_edge)):
            if not low <= value <= high:
                raise ConfigError(f"{self.kind} lesion {name}={value} HU lies outside [{low}, {high}] HU")
        if min(self.radii_zyx_mm) <= 0:
            raise ConfigError(f"lesion radii {self.radii_zyx_mm} mm must be positive")
        if not 0 <= self.irregularity < 0.8:
            raise ConfigError(f"lesion irregularity {self.irregularity} must lie in [0, 0.8)")

    def scaled(self, factor: float) -> LesionSpec:
        """The same lesion with every radius multiplied by ``factor``."""
        radii = (self.radii_zyx_mm[0] * factor, self.radii_zyx_mm[1] * factor, self.radii_zyx_mm[2] * factor)
        return dataclasses.replace(self, radii_zyx_mm=radii)


def paint_lesions(
    specs: Sequence[LesionSpec], anatomy: Anatomy, noise_hu: float
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int16]]:
    """Lesion kind codes and HU on the grid; consolidation wins where a GGO and a consolidation overlap."""
    geometry = anatomy.geometry
    kind = np.zeros(geometry.shape, dtype=np.uint8)
    hu = np.zeros(geometry.shape, dtype=np.int16)
    spacing = np.asarray(geometry.spacing_mm)
    to_index = np.linalg.inv(geometry.affine_lps())
    ordered = sorted(specs, key=lambda spec: LESION_CODE[spec.kind])
    for spec in ordered:
        centre = (to_index @ np.append(spec.center_lps_mm, 1.0))[:3]
        centre_voxel = tuple(int(c) for c in np.rint(centre))
        if not all(0 <= c < n for c, n in zip(centre_voxel, geometry.shape)):
            raise ConfigError(f"lesion centre {spec.center_lps_mm} mm lies outside the phantom grid")
        side = int(anatomy.lung_labels[centre_voxel])
        if side == 0:
            raise ConfigError(f"lesion centre {spec.center_lps_mm} mm lies outside the lungs")
        radii = np.asarray(spec.radii_zyx_mm)
        reach = radii * (1.0 + spec.irregularity) / spacing + 1.0
        box = tuple(
            slice(max(0, int(np.floor(c - r))), min(n, int(np.ceil(c + r)) + 1))
            for c, r, n in zip(centre, reach, geometry.shape)
        )
        q = [
            ((np.arange(s.start, s.stop) - c) * d / r).reshape([-1 if a == i else 1 for i in range(3)])
            for a, (s, c, d, r) in enumerate(zip(box, centre, spacing, radii))
        ]
        distance = np.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2)  # 1 on the unlobulated ellipsoid surface
        # Lobulation: a few low-frequency plane waves in the lesion's own normalised coordinates,
        # so that scaling the radii scales the shape without changing it.
        shape_rng = np.random.default_rng(spec.shape_seed)
        waves = shape_rng.normal(0.0, 1.0, (3, 3))
        waves *= 2.5 / np.linalg.norm(waves, axis=1, keepdims=True)
        phases = shape_rng.uniform(0.0, 2.0 * np.pi, 3)
        lobes = sum(np.sin(k[0] * q[0] + k[1] * q[1] + k[2] * q[2] + p) for k, p in zip(waves, phases)) / 3.0
        reduced = distance / (1.0 + spec.irregularity * lobes)
        inside = (reduced < 1.0) & (anatomy.lung_labels[box] == side)
        core = np.clip(1.0 - reduced, 0.0, 1.0) ** 0.7  # 0 at the edge, 1 at the centre
        values = spec.hu_edge + (spec.hu_center - spec.hu_edge) * core + 0.7 * noise_hu * anatomy.noise[box]
        low, high = LESION_HU_RANGE[spec.kind]
        kind[box][inside] = LESION_CODE[spec.kind]
        hu[box][inside] = np.rint(np.clip(values, low, high))[inside].astype(np.int16)
    return kind, hu


def _sample_lesions(
    anatomy: Anatomy,
    rng: np.random.Generator,
    kinds: str,
    n_lesions: int,
    volumes_mm3: np.ndarray | None,
) -> list[LesionSpec]:
    """Lesions centred in lung parenchyma, mostly peripheral/subpleural; both lungs when n >= 2."""
    geometry = anatomy.geometry
    lung_mm = min(anatomy.lung_semi_axes_mm)
    depth_mm = ndimage.distance_transform_edt(anatomy.lung_labels > 0, sampling=geometry.spacing_mm)
    candidates = (anatomy.tissue == LUNG) & (depth_mm >= min(geometry.spacing_mm[1:]))
    specs = []
    for index in range(n_lesions):
        if kinds == "mixed":
            kind: LesionKind = "ggo" if index == 0 or (index > 1 and rng.random() < 0.6) else "consolidation"
        else:
            kind = "ggo" if kinds == "ggo" else "consolidation"
        side = (RIGHT_LUNG, LEFT_LUNG)[index] if index < 2 else int(rng.integers(1, 3))
        pool = np.flatnonzero(candidates & (anatomy.lung_labels == side))
        if pool.size == 0:
            pool = np.flatnonzero(candidates)
        if pool.size == 0:
            raise ConfigError("the phantom grid is too small to hold lungs with lesions; use a larger shape")
        # Three in four lesions hug the pleura (as COVID-19 opacities typically do), the rest lie anywhere.
        if rng.random() < 0.75:
            weights = np.exp(-depth_mm.ravel()[pool] / (0.08 * lung_mm))
            chosen = rng.choice(pool, p=weights / weights.sum())
        else:
            chosen = rng.choice(pool)
        voxel = np.unravel_index(chosen, geometry.shape)
        centre = geometry.affine_lps() @ np.array([*voxel, 1.0])
        if volumes_mm3 is None:
            radius = rng.uniform(0.25, 0.5) * lung_mm
        else:
            radius = float(np.cbrt(3.0 * volumes_mm3[index] / (4.0 * np.pi)))
        anisotropy = np.exp(rng.uniform(-0.2, 0.2, 3))
        anisotropy /= np.cbrt(anisotropy.prod())
        low, high = LESION_HU_RANGE[kind]
        if kind == "ggo":
            hu_center, hu_edge = rng.uniform(-560.0, -380.0), rng.uniform(-720.0, -650.0)
        else:
            hu_center, hu_edge = rng.uniform(0.0, 40.0), rng.uniform(-90.0, -50.0)
        specs.append(
            LesionSpec(
                kind=kind,
                center_lps_mm=(float(centre[0]), float(centre[1]), float(centre[2])),
                radii_zyx_mm=tuple(float(r) for r in radius * anisotropy),  # type: ignore[arg-type]
                hu_center=float(np.clip(hu_center, low, high)),
                hu_edge=float(np.clip(hu_edge, low, high)),
                irregularity=float(rng.uniform(0.1, 0.3)),
                shape_seed=int(rng.integers(0, 2**31)),
            )
        )
    return specs


def _calibrate_volume(
    specs: list[LesionSpec], anatomy: Anatomy, target_mm3: float, noise_hu: float
) -> tuple[LesionSpec, ...]:
    """Scale every radius by one common factor until the clipped, merged lesion volume meets the target."""
    voxel_mm3 = anatomy.geometry.voxel_volume_mm3
    factor, best = 1.0, (math.inf, tuple(specs))
    for _ in range(12):
        scaled = tuple(spec.scaled(factor) for spec in specs)
        measured = float(np.count_nonzero(paint_lesions(scaled, anatomy, noise_hu)[0])) * voxel_mm3
        error = abs(measured - target_mm3)
        if error < best[0]:
            best = (error, scaled)
        if error <= max(0.005 * target_mm3, voxel_mm3):
            break
        # Lesion volume grows like the cube of the radii until lung borders clip it, so the step is damped.
        factor *= float(np.clip((target_mm3 / max(measured, voxel_mm3)) ** (1.0 / 3.0), 0.5, 2.0))
    return best[1]


def draw_lesion_specs(
    anatomy: Anatomy,
    lesion_rng: np.random.Generator,
    kinds: str,
    lesion_volume_ml: float | None,
    n_lesions: int | None,
    noise_hu: float,
) -> tuple[LesionSpec, ...]:
    """Lesions for a preset ``kinds`` ("none", "mixed", "ggo", "consolidation") in ``anatomy``.

    Without ``lesion_volume_ml`` (cm³), ``n_lesions`` (default 4) random lesions; with it,
    lesions scaled until their painted, merged volume meets it (see ``paint_lesions``).
    """
    if kinds not in ("none", "mixed", "ggo", "consolidation"):
        raise ConfigError(
            f"lesions={kinds!r}: use 'none', 'mixed', 'ggo', 'consolidation' or LesionSpec objects"
        )
    if kinds == "none":
        if lesion_volume_ml:
            raise ConfigError("lesion_volume_ml needs lesions='mixed', 'ggo' or 'consolidation'")
        return ()
    if lesion_volume_ml is None:
        return tuple(_sample_lesions(anatomy, lesion_rng, kinds, n_lesions or 4, None))
    if lesion_volume_ml < 0:
        raise ConfigError(f"lesion_volume_ml={lesion_volume_ml} must not be negative")
    if lesion_volume_ml == 0:
        return ()
    lung_ml = float(np.count_nonzero(anatomy.lung_labels)) * anatomy.geometry.voxel_ml
    if lesion_volume_ml > 0.7 * lung_ml:
        raise ConfigError(
            f"lesion volume {lesion_volume_ml} ml exceeds 70 % of this phantom's {lung_ml:.0f} ml of lung; "
            "use a larger shape or spacing"
        )
    count = n_lesions or int(np.clip(1 + round(lesion_volume_ml / 40.0), 2, 10))
    shares = lesion_rng.dirichlet(np.full(count, 2.0))
    specs = _sample_lesions(anatomy, lesion_rng, kinds, count, shares * lesion_volume_ml * 1000.0)
    return _calibrate_volume(specs, anatomy, lesion_volume_ml * 1000.0, noise_hu)
