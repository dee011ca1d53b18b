"""One frozen configuration for every stage, with the papers' values as defaults.

``PipelineConfig()`` is the Gozes et al. (2020) setting. Change values with
``load_config(path, overrides)``: ``path`` is a JSON file with the same nested
structure as ``to_dict()``, ``overrides`` are ``"section.field=value"`` strings
(values parsed as JSON, falling back to a plain string).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corona_ct.pipeline.errors import ConfigError


@dataclass(frozen=True)
class IngestConfig:
    """Reading and checking input series."""

    tiff_hu_offset: float = -1024.0  # COVID-CTset: HU = raw value + offset
    spacing_tolerance: float = 0.05  # relative deviation of slice gaps tolerated silently
    max_gap_factor: float = 3.0  # a gap larger than this many nominal spacings is an error
    max_tilt_degrees: float = 0.5  # gantry tilt above this is warned about
    max_pixels_per_slice: int = 4096 * 4096  # refuse headers that declare absurd sizes
    max_slices: int = 5000
    min_slices: int = 2


@dataclass(frozen=True)
class WindowConfig:
    """HU window mapped to [0, 1] before the networks."""

    hu_min: float = -1000.0
    hu_max: float = 0.0


@dataclass(frozen=True)
class SegmentConfig:
    """Lung segmentation."""

    method: str = "auto"  # "auto" (U-Net when weights are given, else classical), "unet", "classical"
    lung_hu_threshold: float = -320.0  # air/lung below this HU (classical segmenter)
    lung_window_threshold: float = 0.68  # same threshold on [0, 1] windowed stacks
    min_lung_volume_ml: float = 5.0  # smaller components are noise
    closing_radius_mm: float = 10.0  # closes dense lesions and vessels into the lung
    batch_size: int = 8


@dataclass(frozen=True)
class RoiConfig:
    """Case-wide lung bounding box and network input size."""

    margin_fraction: float = 0.05  # margin added on each side, fraction of the box size
    input_size: int = 0  # network input side; 0 = the backbone's native size (224 for ResNet-50)
    min_lung_pixels: int = 200  # a slice with less lung than this is not classified


@dataclass(frozen=True)
class ClassifyConfig:
    """Slice classifier and case decision."""

    backbone: str = "resnet50"
    batch_size: int = 16
    positive_threshold: float = 0.5  # slice is positive when p >= this
    case_aggregation: str = "top_mean"  # "max" or "top_mean"
    case_top_fraction: float = 0.1  # fraction of evaluated slices averaged for "top_mean"


@dataclass(frozen=True)
class CamConfig:
    """Multi-scale Grad-CAM."""

    layers: tuple[
        str, ...
    ] = ()  # hooked modules; () = the backbone's own (ResNet-50: layer2 28×28, layer3 14×14 at 224 px)
    fusion: str = "product"  # "product" (Gozes et al.: regions every scale marks) or "mean"
    activation_threshold: float = 0.6  # cmap > this counts towards the Corona score


@dataclass(frozen=True)
class SeverityConfig:
    """Weights-free HU measures inside the lungs; every step in-plane (``pipeline/severity.py``)."""

    ggo_hu: tuple[float, float] = (-750.0, -300.0)  # ground glass: lo <= smoothed HU <= hi
    consolidation_hu: tuple[float, float] = (-300.0, 50.0)  # consolidation: lo < lightly smoothed HU <= hi
    ggo_contrast_hu: float = 150.0  # ground glass also >= the study's aerated-lung level + this, HU; 0: off
    edge_margin_mm: float = 2.5  # lung rim left out in-plane (partial volume: chest wall, heart), mm
    edge_margin_slices: int = 1  # lung voxels within this many slices of the lung's top/bottom left out
    vessel_hu: float = -300.0  # above this after light smoothing: bright (vessel, airway wall, dense), HU
    vessel_smoothing_mm: float = 0.7  # Gaussian sigma of that light smoothing, mm
    vessel_width_mm: float = 5.0  # narrower bright structures are vessels (opening diameter), mm; and
    # ground glass must be at least this wide
    vessel_contrast_hu: float = 300.0  # narrower structures this much brighter than their surroundings
    # are vessels too, however dim (white top-hat, HU); 0: off
    vessel_margin_mm: float = 1.5  # rim left out around bright structures (partial volume), mm
    consolidation_reach_mm: float = 20.0  # consolidation must lie in a closing of the aerated lung with
    # a disk of this radius, or in a hole of it (not a mask leak into heart or liver), mm; 0: off
    noise_target_hu: float = 30.0  # per slice, smooth until the lung's noise SD is at most this, HU
    max_smoothing_mm: float = 3.0  # largest Gaussian sigma of that smoothing, mm; 0: none


@dataclass(frozen=True)
class RuntimeConfig:
    """Devices and numerics."""

    device: str = "auto"  # "auto", "cpu" or "cuda"
    amp: bool = True  # bf16 autocast and channels_last on CUDA
    seed: int = 0


@dataclass(frozen=True)
class PipelineConfig:
    ingest: IngestConfig = field(default_factory=IngestConfig)
    window: WindowConfig = field(default_factory=WindowConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    roi: RoiConfig = field(default_factory=RoiConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    cam: CamConfig = field(default_factory=CamConfig)
    severity: SeverityConfig = field(default_factory=SeverityConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Short stable hash of every value (12 hex digits); runtime settings excluded."""
        values = self.to_dict()
        values.pop("runtime")
        text = json.dumps(values, sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def replace(self, overrides: Mapping[str, Any]) -> PipelineConfig:
        """Copy with ``{"section.field": value}`` overrides applied and type-checked."""
        sections: dict[str, dict[str, Any]] = {}
        for key, value in overrides.items():
            section, _, name = key.partition(".")
            if section not in _SECTIONS or not name:
                raise ConfigError(f"unknown config key {key!r}; sections are {', '.join(_SECTIONS)}")
            sections.setdefault(section, {})[name] = value
        updated: dict[str, Any] = {}
        for section, values in sections.items():
            current = getattr(self, section)
            updated[section] = dataclasses.replace(current, **_coerce_fields(current, values, section))
        return dataclasses.replace(self, **updated)


_SECTIONS = tuple(f.name for f in dataclasses.fields(PipelineConfig))


def _coerce_fields(instance: Any, values: Mapping[str, Any], section: str) -> dict[str, Any]:
    known = {f.name: f for f in dataclasses.fields(instance)}
    coerced: dict[str, Any] = {}
    for name, value in values.items():
        if name not in known:
            raise ConfigError(
                f"unknown config key {section}.{name}; {section} has {', '.join(sorted(known))}"
            )
        default = getattr(instance, name)
        try:
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise TypeError
            elif isinstance(default, tuple):
                value = (
                    tuple(type(d)(v) for d, v in zip(default, value, strict=False))
                    if default
                    else tuple(value)
                )
                if default and len(value) != len(default):
                    raise TypeError
            else:
                value = type(default)(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"config value {section}.{name}={value!r} should look like {default!r}"
            ) from None
        coerced[name] = value
    return coerced


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Parse ``section.field=value`` strings (value as JSON, else as text)."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        try:
            overrides[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key.strip()] = raw
    return overrides


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> PipelineConfig:
    """Defaults, then a JSON file's values, then ``section.field=value`` overrides."""
    config = PipelineConfig()
    if path is not None:
        try:
            loaded = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ConfigError(f"cannot read config file {path}: {error}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a JSON object of sections")
        flat = {}
        for section, values in loaded.items():
            if not isinstance(values, dict):
                raise ConfigError(f"config file {path}: section {section!r} must be an object")
            flat.update({f"{section}.{name}": value for name, value in values.items()})
        config = config.replace(flat)
    return config.replace(parse_overrides(overrides))
