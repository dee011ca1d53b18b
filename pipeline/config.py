"""One frozen configuration for every stage, with the papers' values as defaults.

``PipelineConfig()`` is the Gozes et al. (2020) setting. Change values with
``load_config(path, overrides)``: ``path`` is a JSON file with the same nested
structure as ``to_dict()``, ``overrides`` are ``"section.field=value"`` strings
(values parsed as JSON, falling back to a plain string).

Every value is checked when a section is made (``__post_init__``), so a wrong
setting fails at load, before any work: numbers against their allowed range
(NaN and infinity are never allowed), names against the allowed choices. A new
numeric field must declare its range with ``_num(default, lo, hi)``; the tests
fail for a field without one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from corona_ct.pipeline.errors import ConfigError

#: Allowed values of the enumerated settings (``tests/pipeline/test_config_ranges.py`` checks that the
#: stages accept exactly these: ``classify.CASE_AGGREGATIONS``, ``explain.FUSION_METHODS``).
SEGMENT_METHODS = ("auto", "unet", "classical")
CASE_AGGREGATIONS = ("max", "top_mean")
CAM_FUSIONS = ("product", "mean")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")

_HU_LOW, _HU_HIGH = -2048.0, 4095.0  # any CT value after rescale, HU


class Range(NamedTuple):
    """Allowed interval of a numeric setting; ``open_low`` excludes ``low`` itself."""

    low: float
    high: float
    open_low: bool = False

    def contains(self, value: float) -> bool:
        return (
            math.isfinite(value)
            and (value > self.low if self.open_low else value >= self.low)
            and (value <= self.high)
        )

    def describe(self) -> str:
        return f"{'(' if self.open_low else '['}{self.low:g}, {self.high:g}]"


def _num(default: Any, low: float, high: float, *, open_low: bool = False) -> Any:
    """A numeric field (or tuple of numbers) with its allowed range, checked at load."""
    return field(default=default, metadata={"range": Range(low, high, open_low)})


def _choice(default: str, choices: tuple[str, ...]) -> Any:
    """A text field with its allowed values, checked at load."""
    return field(default=default, metadata={"choices": choices})


class _Checked:
    """Mixin: every section validates its values when made (load, ``replace``, Python API)."""

    def __post_init__(self) -> None:
        _validate(self)


@dataclass(frozen=True)
class IngestConfig(_Checked):
    """Reading and checking input series."""

    tiff_hu_offset: float = _num(-1024.0, -4096, 4096)  # COVID-CTset: HU = raw value + offset
    spacing_tolerance: float = _num(0.05, 0, 1)  # relative deviation of slice gaps tolerated silently
    max_gap_factor: float = _num(3.0, 1, 1000)  # a gap larger than this many nominal spacings is an error
    max_tilt_degrees: float = _num(0.5, 0, 45)  # gantry tilt above this is warned about
    max_pixels_per_slice: int = _num(4096 * 4096, 1, 2**32)  # refuse headers that declare absurd sizes
    max_slices: int = _num(5000, 1, 100_000)
    min_slices: int = _num(2, 1, 100_000)


@dataclass(frozen=True)
class WindowConfig(_Checked):
    """HU window mapped to [0, 1] before the networks."""

    hu_min: float = _num(-1000.0, _HU_LOW, _HU_HIGH)
    hu_max: float = _num(0.0, _HU_LOW, _HU_HIGH)


@dataclass(frozen=True)
class SegmentConfig(_Checked):
    """Lung segmentation."""

    method: str = _choice("auto", SEGMENT_METHODS)  # "auto": U-Net when weights are given, else classical
    lung_hu_threshold: float = _num(-320.0, -1024, 0)  # air/lung below this HU (classical segmenter)
    lung_window_threshold: float = _num(0.68, 0, 1)  # same threshold on [0, 1] windowed stacks
    min_lung_volume_ml: float = _num(5.0, 0, 10_000)  # smaller components are noise
    closing_radius_mm: float = _num(10.0, 0, 100)  # closes dense lesions and vessels into the lung
    batch_size: int = _num(8, 1, 4096)  # slices per U-Net forward pass


@dataclass(frozen=True)
class RoiConfig(_Checked):
    """Case-wide lung bounding box and network input size."""

    margin_fraction: float = _num(0.05, 0, 1)  # margin added on each side, fraction of the box size
    input_size: int = _num(0, 0, 4096)  # network input side, px; 0 = the backbone's native size (224)
    min_lung_pixels: int = _num(200, 0, 10**8)  # a slice with less lung than this is not classified
    mask_outside_lungs: bool = False  # classifier input: pixels outside the lung mask set to air (0)


@dataclass(frozen=True)
class ClassifyConfig(_Checked):
    """Slice classifier and case decision."""

    backbone: str = "resnet50"  # checked against the model registry when the models load
    batch_size: int = _num(16, 1, 4096)  # slices per classifier forward pass
    positive_threshold: float = _num(0.5, 0, 1)  # slice is positive when p >= this
    case_aggregation: str = _choice("top_mean", CASE_AGGREGATIONS)
    case_top_fraction: float = _num(0.1, 0, 1, open_low=True)  # fraction of slices averaged for "top_mean"


@dataclass(frozen=True)
class CamConfig(_Checked):
    """Multi-scale Grad-CAM."""

    layers: tuple[
        str, ...
    ] = ()  # hooked modules; () = the backbone's own (ResNet-50: layer2 28×28, layer3 14×14)
    fusion: str = _choice(
        "product", CAM_FUSIONS
    )  # "product" (Gozes et al.: regions every scale marks) or "mean"
    activation_threshold: float = _num(0.6, 0, 1)  # cmap > this counts towards the Corona score


@dataclass(frozen=True)
class SeverityConfig(_Checked):
    """Weights-free HU measures inside the lungs; every step in-plane (``pipeline/severity.py``)."""

    ggo_hu: tuple[float, float] = _num((-750.0, -300.0), -1024, 1000)  # ground glass: lo <= smoothed HU <= hi
    consolidation_hu: tuple[float, float] = _num(
        (-300.0, 50.0), -1024, 1000
    )  # lo < lightly smoothed HU <= hi
    ggo_contrast_hu: float = _num(
        150.0, 0, 1000
    )  # ground glass also >= aerated-lung level + this, HU; 0: off
    edge_margin_mm: float = _num(2.5, 0, 50)  # lung rim left out in-plane (chest wall, heart), mm
    edge_margin_slices: int = _num(
        1, 0, 100
    )  # lung voxels within this many slices of its top/bottom left out
    vessel_hu: float = _num(-300.0, -1024, 1000)  # above this after light smoothing: bright, HU
    vessel_smoothing_mm: float = _num(0.7, 0, 20)  # Gaussian sigma of that light smoothing, mm
    vessel_width_mm: float = _num(5.0, 0, 50)  # narrower bright structures are vessels (opening diameter),
    # mm; and ground glass must be at least this wide
    vessel_contrast_hu: float = _num(300.0, 0, 3000)  # narrower structures this much brighter than their
    # surroundings are vessels too, however dim (white top-hat, HU); 0: off
    vessel_margin_mm: float = _num(1.5, 0, 50)  # rim left out around bright structures (partial volume), mm
    consolidation_reach_mm: float = _num(20.0, 0, 200)  # consolidation must lie in a closing of the aerated
    # lung with a disk of this radius, or in a hole of it (not a mask leak into heart or liver), mm; 0: off
    noise_target_hu: float = _num(
        30.0, 0, 1000, open_low=True
    )  # smooth until the lung's noise SD <= this, HU
    max_smoothing_mm: float = _num(3.0, 0, 20)  # largest Gaussian sigma of that smoothing, mm; 0: none


@dataclass(frozen=True)
class RuntimeConfig(_Checked):
    """Devices and numerics."""

    device: str = "auto"  # "auto", "cpu", "cuda" or "cuda:N"
    amp: bool = True  # bf16 autocast and channels_last on CUDA
    seed: int = _num(0, 0, 2**32 - 1)
    # glibc: keep freed memory in the process for the next array instead of faulting large arrays in
    # afresh (pipeline.memory.hold_freed_memory; the process keeps its peak memory until it ends)
    hold_freed_memory: bool = True


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
_SECTION_OF: dict[object, str] = {f.default_factory: f.name for f in dataclasses.fields(PipelineConfig)}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _validate(section: Any) -> None:
    """Raise ``ConfigError`` naming the setting, the value and what is allowed, for the first bad value."""
    name = _SECTION_OF.get(type(section), type(section).__name__)
    for spec in dataclasses.fields(section):
        value = getattr(section, spec.name)
        key = f"{name}.{spec.name}"
        allowed = spec.metadata.get("range")
        if allowed is not None:
            numbers = value if isinstance(value, tuple) else (value,)
            if not all(_is_number(v) for v in numbers):
                raise ConfigError(
                    f"config value {key}={value!r} must be a number (or numbers), in {allowed.describe()}"
                )
            bad = [v for v in numbers if not allowed.contains(float(v))]
            if bad:
                raise ConfigError(
                    f"config value {key}={value!r} is out of range: allowed is a finite number in "
                    f"{allowed.describe()}" + (" for each of the pair" if isinstance(value, tuple) else "")
                )
            if isinstance(value, tuple) and len(value) == 2 and not value[0] < value[1]:
                raise ConfigError(
                    f"config value {key}={value!r}: the lower bound must be below the upper bound"
                )
        choices = spec.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(
                f"config value {key}={value!r} is not allowed; choose one of {', '.join(choices)}"
            )
    _check_section_rules(name, section)


def _check_section_rules(name: str, section: Any) -> None:
    """Rules that tie several values of one section together."""
    if isinstance(section, WindowConfig) and not section.hu_min < section.hu_max:
        raise ConfigError(
            f"config values window.hu_min={section.hu_min!r} and window.hu_max={section.hu_max!r}: "
            "hu_min must be below hu_max"
        )
    if isinstance(section, IngestConfig) and section.min_slices > section.max_slices:
        raise ConfigError(
            f"config values ingest.min_slices={section.min_slices} and ingest.max_slices={section.max_slices}: "
            "min_slices must not exceed max_slices"
        )
    if isinstance(section, RoiConfig) and 0 < section.input_size < 32:
        raise ConfigError(
            f"config value roi.input_size={section.input_size} is too small: 0 (the backbone's native size) "
            "or at least 32 pixels"
        )
    if isinstance(section, RuntimeConfig) and not (
        isinstance(section.device, str) and DEVICE_PATTERN.fullmatch(section.device.strip().lower())
    ):
        raise ConfigError(
            f"config value {name}.device={section.device!r} is not allowed; use auto, cpu, cuda or cuda:N"
        )
    if isinstance(section, CamConfig) and not all(
        isinstance(layer, str) and layer for layer in section.layers
    ):
        raise ConfigError(
            f"config value cam.layers={section.layers!r} must name network layers (no empty names), "
            "or be [] for the backbone's own"
        )


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
            elif isinstance(default, int):
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise TypeError
                value = int(value)
            else:
                value = type(default)(value)
        except (TypeError, ValueError, OverflowError):
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
