"""NIfTI input and output on the input's own voxel grid.

``read_nifti`` re-orders the file's array by axis flips and permutations only
(no resampling) into the canonical (z, y, x) order whose axes point as close as
possible to (+S, +P, +L), and records how to undo that in ``Volume.source_order``.
``write_nifti`` uses it to write masks and maps with exactly the input file's
shape and affine, so they overlay the input voxel for voxel in any viewer.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import numpy.typing as npt
from nibabel.filebasedimages import ImageFileError
from nibabel.orientations import aff2axcodes, io_orientation

from corona_ct.pipeline.atomic import atomic_path
from corona_ct.pipeline.config import IngestConfig
from corona_ct.pipeline.datamodel import Geometry, SourceOrder, Volume
from corona_ct.pipeline.errors import ConfigError, GeometryError, InputError, UnsupportedInputError
from corona_ct.pipeline.memory import require_memory, volume_bytes_needed

_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_NIFTI_SUFFIXES = (".nii.gz", ".nii")
# Errors nibabel and gzip raise on damaged or truncated files.
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, ImageFileError)


def _canonical_order(
    affine_ras: npt.NDArray[np.float64], path: Path
) -> tuple[tuple[int, int, int], tuple[int, ...]]:
    """For canonical axes (S, P, L): the source axis feeding each, and the canonical axes to flip."""
    if not np.all(np.isfinite(affine_ras)) or abs(np.linalg.det(affine_ras[:3, :3])) < 1e-12:
        raise GeometryError(
            f"{path}: the NIfTI affine is singular or not finite; fix the header (qform/sform)"
        )
    orientation = io_orientation(affine_ras)  # per source axis: (world axis R/A/S index, +1 towards R/A/S)
    if np.isnan(orientation).any():
        raise GeometryError(f"{path}: cannot tell the orientation of every voxel axis from the affine")
    order = [0, 0, 0]
    flips = []
    for source_axis, (world_axis, towards_ras) in enumerate(orientation):
        canonical_axis = 2 - int(world_axis)  # world x (L) -> column, y (P) -> row, z (S) -> slice
        order[canonical_axis] = source_axis
        # LPS sign: +L and +P are -R and -A; +S is +S.
        towards_lps = -towards_ras if world_axis < 2 else towards_ras
        if towards_lps < 0:
            flips.append(canonical_axis)
    return (order[0], order[1], order[2]), tuple(flips)


def _nonhu_warnings(array: np.ndarray, path: Path) -> tuple[str, ...]:
    low, high = float(array.min()), float(array.max())
    if low >= 0.0 and high <= 1.0:
        return (f"{path.name}: values lie in [0, 1]: looks like a normalised image, not HU",)
    if low >= 0.0:
        return (
            f"{path.name}: no value below 0 (min {low:.0f}): looks unrescaled or windowed, not HU; "
            "air should be near -1000 HU",
        )
    if low < -3000.0 or high > 40000.0:
        return (f"{path.name}: values [{low:.0f}, {high:.0f}] lie far outside the CT range of HU",)
    return ()


def read_nifti(path: Path, config: IngestConfig, study_id: str) -> Volume:
    """Read a 3D NIfTI CT in HU (scl_slope/inter applied) into a canonical float32 (z, y, x) ``Volume``.

    The qform/sform affine gives the geometry (LPS) and the axis re-ordering; the
    file's own order and affine are kept in ``source_order`` for ``write_nifti``.
    """
    path = Path(path)
    try:
        image = nib.load(path)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except _READ_ERRORS as error:
        raise InputError(f"{path}: not a readable NIfTI file ({error}); check the file is complete") from None
    if not isinstance(image, nib.Nifti1Pair):  # NIfTI-1 and NIfTI-2, single file or pair
        raise UnsupportedInputError(
            f"{path}: a {type(image).__name__}, not a NIfTI image; convert it to NIfTI"
        )

    shape = tuple(int(n) for n in image.shape)
    # Trailing singleton dimensions (x, y, z, 1) are a 3D volume; a real 4th dimension is not.
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise UnsupportedInputError(
            f"{path}: image has shape {tuple(image.shape)}; corona-ct needs one 3D CT volume "
            "(split 4D series into 3D files, stack 2D slices into a volume)"
        )

    warnings: list[str] = []
    header = image.header
    if not header.get_sform(coded=True)[1] and not header.get_qform(coded=True)[1]:
        warnings.append(
            f"{path.name}: neither qform nor sform is set; orientation assumed from voxel sizes alone, "
            "left/right cannot be verified"
        )
    affine = np.asarray(image.affine, dtype=np.float64)
    order, flips = _canonical_order(affine, path)
    canonical_shape = (shape[order[0]], shape[order[1]], shape[order[2]])
    if canonical_shape[0] < config.min_slices:
        raise UnsupportedInputError(
            f"{path}: {canonical_shape[0]} slice(s) along the head-foot axis; a single slice is not a CT volume"
        )
    if (
        canonical_shape[0] > config.max_slices
        or canonical_shape[1] * canonical_shape[2] > config.max_pixels_per_slice
    ):
        raise UnsupportedInputError(
            f"{path}: shape {shape} exceeds the ingest limits (max_slices {config.max_slices}, "
            f"max_pixels_per_slice {config.max_pixels_per_slice}); raise them in the config if intended"
        )

    require_memory(
        volume_bytes_needed(int(np.prod(shape, dtype=np.int64))),
        str(path),
        f"{'×'.join(map(str, shape))} voxels",
    )
    try:
        source = np.asarray(image.dataobj).reshape(shape)
    except _READ_ERRORS as error:
        raise InputError(f"{path}: pixel data cannot be read ({error}); the file may be truncated") from None
    if not np.issubdtype(source.dtype, np.number) or np.issubdtype(source.dtype, np.complexfloating):
        raise UnsupportedInputError(f"{path}: voxel type {source.dtype} is not a real-valued CT image")
    canonical = np.ascontiguousarray(np.flip(source.transpose(order), axis=flips), dtype=np.float32)
    if not np.all(np.isfinite(canonical)):
        raise InputError(f"{path}: the volume holds NaN or infinite values")
    warnings.extend(_nonhu_warnings(canonical, path))

    affine_lps = _LPS_FROM_RAS @ affine
    columns = affine_lps[:3, :3]
    spacing = [float(np.linalg.norm(columns[:, order[c]])) for c in range(3)]
    axes = []
    for c in range(3):
        direction = (-1.0 if c in flips else 1.0) * columns[:, order[c]] / spacing[c]
        axes.append((float(direction[0]), float(direction[1]), float(direction[2])))
    # Canonical voxel (0, 0, 0) is the source voxel at the far end of every flipped axis.
    first_voxel = np.zeros(4)
    first_voxel[3] = 1.0
    for c in flips:
        first_voxel[order[c]] = shape[order[c]] - 1
    origin = affine_lps @ first_voxel
    geometry = Geometry(
        shape=canonical_shape,
        spacing_mm=(spacing[0], spacing[1], spacing[2]),
        origin_lps=(float(origin[0]), float(origin[1]), float(origin[2])),
        axes_lps=tuple(axes),
    )
    # Inverse permutation: source axis a comes from canonical axis perm[a].
    perm = tuple(int(np.argsort(order)[a]) for a in range(3))
    source_order = SourceOrder(
        perm=(perm[0], perm[1], perm[2]),
        flip_axes=tuple(sorted(order[c] for c in flips)),
        affine=tuple(tuple(float(value) for value in row) for row in affine),
    )
    return Volume(
        array=canonical,
        units="HU",
        geometry=geometry,
        study_id=study_id,
        source=str(path),
        meta={"format": "NIfTI", "source_axcodes": "".join(str(c) for c in aff2axcodes(affine))},
        warnings=tuple(warnings),
        source_order=source_order,
    )


def write_nifti(
    path: Path, array_zyx: np.ndarray, volume: Volume, *, dtype: npt.DTypeLike | None = None
) -> Path:
    """Write a (z, y, x) output (mask, heat map) on ``volume``'s grid as NIfTI, atomically.

    With ``volume.source_order`` (NIfTI input) the file has exactly the input's
    voxel order, shape and affine; otherwise the affine is
    ``volume.geometry.affine_ras()`` and the array is stored as (x, y, z). The
    header carries no identifying text (descrip "corona-ct").
    """
    path = Path(path)
    if not path.name.endswith(_NIFTI_SUFFIXES):
        raise ConfigError(f"output {path} must end with .nii or .nii.gz")
    array_zyx = np.asarray(array_zyx)
    if array_zyx.shape != tuple(volume.geometry.shape):
        raise GeometryError(
            f"{path.name}: array shape {array_zyx.shape} differs from the CT grid {volume.geometry.shape}"
        )
    target = np.dtype(np.uint8 if array_zyx.dtype == np.bool_ else (dtype or array_zyx.dtype))
    if np.issubdtype(target, np.integer) and array_zyx.size:
        limits = np.iinfo(target)
        if (
            array_zyx.min() < limits.min
            or array_zyx.max() > limits.max
            or not np.array_equal(array_zyx, np.round(array_zyx))
        ):
            raise ConfigError(f"{path.name}: values do not fit {target}; write them as float32 instead")
    if volume.source_order is not None:
        data = volume.source_order.to_source(array_zyx)
        affine = np.asarray(volume.source_order.affine, dtype=np.float64)
    else:
        data = array_zyx.transpose(2, 1, 0)
        affine = volume.geometry.affine_ras()
    # nibabel writes Fortran order: a Fortran-ordered (x, y, z) array (the transposed view of a C-ordered
    # (z, y, x) one) is written without the two strided copies a C-ordered one would take
    image = nib.Nifti1Image(np.asfortranarray(data).astype(target, order="F", copy=False), affine)
    header = image.header
    header.set_data_dtype(target)
    header.set_xyzt_units("mm")
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    header["descrip"] = b"corona-ct"
    header["aux_file"] = b""
    header["intent_name"] = b""
    with atomic_path(path) as temporary:
        nib.save(image, temporary)
    return path
