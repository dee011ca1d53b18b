"""The not-assessable gate: is there a plausible pair of lungs to call COVID-19 on?

A series without lungs in view (an abdominal CT, a scout, a head CT) or with a lung mask
that cannot be lungs must not be called positive or negative: the segmenter, and above
all the U-Net, draws small "lungs" on subcutaneous fat and bowel gas, and the classifier
then scores whatever lies in that box. :func:`assess_lungs` measures the lung mask after
segmentation and returns why the study is not assessable, or None.

Rules, in this order (all that apply are reported):

1. no lung voxel at all;
2. HU input: the median of the lung voxels is above ``MAX_LUNG_MEDIAN_HU`` (the mask lies on
   fat or soft tissue, not on aerated lung);
3. a lung slice is one whose lung cross-section reaches ``MIN_LUNG_AREA_CM2`` (with unknown
   pixel spacing, i.e. slice images in nominal 1 mm pixels: whose lungs cover
   ``MIN_LUNG_BODY_FRACTION`` of the body area); no lung slice at all means no lungs in view,
   or a segmentation that missed them (either way the lung crop the classifier needs is wrong);
4. a series of at least ``MIN_SLICES_FOR_EXTENT_RULE`` slices with lung slices on fewer than
   ``MIN_LUNG_SLICES`` of them shows at most the lung bases or apices (or a stray false mask).

Measured on ../shared/data with the shipped U-Net, classical segmenter in brackets (table in
docs/usage.md); columns: mask volume cm³, widest slice cm², slices ≥ 40 cm², median HU::

    abdomen-j2k     20 × 2 mm      18 [0]        6.7 [0]     0/20 [0]         −842 [—]
    LIDC-IDRI-0001  16 × 2.5 mm    934 [948]     244 [250]   16/16 [16/16]    −875 [−875]
    LIDC-IDRI-0002  12 × 1.25 mm   268 [263]     198 [197]   12/12 [12/12]    −878 [−878]
    normal001       154 × 2 mm     3993 [4617]   253 [222]   110/154 [154]    −826 [−831]
    P002 (COVID)    133 × 2 mm     4083 [4289]   274 [274]   98/133 [101]     −877 [−874]

The abdomen's false U-Net mask lies on 18 of its 20 slices and has a lung-like median (gas
mixed with fat): only the area rule catches it. Without the gate it got a case probability
of 0.81 (a positive call). Pre-windowed single images (no spacing): the U-Net's mask passes the
8 % rule on all 50 COVID-SemiSeg train slices (smallest share 0.18), and fails it on 4 of 60
UCSD COVID and 18 of 60 UCSD non-COVID figure crops, where it misses the lungs altogether.
"""

from __future__ import annotations

import numpy as np

from corona_ct.pipeline.config import SegmentConfig
from corona_ct.pipeline.datamodel import LungCheck, LungMask, Volume
from corona_ct.pipeline.segment.classical import MIN_LUNG_BODY_FRACTION
from corona_ct.pipeline.segment.regions import body_mask, low_density, outside_air

NO_LUNGS_REASON = "no lungs found"

#: Smallest lung cross-section (cm², both lungs) that the widest lung slice of a chest CT reaches.
#: Measured widest slices: 198-274 cm² on the four chest series above (LIDC-IDRI-0002 is a 15 mm
#: slab and still has 198 cm² on every slice); the U-Net's false "lungs" on the abdomen reach
#: 6.7 cm². 40 cm² is 5× below the smallest chest and 6× above the abdomen.
MIN_LUNG_AREA_CM2 = 40.0
#: Median HU of the lung voxels above which the mask is not on aerated lung (fat ≈ −100 HU, muscle
#: and bowel wall ≈ +40 HU). Measured lung medians: −826 to −878 HU (COVID P002 −877 HU). The limit
#: is the top of the ground-glass range (``SeverityConfig.ggo_hu`` = −750…−300 HU): a lung wholly in
#: ground glass must stay assessable, so −500 HU would cut into the sickest patients.
MAX_LUNG_MEDIAN_HU = -300.0
#: A series needs lung slices (see module doc) on at least this many slices ...
MIN_LUNG_SLICES = 3
#: ... when it has at least this many slices (short series and single slices are exempt).
MIN_SLICES_FOR_EXTENT_RULE = 10
#: The limits above by name, as report.json's ``lung_check.rules`` shows them.
RULES: tuple[tuple[str, float], ...] = (
    ("min_lung_area_cm2", MIN_LUNG_AREA_CM2),
    ("min_lung_body_fraction", MIN_LUNG_BODY_FRACTION),
    ("max_lung_median_hu", MAX_LUNG_MEDIAN_HU),
    ("min_lung_slices", MIN_LUNG_SLICES),
    ("min_slices_for_extent_rule", MIN_SLICES_FOR_EXTENT_RULE),
)


def check_lungs(volume: Volume, lung_mask: LungMask, config: SegmentConfig | None = None) -> LungCheck:
    """Measure ``lung_mask`` on ``volume`` and apply the rules of the module doc.

    ``config`` gives the low-density threshold of the body outline (used only when the
    pixel spacing is unknown); the default config when None.
    """
    lungs = np.asarray(lung_mask.lungs)
    n_slices = volume.n_slices
    geometry = volume.geometry
    lung_px = lungs.sum(axis=(1, 2))
    volume_cm3 = float(lung_px.sum()) * geometry.voxel_ml
    slices_with_lung = int(np.count_nonzero(lung_px))
    if slices_with_lung == 0:
        return LungCheck(
            0.0, 0.0 if volume.spacing_known else None, None, None, 0, 0, n_slices, (NO_LUNGS_REASON,), RULES
        )

    reasons: list[str] = []
    median_hu = None
    if volume.units == "HU":
        median_hu = float(np.median(volume.array[lungs]))
        if median_hu > MAX_LUNG_MEDIAN_HU:
            reasons.append(
                f"the lung mask is not on aerated lung: its median is {median_hu:.0f} HU "
                f"(lungs are below {MAX_LUNG_MEDIAN_HU:.0f} HU; fat and soft tissue lie above)"
            )

    largest_area: float | None = None
    largest_fraction: float | None = None
    if volume.spacing_known:
        _, dy, dx = geometry.spacing_mm
        area_cm2 = lung_px * (dy * dx / 100.0)
        largest_area = float(area_cm2.max())
        is_lung_slice = area_cm2 >= MIN_LUNG_AREA_CM2
        if not is_lung_slice.any():
            reasons.append(
                f"lung mask too small for a chest: its largest cross-section is {largest_area:.1f} cm² "
                f"(a chest CT through the lungs has ≥ {MIN_LUNG_AREA_CM2:g} cm² on its widest slice)"
            )
    else:
        low = low_density(volume.array, volume.units, config or SegmentConfig())
        body_px = body_mask(~outside_air(low)).sum(axis=(1, 2))
        fraction = np.divide(lung_px, body_px, out=np.zeros(n_slices), where=body_px > 0)
        largest_fraction = float(fraction.max())
        is_lung_slice = fraction >= MIN_LUNG_BODY_FRACTION
        if not is_lung_slice.any():
            reasons.append(
                f"lung mask too small for a chest: it covers at most {100 * largest_fraction:.1f} % of the "
                f"body area on any slice (a chest slice through the lungs: ≥ {100 * MIN_LUNG_BODY_FRACTION:g} %)"
            )
    lung_slices = int(np.count_nonzero(is_lung_slice))
    if n_slices >= MIN_SLICES_FOR_EXTENT_RULE and 0 < lung_slices < MIN_LUNG_SLICES:
        rule = f"≥ {MIN_LUNG_AREA_CM2:g} cm²" if volume.spacing_known else "of chest size"
        reasons.append(
            f"lungs ({rule}) on only {lung_slices} of {n_slices} slices (fewer than {MIN_LUNG_SLICES}): "
            "the series shows at most the lung bases or apices"
        )
    return LungCheck(
        lung_volume_cm3=volume_cm3,
        largest_area_cm2=largest_area,
        largest_body_fraction=largest_fraction,
        median_hu=median_hu,
        slices_with_lung=slices_with_lung,
        lung_slices=lung_slices,
        n_slices=n_slices,
        reasons=tuple(reasons),
        rules=RULES,
    )


def assess_lungs(volume: Volume, lung_mask: LungMask, config: SegmentConfig | None = None) -> str | None:
    """Why the study is not assessable (one line), or None when its lungs are plausible."""
    return check_lungs(volume, lung_mask, config).reason
