"""Every config field acts: changing it changes something downstream (a field that changes nothing is a defect).

Each field of ``PipelineConfig`` has a probe here: a changed value and what it must change.
Result fields are probed on a phantom study (untrained weights, 64 px input); ingest
fields on a DICOM series written to make them matter; batch sizes, ``amp`` and the device,
which must not change results, on the calls they control. A new field without a probe
fails ``test_every_field_has_a_probe``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from corona_ct.data.phantom import make_phantom
from corona_ct.pipeline import modelset as modelset_module
from corona_ct.pipeline import run as run_module
from corona_ct.pipeline import segment as segment_module
from corona_ct.pipeline.config import IngestConfig, PipelineConfig
from corona_ct.pipeline.datamodel import Volume
from corona_ct.pipeline.errors import CoronaCTError
from corona_ct.pipeline.ingest import load_study
from corona_ct.pipeline.modelset import load_models
from corona_ct.pipeline.run import analyze_study
from tests.ingest.dicom_factory import phantom_hu, write_series

SMALL = {"roi.input_size": 64, "runtime.device": "cpu"}

#: Result fields: field → a value that must change the analysis of the phantom study, or
#: (value, context): the value changes the analysis when both runs have the context's settings.
STUDY_PROBES: dict[str, Any] = {
    "window.hu_min": -1200.0,
    "window.hu_max": 200.0,
    "segment.method": "unet",  # no U-Net weights here: refused, naming --seg-weights
    "segment.lung_hu_threshold": -700.0,
    "segment.lung_window_threshold": 0.2,  # the threshold for windowed (non-HU) input
    "segment.min_lung_volume_ml": 5000.0,
    "segment.closing_radius_mm": 1.0,
    "roi.margin_fraction": 0.3,
    "roi.input_size": 96,
    "roi.mask_outside_lungs": True,  # the classifier sees air around the lungs: other probabilities
    "roi.min_lung_pixels": 30000,  # scaled to the 96×96 slice: 1055 pixels, more than the end slices
    "classify.backbone": "vgg16",
    "classify.positive_threshold": (
        1.0,
        {"classify.positive_threshold": 0.0},
    ),  # none vs every slice positive
    "classify.case_aggregation": (
        "max",
        {"classify.case_top_fraction": 0.5},
    ),  # top 10 % of 8 slices is the max
    "classify.case_top_fraction": 1.0,  # top_mean of every slice, not of the top 10 %
    "cam.layers": ["layer3"],
    "cam.fusion": "mean",
    "cam.activation_threshold": 0.1,
    "severity.ggo_hu": [-750.0, -600.0],
    "severity.consolidation_hu": [-300.0, -100.0],
    "severity.ggo_contrast_hu": 400.0,
    "severity.edge_margin_mm": 15.0,
    "severity.edge_margin_slices": 3,
    "severity.vessel_hu": -700.0,
    "severity.vessel_smoothing_mm": 3.0,
    "severity.vessel_width_mm": 30.0,
    "severity.vessel_contrast_hu": (20.0, {"severity.vessel_width_mm": 10.0}),  # a top-hat wider than a pixel
    "severity.vessel_margin_mm": 6.0,
    "severity.consolidation_reach_mm": 1.0,
    "severity.noise_target_hu": 1.0,
    "severity.max_smoothing_mm": (0.2, {"severity.noise_target_hu": 1.0}),  # smoothing that is needed
    "runtime.seed": 7,  # the untrained weights' seed
}
#: Ingest fields: checked by loading series written so that the field decides the outcome.
INGEST_PROBES = {
    "ingest.tiff_hu_offset",
    "ingest.spacing_tolerance",
    "ingest.max_gap_factor",
    "ingest.max_tilt_degrees",
    "ingest.max_pixels_per_slice",
    "ingest.max_slices",
    "ingest.min_slices",
}
#: Settings that must not change results, checked on what they control.
CALL_PROBES = {
    "classify.batch_size",
    "segment.batch_size",
    "runtime.amp",
    "runtime.device",
    "runtime.hold_freed_memory",
}


def _all_fields() -> set[str]:
    config = PipelineConfig()
    return {
        f"{section.name}.{item.name}"
        for section in dataclasses.fields(config)
        for item in dataclasses.fields(getattr(config, section.name))
    }


def test_every_field_has_a_probe() -> None:
    probed = set(STUDY_PROBES) | INGEST_PROBES | CALL_PROBES
    assert _all_fields() == probed, "a config field without a probe here (or a probe for a removed field)"


@functools.cache
def _models(backbone: str, seed: int) -> Any:
    config = PipelineConfig().replace({**SMALL, "classify.backbone": backbone, "runtime.seed": seed})
    return load_models(config, allow_untrained=True)


def _digest(*values: object) -> str:
    sha = hashlib.sha256()
    for value in values:
        if isinstance(value, np.ndarray):
            sha.update(np.ascontiguousarray(value).tobytes())
        else:
            sha.update(repr(value).encode())
    return sha.hexdigest()


def _study_fingerprint(volume: Volume, overrides: dict[str, Any]) -> str:
    config = PipelineConfig().replace({**SMALL, **overrides})
    try:
        models = _models(config.classify.backbone, config.runtime.seed)
        modelset_module._check_cam_layers(models.classifier, config.cam.layers)
        if config.segment.method == "unet":
            load_models(config, allow_untrained=True)  # the U-Net is required: refused without weights
        result = analyze_study(volume, models, config)
    except CoronaCTError as error:
        return _digest(type(error).__name__, str(error))
    severity = dataclasses.asdict(result.severity) if result.severity is not None else None
    return _digest(
        result.status, result.case_probability, result.scores.probs, result.scores.evaluated,
        result.lung_mask.labels, result.cams.maps, severity, tuple(result.warnings),
    )  # fmt: skip


@pytest.fixture(scope="module")
def phantom_volume() -> Volume:
    phantom = make_phantom(seed=3, shape=(10, 96, 96), spacing_mm=(5.0, 3.2, 3.2), lesions="mixed")
    return phantom.to_volume("phantom")


@pytest.fixture(scope="module")
def baseline(phantom_volume: Volume) -> str:
    return _study_fingerprint(phantom_volume, {})


@pytest.mark.slow
@pytest.mark.parametrize("field", sorted(STUDY_PROBES))
def test_a_result_field_changes_the_analysis(field: str, phantom_volume: Volume, baseline: str) -> None:
    value, context = (
        STUDY_PROBES[field] if isinstance(STUDY_PROBES[field], tuple) else (STUDY_PROBES[field], {})
    )
    if field == "segment.lung_window_threshold":  # acts on windowed input: the study as 0–1 values
        windowed = dataclasses.replace(
            phantom_volume, array=np.clip((phantom_volume.array + 1000) / 1000, 0, 1), units="window"
        )
        assert _study_fingerprint(windowed, {field: value}) != _study_fingerprint(windowed, {})
        return
    before = _study_fingerprint(phantom_volume, context) if context else baseline
    after = _study_fingerprint(phantom_volume, {**context, field: value})
    assert after != before, f"{field}={value!r} changed nothing"


# ----------------------------------------------------------------------------- ingest fields


def _outcome(load: Callable[[], Volume]) -> str:
    try:
        volume = load()
    except CoronaCTError as error:
        return _digest(type(error).__name__, str(error))
    return _digest(volume.array, volume.geometry, tuple(volume.warnings))


def _ingest_pair(tmp_path: Path, field: str) -> tuple[str, str]:
    """The outcome of loading a series with the default ingest config and with ``field`` changed."""
    spacing, origin = (2.5, 0.7, 0.7), (-11.2, -11.2, -100.0)
    folder = tmp_path / "series"
    changed: dict[str, Any]
    if field == "ingest.tiff_hu_offset":
        from PIL import Image

        folder.mkdir()
        rng = np.random.default_rng(0)
        for k in range(4):
            raw = rng.integers(0, 1500, (40, 40)).astype(np.uint16)  # COVID-CTset style: HU + 1024
            Image.fromarray(raw).save(folder / f"ct_IM{k + 1:05d}.tif")
        changed = {"tiff_hu_offset": -1000.0}
    elif field == "ingest.spacing_tolerance":
        write_series(
            folder, phantom_hu(), spacing=spacing, origin=origin, z_offsets=[0, 2.5, 5, 7.6, 10.1, 12.6]
        )
        changed = {"spacing_tolerance": 0.01}
    elif field == "ingest.max_gap_factor":
        write_series(
            folder, phantom_hu(), spacing=spacing, origin=origin, z_offsets=[0, 2.5, 5, 15, 17.5, 20]
        )
        changed = {"max_gap_factor": 5.0}
    elif field == "ingest.max_tilt_degrees":
        shift = spacing[0] * np.tan(np.radians(2.0))
        write_series(folder, phantom_hu(), spacing=spacing, origin=origin, shear=(0.0, shift, 0.0))
        changed = {"max_tilt_degrees": 5.0}
    elif field == "ingest.max_pixels_per_slice":
        write_series(folder, phantom_hu(), spacing=spacing, origin=origin)
        changed = {"max_pixels_per_slice": 100}
    elif field == "ingest.max_slices":
        write_series(folder, phantom_hu(), spacing=spacing, origin=origin)
        changed = {"max_slices": 3}
    elif field == "ingest.min_slices":
        write_series(folder, phantom_hu(), spacing=spacing, origin=origin)
        changed = {"min_slices": 5000}
    else:  # pragma: no cover - INGEST_PROBES and this function are kept together
        raise AssertionError(field)
    default = _outcome(lambda: load_study(folder, IngestConfig()))
    return default, _outcome(lambda: load_study(folder, dataclasses.replace(IngestConfig(), **changed)))


@pytest.mark.parametrize("field", sorted(INGEST_PROBES))
def test_an_ingest_field_changes_what_is_read(field: str, tmp_path: Path) -> None:
    default, changed = _ingest_pair(tmp_path, field)
    assert default != changed, f"{field} changed nothing"


# ----------------------------------------------------------------------------- settings that keep results


def test_batch_sizes_and_amp_reach_the_calls_they_control(phantom_volume: Volume, monkeypatch) -> None:
    seen: dict[str, list[Any]] = {"classify": [], "segment": []}
    from corona_ct.pipeline import classify as classify_module

    classify_slices = classify_module.classify_slices

    def spy_classify(*args: Any, **kwargs: Any) -> Any:
        seen["classify"].append((kwargs["batch_size"], kwargs["amp"]))
        return classify_slices(*args, **kwargs)

    for module in (classify_module, run_module):  # wherever the runner finds it
        if hasattr(module, "classify_slices"):
            monkeypatch.setattr(module, "classify_slices", spy_classify)
    config = PipelineConfig().replace({**SMALL, "classify.batch_size": 3, "runtime.amp": False})
    analyze_study(phantom_volume, _models("resnet50", 0), config)
    assert set(seen["classify"]) == {(3, False)}

    def spy_segment(model: Any, windowed: np.ndarray, batch_size: int, *args: Any, **kwargs: Any) -> Any:
        seen["segment"].append(batch_size)
        return np.ones(windowed.shape, np.uint8)

    from corona_ct.models import segmenter

    for module in (segmenter, segment_module):  # wherever the stage finds it
        if hasattr(module, "predict_lung_labels"):
            monkeypatch.setattr(module, "predict_lung_labels", spy_segment)

    seg_config = dataclasses.replace(PipelineConfig().segment, batch_size=5)
    # the spy stands in for the network's pass, so any module will do (a U-Net takes a second to build)
    stand_in = torch.nn.Identity()
    segment_module.segment_lungs(phantom_volume, seg_config, PipelineConfig().window, model=stand_in)
    assert seen["segment"] == [5]


def test_the_device_setting_decides_where_models_run(phantom_volume: Volume) -> None:
    import torch

    config = PipelineConfig().replace({**SMALL, "runtime.device": "cuda"})
    if torch.cuda.is_available():
        analyze_study(phantom_volume, _models("resnet50", 0), config)
        assert next(_models("resnet50", 0).classifier.module.parameters()).device.type == "cuda"
    else:
        with pytest.raises(CoronaCTError, match="cuda"):
            analyze_study(phantom_volume, _models("resnet50", 0), config)


@pytest.mark.parametrize("hold", [True, False])
def test_hold_freed_memory_decides_whether_the_runner_tunes_malloc(
    hold: bool, phantom_volume: Volume, monkeypatch
) -> None:
    calls: list[bool] = []
    monkeypatch.setattr(run_module, "hold_freed_memory", lambda: calls.append(True) or True)
    config = PipelineConfig().replace({**SMALL, "runtime.hold_freed_memory": hold})
    analyze_study(phantom_volume, _models("resnet50", 0), config)
    assert calls == ([True] if hold else [])
