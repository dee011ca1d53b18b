"""Seeded synthetic chest CT phantom with known lungs and lesions (writers: :mod:`data.writers`).

The phantom is the project's main test asset: every array is integer Hounsfield
units (int16), so DICOM, NIfTI and TIFF round trips are exact, and every truth
(lung labels, lesion mask, lesion volumes in mm³) is known voxel for voxel.

Anatomy is laid out in coordinates normalised to the field of view, so a small
test grid (12×64×64) and the default (32×192×192, 5 × 1.6 × 1.6 mm) hold the same
chest at different sizes. Arrays are (z, y, x) in the canonical orientation:
slice index towards the head, row index towards the back, column index towards
the patient's left (patient's right lung = low column index = label 1).

Example:
    >>> phantom = make_phantom(seed=1, shape=(12, 64, 64), lesions="mixed")
    >>> bool(np.all(phantom.lung_labels[phantom.lesion_mask] > 0))
    True
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from corona_ct.pipeline.datamodel import LEFT_LUNG, RIGHT_LUNG, Geometry, Volume
from corona_ct.pipeline.errors import ConfigError

LesionKind = Literal["ggo", "consolidation"]

#: HU ranges that a lesion of each kind is confined to (inclusive).
LESION_HU_RANGE: Mapping[str, tuple[int, int]] = types.MappingProxyType(
    {"ggo": (-750, -300), "consolidation": (-100, 50)}
)
#: Codes of ``Phantom.lesion_kind``.
LESION_CODE: Mapping[str, int] = types.MappingProxyType({"ggo": 1, "consolidation": 2})

#: Codes of ``Phantom.tissue``.
AIR, FAT, SOFT_TISSUE, BONE, TABLE, LUNG, VESSEL, AIRWAY, LESION = range(9)
TISSUE_NAMES: Mapping[int, str] = types.MappingProxyType(
    {
        AIR: "air",
        FAT: "fat",
        SOFT_TISSUE: "soft tissue",
        BONE: "bone",
        TABLE: "table",
        LUNG: "lung parenchyma",
        VESSEL: "vessel",
        AIRWAY: "airway",
        LESION: "lesion",
    }
)

AIR_HU, FAT_HU, SOFT_TISSUE_HU, TABLE_HU = -1000, -100, 40, 600
CORTICAL_BONE_HU, CANCELLOUS_BONE_HU, RIB_HU = 700, 400, 550
LUNG_HU, LUNG_HU_RANGE = -850, (-920, -780)

_DEFAULT_SHAPE = (32, 192, 192)
_DEFAULT_SPACING = (5.0, 1.6, 1.6)

IntArray = npt.NDArray[np.int16]
Coords = tuple[np.ndarray, np.ndarray, np.ndarray]


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


# ----------------------------------------------------------------------------- anatomy


@dataclass(frozen=True)
class _Anatomy:
    hu: IntArray
    tissue: npt.NDArray[np.uint8]
    lung_labels: npt.NDArray[np.uint8]
    geometry: Geometry
    noise: npt.NDArray[np.float32]  # zero-mean smooth noise with unit standard deviation
    lung_semi_axes_mm: tuple[float, float]  # in-plane (y, x) semi-axes of one lung at full width


def _canonical_geometry(shape: tuple[int, int, int], spacing_mm: tuple[float, float, float]) -> Geometry:
    # Isocentre at the middle of the grid, so in-plane LPS coordinates are symmetric about 0.
    origin_x = -(shape[2] - 1) * spacing_mm[2] / 2.0
    origin_y = -(shape[1] - 1) * spacing_mm[1] / 2.0
    origin_z = -(shape[0] - 1) * spacing_mm[0] / 2.0
    return Geometry(shape=shape, spacing_mm=spacing_mm, origin_lps=(origin_x, origin_y, origin_z))


def _voxel_centres_mm(shape: tuple[int, int, int], spacing_mm: tuple[float, float, float]) -> Coords:
    """1D (z, y, x) voxel-centre positions in mm: z from the slab bottom, y and x from its centre."""
    z = (np.arange(shape[0]) + 0.5) * spacing_mm[0]
    y = (np.arange(shape[1]) + 0.5 - shape[1] / 2.0) * spacing_mm[1]
    x = (np.arange(shape[2]) + 0.5 - shape[2] / 2.0) * spacing_mm[2]
    return z, y, x


def _paint_tube(
    mask: npt.NDArray[np.bool_],
    coords_mm: Coords,
    start_mm: np.ndarray,
    end_mm: np.ndarray,
    radius_start_mm: float,
    radius_end_mm: float,
) -> None:
    """OR a tapered cylinder with round caps (z, y, x mm end points) into ``mask``, within its bounding box."""
    reach = max(radius_start_mm, radius_end_mm)
    low, high = np.minimum(start_mm, end_mm) - reach, np.maximum(start_mm, end_mm) + reach
    box = tuple(
        slice(int(np.searchsorted(c, lo)), int(np.searchsorted(c, hi, side="right")))
        for c, lo, hi in zip(coords_mm, low, high)
    )
    if any(s.start >= s.stop for s in box):
        return
    dz = coords_mm[0][box[0]][:, None, None] - start_mm[0]
    dy = coords_mm[1][box[1]][None, :, None] - start_mm[1]
    dx = coords_mm[2][box[2]][None, None, :] - start_mm[2]
    axis = end_mm - start_mm
    length2 = float(axis @ axis) or 1e-12
    t = np.clip((dz * axis[0] + dy * axis[1] + dx * axis[2]) / length2, 0.0, 1.0)
    distance2 = (dz - t * axis[0]) ** 2 + (dy - t * axis[1]) ** 2 + (dx - t * axis[2]) ** 2
    radius = radius_start_mm + t * (radius_end_mm - radius_start_mm)
    mask[box] |= distance2 <= radius**2


def _lung_profile(w: np.ndarray, w_mid: float, w_apex: float) -> np.ndarray:
    """Cross-section scale of a lung at normalised height ``w``: full below ``w_mid``, a dome up to the apex."""
    t = np.clip((w - w_mid) / (w_apex - w_mid), 0.0, None)
    return np.sqrt(np.clip(1.0 - t**2, 0.0, None))


def _build_anatomy(
    shape: tuple[int, int, int],
    spacing_mm: tuple[float, float, float],
    rng: np.random.Generator,
    noise_rng: np.random.Generator,
    noise_hu: float,
    jitter: float,
) -> _Anatomy:
    nz, ny, nx = shape
    geometry = _canonical_geometry(shape, spacing_mm)
    coords = _voxel_centres_mm(shape, spacing_mm)
    half_y, half_x, height = ny * spacing_mm[1] / 2.0, nx * spacing_mm[2] / 2.0, nz * spacing_mm[0]
    scale = min(half_x, half_y)  # mm; sizes of round structures
    min_radius = 0.6 * min(spacing_mm[1:])  # thinner tubes would vanish between voxel centres

    def jittered(value: float) -> float:
        return value * (1.0 + jitter * rng.uniform(-1.0, 1.0))

    # Normalised coordinates: u, v in [-1, 1] across the field of view (u < 0 = patient's right),
    # w in [0, 1] from the slab bottom to its top.
    w = ((np.arange(nz) + 0.5) / nz)[:, None, None]
    v = ((np.arange(ny) + 0.5) / ny * 2.0 - 1.0)[None, :, None]
    u = ((np.arange(nx) + 0.5) / nx * 2.0 - 1.0)[None, None, :]
    slab = np.ones((nz, 1, 1), dtype=bool)

    body_a, body_b, fat = jittered(0.86), jittered(0.62), jittered(0.06)
    body = slab & ((u / body_a) ** 2 + (v / body_b) ** 2 <= 1.0)
    inner = slab & ((u / (body_a - fat)) ** 2 + (v / (body_b - fat)) ** 2 <= 1.0)
    # Carbon-fibre style table: a curved slab below (posterior to) the body, never touching it.
    table_top = 0.70 - 0.06 * u**2
    table = slab & (v >= table_top) & (v <= table_top + 0.08) & (np.abs(u) <= 0.85)

    # Lungs: elliptic cross-sections, full width low down, a dome towards the apex,
    # and a diaphragm dome pushing the base up in the middle (higher on the right, over the liver).
    lung_a, lung_b = jittered(0.28), jittered(0.36)
    lung_cu, lung_cv = 0.39, -0.02
    w_mid, w_apex = 0.55, jittered(0.95)
    profile = _lung_profile(w, w_mid, w_apex)
    lungs = np.zeros(shape, dtype=np.uint8)
    for label, side, dome in ((RIGHT_LUNG, -1.0, jittered(0.17)), (LEFT_LUNG, 1.0, jittered(0.14))):
        rho2 = ((u - side * lung_cu) / lung_a) ** 2 + ((v - lung_cv) / lung_b) ** 2
        floor = 0.03 + dome * np.clip(1.0 - rho2, 0.0, None)
        lungs[(rho2 <= profile**2) & (w >= floor)] = label

    # Mediastinum: heart and aorta (soft tissue) carved out of the lungs.
    heart_cu, heart_cv, heart_cw = 0.08, -0.12, 0.30
    heart_au, heart_av, heart_aw = jittered(0.26), jittered(0.24), jittered(0.22)
    heart = ((u - heart_cu) / heart_au) ** 2 + ((v - heart_cv) / heart_av) ** 2 + (
        (w - heart_cw) / heart_aw
    ) ** 2 <= 1.0
    aorta = np.zeros(shape, dtype=bool)
    aorta_path = [(0.45, -0.10, 0.02), (0.74, -0.06, 0.02), (0.76, 0.20, 0.10), (0.0, 0.22, 0.07)]
    aorta_mm = [np.array([pw * height, pv * half_y, pu * half_x]) for pw, pv, pu in aorta_path]
    for start, end in itertools.pairwise(aorta_mm):
        _paint_tube(aorta, coords, start, end, 0.05 * scale, 0.045 * scale)

    # Airways: trachea down to the carina, then the two main bronchi (the right one steeper).
    w_carina = jittered(0.62)
    trachea_top = np.array([height + spacing_mm[0], 0.10 * half_y, 0.0])
    carina = np.array([w_carina * height, 0.10 * half_y, 0.0])
    bronchi_ends = [
        np.array([(w_carina - 0.14) * height, 0.02 * half_y, -0.22 * half_x]),
        np.array([(w_carina - 0.10) * height, 0.02 * half_y, 0.24 * half_x]),
    ]
    lumen, outer_wall = np.zeros(shape, dtype=bool), np.zeros(shape, dtype=bool)
    wall = max(0.012 * scale, 1.2 * max(spacing_mm[1:]))  # at least one voxel so lumen never touches lung
    for start, end, radius in [(trachea_top, carina, 0.055 * scale)] + [
        (carina, end, 0.038 * scale) for end in bronchi_ends
    ]:
        radius = max(radius, min_radius)
        _paint_tube(lumen, coords, start, end, radius, radius)
        _paint_tube(outer_wall, coords, start, end, radius + wall, radius + wall)

    # Bone: vertebral body (cortical shell, cancellous core), neural arch, spinous process, sternum, ribs.
    y_mm, x_mm = coords[1][None, :, None], coords[2][None, None, :]
    body_y, body_r = 0.30 * half_y, 0.085 * scale
    shell = max(0.02 * scale, 1.2 * max(spacing_mm[1:]))
    r_vertebra = np.sqrt((y_mm - body_y) ** 2 + x_mm**2)
    canal_y = body_y + body_r + 0.045 * scale
    r_canal = np.sqrt((y_mm - canal_y) ** 2 + x_mm**2)
    cortical = slab & (
        ((r_vertebra <= body_r) & (r_vertebra > body_r - shell))
        | ((r_canal <= 0.065 * scale) & (r_canal > 0.04 * scale) & (y_mm > canal_y - 0.02 * scale))
        | (((y_mm - canal_y - 0.085 * scale) / (0.04 * scale)) ** 2 + (x_mm / (0.02 * scale)) ** 2 <= 1.0)
    )
    cancellous = slab & (r_vertebra <= body_r - shell)
    sternum = ((w >= 0.30) & (w <= 0.85)) & (
        ((y_mm + 0.48 * half_y) / (0.03 * scale)) ** 2 + (x_mm / (0.05 * scale)) ** 2 <= 1.0
    )
    ribs = np.zeros(shape, dtype=bool)
    rib_r, rib_gap = max(0.028 * scale, min_radius), 0.05
    rib_phase = rng.uniform(-0.2, 0.2)
    w_flat = w[:, 0, 0]
    rib_scale = np.maximum(_lung_profile(w_flat, w_mid, w_apex), 0.5)
    rib_slices = (w_flat >= 0.05) & (w_flat <= w_apex - 0.02)
    for side in (-1.0, 1.0):
        # Eight ribs per side around the lateral, anterior and posterior lung surface, none medially.
        for theta0 in np.deg2rad(np.linspace(70.0, 290.0, 8)):
            theta = theta0 + rib_phase + 0.5 * (w_flat - 0.5)
            centre_u = side * lung_cu - side * (lung_a * rib_scale + rib_gap) * np.cos(theta)
            centre_v = lung_cv + (lung_b * rib_scale + rib_gap) * np.sin(theta)
            in_rib = (y_mm - (centre_v * half_y)[:, None, None]) ** 2 + (
                x_mm - (centre_u * half_x)[:, None, None]
            ) ** 2 <= rib_r**2
            ribs |= in_rib & rib_slices[:, None, None]
    bone = cortical | cancellous | sternum | ribs

    lungs[heart | aorta | outer_wall | bone] = 0

    # Pulmonary vessels: tapered trees from each hilum towards the periphery, kept inside the lung.
    vessels = np.zeros(shape, dtype=bool)
    r_hilum, r_tip = max(0.030 * scale, min_radius), max(0.007 * scale, min_radius)
    for side in (-1.0, 1.0):
        hilum = np.array([0.50 * height, (lung_cv + 0.02) * half_y, side * 0.16 * half_x])
        for _ in range(8):
            target_w = rng.uniform(0.15, 0.88)
            spread = float(_lung_profile(np.array(target_w), w_mid, w_apex)) * rng.uniform(0.55, 0.9)
            angle = rng.uniform(0.0, 2.0 * np.pi)
            target = np.array(
                [
                    target_w * height,
                    (lung_cv + lung_b * spread * np.sin(angle)) * half_y,
                    (side * lung_cu + lung_a * spread * np.cos(angle)) * half_x,
                ]
            )
            _paint_tube(vessels, coords, hilum, target, r_hilum, r_tip)
            for _ in range(2):
                fraction = rng.uniform(0.35, 0.7)
                branch_start = hilum + fraction * (target - hilum)
                branch_end = target + rng.normal(0.0, 0.18, 3) * np.array([height, half_y, half_x])
                r_branch = max(r_tip, 0.6 * (r_hilum + fraction * (r_tip - r_hilum)))
                _paint_tube(vessels, coords, branch_start, branch_end, r_branch, r_tip)
    vessels &= lungs > 0

    tissue = np.zeros(shape, dtype=np.uint8)
    tissue[table] = TABLE
    tissue[body] = FAT
    tissue[inner] = SOFT_TISSUE
    tissue[lungs > 0] = LUNG
    tissue[vessels] = VESSEL
    tissue[lumen] = AIRWAY
    tissue[bone] = BONE

    hu_by_tissue = np.array(
        [AIR_HU, FAT_HU, SOFT_TISSUE_HU, 0, TABLE_HU, 0, SOFT_TISSUE_HU, AIR_HU], np.int16
    )
    hu = hu_by_tissue[tissue]
    hu[cancellous] = CANCELLOUS_BONE_HU
    hu[ribs | sternum] = RIB_HU
    hu[cortical] = CORTICAL_BONE_HU

    # Lung parenchyma: −850 HU, denser towards the back (gravity-dependent), plus smooth seeded noise.
    noise = ndimage.gaussian_filter(noise_rng.standard_normal(shape, dtype=np.float32), sigma=(0.6, 1.2, 1.2))
    noise /= max(float(noise.std()), 1e-6)
    gradient = 25.0 * np.clip((v - lung_cv) / lung_b, -1.0, 1.0)
    parenchyma = np.clip(LUNG_HU + gradient + noise_hu * noise, *LUNG_HU_RANGE)
    is_parenchyma = tissue == LUNG
    hu[is_parenchyma] = np.rint(parenchyma[is_parenchyma]).astype(np.int16)

    return _Anatomy(
        hu=hu,
        tissue=tissue,
        lung_labels=lungs,
        geometry=geometry,
        noise=noise,
        lung_semi_axes_mm=(lung_b * half_y, lung_a * half_x),
    )


# ----------------------------------------------------------------------------- lesions


def _paint_lesions(
    specs: Sequence[LesionSpec], anatomy: _Anatomy, noise_hu: float
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
    anatomy: _Anatomy,
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
    specs: list[LesionSpec], anatomy: _Anatomy, target_mm3: float, noise_hu: float
) -> tuple[LesionSpec, ...]:
    """Scale every radius by one common factor until the clipped, merged lesion volume meets the target."""
    voxel_mm3 = anatomy.geometry.voxel_volume_mm3
    factor, best = 1.0, (math.inf, tuple(specs))
    for _ in range(12):
        scaled = tuple(spec.scaled(factor) for spec in specs)
        measured = float(np.count_nonzero(_paint_lesions(scaled, anatomy, noise_hu)[0])) * voxel_mm3
        error = abs(measured - target_mm3)
        if error < best[0]:
            best = (error, scaled)
        if error <= max(0.005 * target_mm3, voxel_mm3):
            break
        # Lesion volume grows like the cube of the radii until lung borders clip it, so the step is damped.
        factor *= float(np.clip((target_mm3 / max(measured, voxel_mm3)) ** (1.0 / 3.0), 0.5, 2.0))
    return best[1]


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


def _lesion_specs(
    anatomy: _Anatomy,
    lesion_rng: np.random.Generator,
    kinds: str,
    lesion_volume_ml: float | None,
    n_lesions: int | None,
    noise_hu: float,
) -> tuple[LesionSpec, ...]:
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
    anatomy = _build_anatomy(shape, spacing_mm, anatomy_rng, noise_rng, noise_hu, anatomy_jitter)
    return _lesion_specs(anatomy, lesion_rng, kinds, total_ml, n_lesions, noise_hu)


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
    anatomy = _build_anatomy(shape, spacing_mm, anatomy_rng, noise_rng, noise_hu, anatomy_jitter)
    if isinstance(lesions, str):
        specs = _lesion_specs(anatomy, lesion_rng, lesions, lesion_volume_ml, n_lesions, noise_hu)
    else:
        if lesion_volume_ml is not None:
            raise ConfigError("lesion_volume_ml applies to lesion presets, not to explicit LesionSpec lists")
        specs = tuple(lesions)

    kind, lesion_hu = _paint_lesions(specs, anatomy, noise_hu)
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
