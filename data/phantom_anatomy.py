"""The phantom's anatomy: body, table, lungs, mediastinum, airways, bones and vessels, in integer HU.

Structures are laid out in coordinates normalised to the field of view (see
:mod:`data.phantom`), with organ sizes varied by a seeded relative ``jitter``.
The lung parenchyma carries smooth seeded noise, which lesions reuse
(:mod:`data.phantom_lesions`) so that the same seed gives the same texture.
"""

from __future__ import annotations

import itertools
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from corona_ct.pipeline.datamodel import LEFT_LUNG, RIGHT_LUNG, Geometry

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

IntArray = npt.NDArray[np.int16]
Coords = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Anatomy:
    """A lesion-free phantom: HU, tissue codes, lung labels (0/1 right/2 left) and the noise field on one grid."""

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


BoolArray = npt.NDArray[np.bool_]
Jitter = Callable[[float], float]


@dataclass(frozen=True)
class _Grid:
    """The voxel grid in mm and in coordinates normalised to the field of view.

    ``u``, ``v`` in [-1, 1] across the columns and rows (u < 0 = patient's right),
    ``w`` in [0, 1] from the slab bottom to its top, each shaped to broadcast over
    (z, y, x); ``coords_mm`` the 1D voxel centres of :func:`_voxel_centres_mm`.
    """

    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    coords_mm: Coords
    u: np.ndarray
    v: np.ndarray
    w: np.ndarray
    slab: BoolArray  # (z, 1, 1) all True: broadcasts 2D in-plane masks through every slice
    half_y: float  # mm
    half_x: float  # mm
    height: float  # mm
    scale: float  # mm; sizes of round structures
    min_radius: float  # mm; thinner tubes would vanish between voxel centres


@dataclass(frozen=True)
class _LungShape:
    """Normalised semi-axes (a across, b front to back), centre offsets and heights of both lungs."""

    a: float
    b: float
    cu: float
    cv: float
    w_mid: float
    w_apex: float


def _grid(shape: tuple[int, int, int], spacing_mm: tuple[float, float, float]) -> _Grid:
    nz, ny, nx = shape
    half_y, half_x = ny * spacing_mm[1] / 2.0, nx * spacing_mm[2] / 2.0
    return _Grid(
        shape=shape,
        spacing_mm=spacing_mm,
        coords_mm=_voxel_centres_mm(shape, spacing_mm),
        u=((np.arange(nx) + 0.5) / nx * 2.0 - 1.0)[None, None, :],
        v=((np.arange(ny) + 0.5) / ny * 2.0 - 1.0)[None, :, None],
        w=((np.arange(nz) + 0.5) / nz)[:, None, None],
        slab=np.ones((nz, 1, 1), dtype=bool),
        half_y=half_y,
        half_x=half_x,
        height=nz * spacing_mm[0],
        scale=min(half_x, half_y),
        min_radius=0.6 * min(spacing_mm[1:]),
    )


def _torso(grid: _Grid, jittered: Jitter) -> tuple[BoolArray, BoolArray, BoolArray]:
    """(body, body inside its fat layer, table) masks."""
    u, v, slab = grid.u, grid.v, grid.slab
    body_a, body_b, fat = jittered(0.86), jittered(0.62), jittered(0.06)
    body = slab & ((u / body_a) ** 2 + (v / body_b) ** 2 <= 1.0)
    inner = slab & ((u / (body_a - fat)) ** 2 + (v / (body_b - fat)) ** 2 <= 1.0)
    # Carbon-fibre style table: a curved slab below (posterior to) the body, never touching it.
    table_top = 0.70 - 0.06 * u**2
    table = slab & (v >= table_top) & (v <= table_top + 0.08) & (np.abs(u) <= 0.85)
    return body, inner, table


def _lungs(grid: _Grid, jittered: Jitter) -> tuple[npt.NDArray[np.uint8], _LungShape]:
    """Lung labels (1 right, 2 left) before anything is carved out of them, and their shape.

    Elliptic cross-sections, full width low down, a dome towards the apex, and a
    diaphragm dome pushing the base up in the middle (higher on the right, over the liver).
    """
    u, v, w = grid.u, grid.v, grid.w
    lung_a, lung_b = jittered(0.28), jittered(0.36)
    lung = _LungShape(a=lung_a, b=lung_b, cu=0.39, cv=-0.02, w_mid=0.55, w_apex=jittered(0.95))
    profile = _lung_profile(w, lung.w_mid, lung.w_apex)
    labels = np.zeros(grid.shape, dtype=np.uint8)
    for label, side, dome in ((RIGHT_LUNG, -1.0, jittered(0.17)), (LEFT_LUNG, 1.0, jittered(0.14))):
        rho2 = ((u - side * lung.cu) / lung.a) ** 2 + ((v - lung.cv) / lung.b) ** 2
        floor = 0.03 + dome * np.clip(1.0 - rho2, 0.0, None)
        labels[(rho2 <= profile**2) & (w >= floor)] = label
    return labels, lung


def _mediastinum(grid: _Grid, jittered: Jitter) -> BoolArray:
    """Heart and aorta (soft tissue), to be carved out of the lungs."""
    u, v, w = grid.u, grid.v, grid.w
    heart_cu, heart_cv, heart_cw = 0.08, -0.12, 0.30
    heart_au, heart_av, heart_aw = jittered(0.26), jittered(0.24), jittered(0.22)
    heart = ((u - heart_cu) / heart_au) ** 2 + ((v - heart_cv) / heart_av) ** 2 + (
        (w - heart_cw) / heart_aw
    ) ** 2 <= 1.0
    aorta = np.zeros(grid.shape, dtype=bool)
    aorta_path = [(0.45, -0.10, 0.02), (0.74, -0.06, 0.02), (0.76, 0.20, 0.10), (0.0, 0.22, 0.07)]
    aorta_mm = [np.array([pw * grid.height, pv * grid.half_y, pu * grid.half_x]) for pw, pv, pu in aorta_path]
    for start, end in itertools.pairwise(aorta_mm):
        _paint_tube(aorta, grid.coords_mm, start, end, 0.05 * grid.scale, 0.045 * grid.scale)
    return heart | aorta


def _airways(grid: _Grid, jittered: Jitter) -> tuple[BoolArray, BoolArray]:
    """(lumen, lumen and wall): trachea down to the carina, then the two main bronchi (the right one steeper)."""
    height, half_y, half_x, scale = grid.height, grid.half_y, grid.half_x, grid.scale
    w_carina = jittered(0.62)
    trachea_top = np.array([height + grid.spacing_mm[0], 0.10 * half_y, 0.0])
    carina = np.array([w_carina * height, 0.10 * half_y, 0.0])
    bronchi_ends = [
        np.array([(w_carina - 0.14) * height, 0.02 * half_y, -0.22 * half_x]),
        np.array([(w_carina - 0.10) * height, 0.02 * half_y, 0.24 * half_x]),
    ]
    lumen, outer_wall = np.zeros(grid.shape, dtype=bool), np.zeros(grid.shape, dtype=bool)
    wall = max(
        0.012 * scale, 1.2 * max(grid.spacing_mm[1:])
    )  # at least one voxel so lumen never touches lung
    for start, end, radius in [(trachea_top, carina, 0.055 * scale)] + [
        (carina, end, 0.038 * scale) for end in bronchi_ends
    ]:
        radius = max(radius, grid.min_radius)
        _paint_tube(lumen, grid.coords_mm, start, end, radius, radius)
        _paint_tube(outer_wall, grid.coords_mm, start, end, radius + wall, radius + wall)
    return lumen, outer_wall


def _bones(grid: _Grid, lung: _LungShape, rng: np.random.Generator) -> tuple[BoolArray, BoolArray, BoolArray]:
    """(cortical, cancellous, rib and sternum) masks.

    Vertebral body (cortical shell, cancellous core), neural arch and spinous
    process; sternum; eight ribs per side following the lung surface.
    """
    half_y, half_x, scale, w, slab = grid.half_y, grid.half_x, grid.scale, grid.w, grid.slab
    y_mm, x_mm = grid.coords_mm[1][None, :, None], grid.coords_mm[2][None, None, :]
    body_y, body_r = 0.30 * half_y, 0.085 * scale
    shell = max(0.02 * scale, 1.2 * max(grid.spacing_mm[1:]))
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
    ribs = np.zeros(grid.shape, dtype=bool)
    rib_r, rib_gap = max(0.028 * scale, grid.min_radius), 0.05
    rib_phase = rng.uniform(-0.2, 0.2)
    w_flat = w[:, 0, 0]
    rib_scale = np.maximum(_lung_profile(w_flat, lung.w_mid, lung.w_apex), 0.5)
    rib_slices = (w_flat >= 0.05) & (w_flat <= lung.w_apex - 0.02)
    for side in (-1.0, 1.0):
        # Eight ribs per side around the lateral, anterior and posterior lung surface, none medially.
        for theta0 in np.deg2rad(np.linspace(70.0, 290.0, 8)):
            theta = theta0 + rib_phase + 0.5 * (w_flat - 0.5)
            centre_u = side * lung.cu - side * (lung.a * rib_scale + rib_gap) * np.cos(theta)
            centre_v = lung.cv + (lung.b * rib_scale + rib_gap) * np.sin(theta)
            in_rib = (y_mm - (centre_v * half_y)[:, None, None]) ** 2 + (
                x_mm - (centre_u * half_x)[:, None, None]
            ) ** 2 <= rib_r**2
            ribs |= in_rib & rib_slices[:, None, None]
    return cortical, cancellous, ribs | sternum


def _vessels(grid: _Grid, lung: _LungShape, rng: np.random.Generator) -> BoolArray:
    """Pulmonary vessels: tapered trees from each hilum towards the periphery (not yet clipped to the lungs)."""
    height, half_y, half_x = grid.height, grid.half_y, grid.half_x
    vessels = np.zeros(grid.shape, dtype=bool)
    r_hilum, r_tip = max(0.030 * grid.scale, grid.min_radius), max(0.007 * grid.scale, grid.min_radius)
    for side in (-1.0, 1.0):
        hilum = np.array([0.50 * height, (lung.cv + 0.02) * half_y, side * 0.16 * half_x])
        for _ in range(8):
            target_w = rng.uniform(0.15, 0.88)
            spread = float(_lung_profile(np.array(target_w), lung.w_mid, lung.w_apex)) * rng.uniform(
                0.55, 0.9
            )
            angle = rng.uniform(0.0, 2.0 * np.pi)
            target = np.array(
                [
                    target_w * height,
                    (lung.cv + lung.b * spread * np.sin(angle)) * half_y,
                    (side * lung.cu + lung.a * spread * np.cos(angle)) * half_x,
                ]
            )
            _paint_tube(vessels, grid.coords_mm, hilum, target, r_hilum, r_tip)
            for _ in range(2):
                fraction = rng.uniform(0.35, 0.7)
                branch_start = hilum + fraction * (target - hilum)
                branch_end = target + rng.normal(0.0, 0.18, 3) * np.array([height, half_y, half_x])
                r_branch = max(r_tip, 0.6 * (r_hilum + fraction * (r_tip - r_hilum)))
                _paint_tube(vessels, grid.coords_mm, branch_start, branch_end, r_branch, r_tip)
    return vessels


def build_anatomy(
    shape: tuple[int, int, int],
    spacing_mm: tuple[float, float, float],
    rng: np.random.Generator,
    noise_rng: np.random.Generator,
    noise_hu: float,
    jitter: float,
) -> Anatomy:
    """The lesion-free chest on a (z, y, x) grid of ``spacing_mm`` voxels.

    ``rng`` draws organ sizes (relative ``jitter``), rib phase and vessel paths in a
    fixed order (torso, lungs, mediastinum, airways, bones, vessels); ``noise_rng``
    the parenchyma noise of standard deviation ``noise_hu`` (HU). Same seeds, same arrays.
    """

    def jittered(value: float) -> float:
        return value * (1.0 + jitter * rng.uniform(-1.0, 1.0))

    grid = _grid(shape, spacing_mm)
    body, inner, table = _torso(grid, jittered)
    lungs, lung = _lungs(grid, jittered)
    mediastinum = _mediastinum(grid, jittered)
    lumen, outer_wall = _airways(grid, jittered)
    cortical, cancellous, ribs = _bones(grid, lung, rng)
    bone = cortical | cancellous | ribs
    lungs[mediastinum | outer_wall | bone] = 0
    vessels = _vessels(grid, lung, rng) & (lungs > 0)

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
    hu[ribs] = RIB_HU
    hu[cortical] = CORTICAL_BONE_HU

    # Lung parenchyma: −850 HU, denser towards the back (gravity-dependent), plus smooth seeded noise.
    noise = ndimage.gaussian_filter(noise_rng.standard_normal(shape, dtype=np.float32), sigma=(0.6, 1.2, 1.2))
    noise /= max(float(noise.std()), 1e-6)
    gradient = 25.0 * np.clip((grid.v - lung.cv) / lung.b, -1.0, 1.0)
    parenchyma = np.clip(LUNG_HU + gradient + noise_hu * noise, *LUNG_HU_RANGE)
    is_parenchyma = tissue == LUNG
    hu[is_parenchyma] = np.rint(parenchyma[is_parenchyma]).astype(np.int16)

    return Anatomy(
        hu=hu,
        tissue=tissue,
        lung_labels=lungs,
        geometry=_canonical_geometry(shape, spacing_mm),
        noise=noise,
        lung_semi_axes_mm=(lung.b * grid.half_y, lung.a * grid.half_x),
    )
