"""Source-matched classifier training data: positives and negatives from the same scanners.

The first default classifier learnt where its images came from: every COVID whole-CT
slice came from one source and every other one from another. Here every source gives
both classes:

* COVID-CT-MD volumes (one scanner for COVID-19, community-acquired pneumonia and a
  normal patient): slices the radiologists labelled infected are positives, the clean
  slices of all three patients negatives;
* TCGA lung-cancer slices and LIDC series: negatives;
* phantom volumes: slices with lesions positive, the others negative; with ``phantom_lesion_free``
  every slice with lesions appears once more without them (the same phantom drawn lesion-free,
  negative), so that a phantom's look says nothing of its label;
* every clean slice also appears once more (``twins`` times) with counterfactual lesions
  (:mod:`data.lesions`) blended into its lungs: positive, with a known lesion mask.

Every image goes through the inference path of :func:`pipeline.run.analyze_study`:
the segmenter inference uses (the shipped U-Net), the case-wide lung box, the HU
window, the antialiased resize. Masks follow the same crop and resize; they are 1 on
the pasted lesion, 0 on clean slices and ``UNKNOWN_MASK`` (255) on real infected
slices, which have labels per slice only.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from corona_ct.data.lesions import TextureBank, paste_lesions
from corona_ct.data.phantom import make_phantom
from corona_ct.pipeline.atomic import atomic_path
from corona_ct.pipeline.config import PipelineConfig
from corona_ct.pipeline.datamodel import Geometry, Volume
from corona_ct.pipeline.errors import ConfigError, InputError
from corona_ct.pipeline.ingest import load_study
from corona_ct.pipeline.ingest.slices import read_slice_image
from corona_ct.pipeline.preprocess import (
    ROI_LUNG_BOX,
    evaluable_slices,
    input_lungs,
    lung_bounding_box,
    roi_name,
    to_model_input,
    window,
)

log = logging.getLogger(__name__)

UNKNOWN_MASK = 255
#: The COVID-CT-MD patients (one scanner) and the diagnosis of each.
CTMD_DIAGNOSES = {"P002": "COVID-19", "cap002": "pneumonia", "normal001": "normal"}
CTMD_PATIENTS = tuple(CTMD_DIAGNOSES)
LIDC_SERIES = ("LIDC-IDRI-0001", "LIDC-IDRI-0002")
SegmentFn = Callable[[Volume], npt.NDArray[np.uint8]]


@dataclass
class PreparedSlices:
    """Network-ready grey slices with labels, lesion masks and provenance, one row each."""

    images: torch.Tensor  # (n, S, S) float16 in [0, 1]
    labels: npt.NDArray[np.int64]  # 1 = opacity (infected or pasted lesion), 0 = clean
    masks: npt.NDArray[np.uint8]  # (n, S, S) 1 lesion, 0 none, 255 unknown
    groups: list[str] = field(default_factory=list)  # patient / series
    kinds: list[str] = field(default_factory=list)  # clean, infected, counterfactual, phantom-lesion(-free)
    roi: str = ROI_LUNG_BOX  # the classifier input made (a card's ``input.roi``): lung box, or lung only

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, keep: npt.NDArray[np.bool_]) -> PreparedSlices:
        index = np.flatnonzero(keep)
        return PreparedSlices(
            self.images[torch.as_tensor(index)],
            self.labels[index],
            self.masks[index],
            [self.groups[i] for i in index],
            [self.kinds[i] for i in index],
            self.roi,
        )

    @staticmethod
    def concat(parts: Sequence[PreparedSlices]) -> PreparedSlices:
        if not parts:
            raise InputError("no training slices were prepared")
        rois = sorted({p.roi for p in parts})
        if len(rois) > 1:
            raise InputError(f"prepared slices of different inputs ({', '.join(rois)}) cannot be joined")
        return PreparedSlices(
            torch.cat([p.images for p in parts]),
            np.concatenate([p.labels for p in parts]),
            np.concatenate([p.masks for p in parts]),
            [g for p in parts for g in p.groups],
            [k for p in parts for k in p.kinds],
            rois[0],
        )

    def save(self, path: Path) -> None:
        tensors = {
            "images": self.images.contiguous(),
            "labels": torch.as_tensor(self.labels),
            "masks": torch.as_tensor(self.masks),
        }
        metadata = {"groups": "\n".join(self.groups), "kinds": "\n".join(self.kinds), "roi": self.roi}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    @classmethod
    def load(cls, path: Path) -> PreparedSlices:
        if not Path(path).is_file():
            raise InputError(
                f"{path}: no prepared training set there; write it with `build_defaults prepare`"
            )
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
            images = handle.get_tensor("images")
            labels = handle.get_tensor("labels").numpy()
            masks = handle.get_tensor("masks").numpy()
        groups, kinds = metadata["groups"].split("\n"), metadata["kinds"].split("\n")
        return cls(
            images, labels, masks, groups, kinds, metadata.get("roi", ROI_LUNG_BOX)
        )  # older files: box only


def single_slice_volume(path: Path, config: PipelineConfig, study_id: str) -> Volume:
    """One DICOM/TIFF/PNG slice as a 1-slice ``Volume`` (nominal 1 mm voxels, as ``explain`` reads it)."""
    array, units = read_slice_image(path, config.ingest)
    height, width = array.shape
    return Volume(
        array=np.ascontiguousarray(array[None], dtype=np.float32),
        units="HU" if units == "HU" else "window",
        geometry=Geometry((1, height, width), (1.0, 1.0, 1.0)),
        study_id=study_id,
        source=str(path),
        spacing_known=False,
    )


def ctmd_infection_labels(volume: Volume, labels_csv: Path, patient: str) -> npt.NDArray[np.int64]:
    """Per-slice infection labels (0/1) of a COVID-CT-MD volume, matched by slice position (mm)."""
    with open(labels_csv, newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["patient"] == patient]
    if len(rows) != volume.n_slices:
        raise InputError(
            f"{labels_csv}: {len(rows)} labels for {patient} but the series has {volume.n_slices} slices"
        )
    locations = np.array([float(r["slice_location"]) for r in rows])
    infection = np.array([int(r["infection"]) for r in rows], dtype=np.int64)
    positions = volume.geometry.slice_positions_mm()
    nearest = np.abs(positions[:, None] - locations[None, :]).argmin(axis=1)
    if np.abs(positions - locations[nearest]).max() > 0.5 or len(set(nearest.tolist())) != len(rows):
        raise InputError(f"{labels_csv}: slice locations of {patient} do not match its series")
    return infection[nearest]


def volume_slices(
    volume: Volume,
    lung_labels: npt.NDArray[np.uint8],
    config: PipelineConfig,
    size: int,
    group: str,
    rng: np.random.Generator,
    infected: npt.NDArray[np.int64] | None = None,
    lesion_masks: npt.NDArray[np.bool_] | None = None,
    stride: int = 1,
    bank: TextureBank | None = None,
    counterfactual: bool = True,
    twins: int = 1,
    twin_rng: np.random.Generator | None = None,
    lesion_free_hu: npt.NDArray[Any] | None = None,
) -> PreparedSlices:
    """Every ``stride``-th classified slice of one study, cropped to its case-wide lung box (and
    blanked outside the lungs under ``config.roi.mask_outside_lungs``).

    ``infected``: per-slice labels (real positives, masks unknown); ``lesion_masks``: exact
    lesion truth (phantoms). Clean slices get ``twins`` counterfactual twins when ``counterfactual``,
    each with lesions of its own: the first drawn from ``rng``, the others from ``twin_rng`` (default
    ``rng``), so that with a separate ``twin_rng`` everything of a one-twin set stays as it was.
    ``lesion_free_hu``: the same study without its ``lesion_masks`` (HU, same grid); each slice with a
    lesion then also appears from it, negative, on the same lungs and box ("phantom-lesion-free").
    """
    if twins < 1:
        raise ConfigError(f"{group}: twins must be at least 1, got {twins}")
    lungs = lung_labels > 0
    box = lung_bounding_box(lungs, config.roi)
    if box is None:
        log.warning("%s: no lungs, no training slices", group)
        return PreparedSlices(
            torch.zeros(0, size, size, dtype=torch.float16),
            np.zeros(0, np.int64),
            np.zeros((0, size, size), np.uint8),
            roi=roi_name(config.roi),
        )
    chosen = np.flatnonzero(evaluable_slices(lungs, config.roi))[::stride]
    hu = volume.array
    images, labels, masks, kinds = [], [], [], []

    def add(slice_hu: np.ndarray, label: int, mask: np.ndarray | None, kind: str, z: int) -> None:
        windowed = window(slice_hu[None], volume.units, config.window)
        inside = input_lungs(lungs[z : z + 1], config.roi)
        images.append(to_model_input(windowed, box, size, inside)[0, 0].to(torch.float16))
        if mask is None:
            masks.append(np.full((size, size), UNKNOWN_MASK, np.uint8))
        else:
            resized = to_model_input(mask[None].astype(np.float32), box, size)[0, 0]
            masks.append((resized.numpy() > 0.5).astype(np.uint8))
        labels.append(label)
        kinds.append(kind)

    for z in chosen:
        if lesion_masks is not None and lesion_masks[z].any():
            add(hu[z], 1, lesion_masks[z], "phantom-lesion", z)
            if lesion_free_hu is not None:
                add(lesion_free_hu[z], 0, np.zeros(hu.shape[1:], dtype=bool), "phantom-lesion-free", z)
            continue
        if infected is not None and infected[z]:
            add(hu[z], 1, None, "infected", z)
            continue
        empty = np.zeros(hu.shape[1:], dtype=bool)
        add(hu[z], 0, empty, "clean", z)
        for twin in range(twins if counterfactual and volume.units == "HU" else 0):
            pasted, lesion = paste_lesions(hu[z], lungs[z], rng if twin == 0 else (twin_rng or rng), bank)
            if lesion.any():
                add(pasted, 1, lesion, "counterfactual", z)
    n = len(labels)
    return PreparedSlices(
        torch.stack(images) if n else torch.zeros(0, size, size, dtype=torch.float16),
        np.asarray(labels, dtype=np.int64),
        np.stack(masks) if n else np.zeros((0, size, size), np.uint8),
        [group] * n,
        kinds,
        roi_name(config.roi),
    )


def build_source_matched(
    data_root: Path,
    segment: SegmentFn,
    config: PipelineConfig,
    size: int,
    bank: TextureBank | None,
    *,
    exclude: Sequence[str] = (),
    ctmd_stride: int = 2,
    phantom_seeds: Sequence[int] = (1000, 1001, 1002),
    seed: int = 0,
    twins: int = 1,
    phantom_lesion_free: bool = False,
    progress: Callable[[str], None] | None = None,
) -> PreparedSlices:
    """All source-matched training slices from ``../shared/data`` (groups in ``exclude`` left out);
    ``twins`` counterfactual twins per clean slice (the set of ``twins=1`` plus more twins);
    ``phantom_lesion_free``: each phantom slice with lesions also without them, negative (the set
    without them plus those slices; no random draw changes)."""
    rng = np.random.default_rng(seed)
    twin_rng = np.random.default_rng([seed, 1])  # twins after the first: the one-twin draws stay as they were
    parts: list[PreparedSlices] = []

    def note(name: str) -> None:
        if progress is not None:
            progress(name)

    def slices(volume: Volume, group: str, **truth: Any) -> PreparedSlices:
        """``volume_slices`` of one study with the run's settings; ``truth``: its labels or lesion masks."""
        return volume_slices(
            volume,
            segment(volume),
            config,
            size,
            group,
            rng,
            bank=bank,
            twins=twins,
            twin_rng=twin_rng,
            **truth,
        )

    for patient in CTMD_PATIENTS:
        if patient in exclude:
            continue
        volume = load_study(data_root / "covid-ct-md" / patient, config.ingest)
        infected = ctmd_infection_labels(volume, data_root / "covid-ct-md" / "slice_labels.csv", patient)
        parts.append(slices(volume, patient, infected=infected, stride=ctmd_stride))
        note(patient)
    for series in LIDC_SERIES:
        if series in exclude:
            continue
        parts.append(slices(load_study(data_root / "dicom" / series, config.ingest), series))
        note(series)
    tcga = data_root / "tcga-slices"
    for patient_dir in sorted(p for p in tcga.iterdir() if p.is_dir()):
        if patient_dir.name in exclude:
            continue
        for dicom in sorted(patient_dir.glob("*.dcm")):
            parts.append(slices(single_slice_volume(dicom, config, patient_dir.name), patient_dir.name))
        note(patient_dir.name)
    for phantom_seed in phantom_seeds:
        name = f"phantom-{phantom_seed}"
        if name in exclude:
            continue
        phantom = make_phantom(
            seed=phantom_seed, lesions="mixed", lesion_volume_ml=float(rng.uniform(40, 250))
        )
        # the same seed without lesions: the same anatomy and noise
        lesion_free = make_phantom(seed=phantom_seed).hu if phantom_lesion_free else None
        parts.append(
            slices(
                phantom.to_volume(name),
                name,
                lesion_masks=np.asarray(phantom.lesion_mask),
                lesion_free_hu=lesion_free,
            )
        )
        note(name)
    return PreparedSlices.concat(parts)
