"""Every numeric setting has a range and every enumerated setting its choices, checked at load (issue 11).

The parametrisation introspects the dataclasses, so a numeric field added later without a
range fails here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest

from corona_ct.pipeline.cli import main
from corona_ct.pipeline.config import (
    CAM_FUSIONS,
    CASE_AGGREGATIONS,
    SEGMENT_METHODS,
    PipelineConfig,
    Range,
    load_config,
)
from corona_ct.pipeline.errors import ConfigError

#: Text settings checked elsewhere, with where: every other text setting must list its choices.
TEXT_CHECKED_ELSEWHERE = {
    "classify.backbone": "the model registry, when the models load (before any study is read)",
    "runtime.device": "the DEVICE_PATTERN rule of RuntimeConfig",
}


def _fields() -> list[tuple[str, dataclasses.Field[Any], Any]]:
    found = []
    config = PipelineConfig()
    for section in dataclasses.fields(PipelineConfig):
        instance = getattr(config, section.name)
        for spec in dataclasses.fields(instance):
            found.append((f"{section.name}.{spec.name}", spec, getattr(instance, spec.name)))
    return found


def _is_numeric(value: Any) -> bool:
    if isinstance(value, tuple):
        return bool(value) and all(_is_numeric(v) for v in value)
    return isinstance(value, int | float) and not isinstance(value, bool)


NUMERIC = [(key, spec, default) for key, spec, default in _fields() if _is_numeric(default)]
TEXT = [(key, spec, default) for key, spec, default in _fields() if isinstance(default, str)]


def _override(key: str, default: Any, value: float) -> str:
    if isinstance(default, tuple):  # the bad value in the first place, the rest kept valid
        values = [value, *default[1:]] if value < default[0] else [*default[:-1], value]
        return f"{key}={json.dumps(values)}"
    return f"{key}={json.dumps(value)}"


def test_numeric_fields_are_found() -> None:
    assert len(NUMERIC) > 30 and any(key == "classify.batch_size" for key, *_ in NUMERIC)


@pytest.mark.parametrize(("key", "spec", "default"), NUMERIC, ids=[key for key, *_ in NUMERIC])
def test_every_numeric_setting_has_a_range_and_refuses_nan_inf_and_out_of_range(
    key: str, spec: dataclasses.Field[Any], default: Any
) -> None:
    allowed = spec.metadata.get("range")
    assert isinstance(allowed, Range), f"{key} has no range: declare it with _num(default, low, high)"
    for number in default if isinstance(default, tuple) else (default,):
        assert allowed.contains(float(number)), (
            f"{key}: the default {default} is outside {allowed.describe()}"
        )
    below = allowed.low if allowed.open_low else allowed.low - max(1.0, abs(allowed.low) * 0.5)
    above = allowed.high + max(1.0, abs(allowed.high) * 0.5)
    for bad in (math.nan, math.inf, -math.inf, below, above):
        with pytest.raises(ConfigError) as raised:
            load_config(None, [_override(key, default, bad)])
        message = str(raised.value)
        assert key in message, message
        if "should look like" not in message:  # (an int setting given a fraction or NaN says so instead)
            assert allowed.describe() in message, message


@pytest.mark.parametrize(("key", "spec", "default"), TEXT, ids=[key for key, *_ in TEXT])
def test_every_text_setting_is_validated(key: str, spec: dataclasses.Field[Any], default: str) -> None:
    choices = spec.metadata.get("choices")
    if choices is None:
        assert key in TEXT_CHECKED_ELSEWHERE, (
            f"{key} has no list of allowed values: declare it with _choice()"
        )
        return
    assert default in choices
    with pytest.raises(ConfigError) as raised:
        load_config(None, [f"{key}=no-such-choice"])
    message = str(raised.value)
    assert key in message and "no-such-choice" in message and all(choice in message for choice in choices)


def test_the_stages_accept_exactly_the_configs_choices() -> None:
    from corona_ct.pipeline import classify
    from corona_ct.pipeline.explain import FUSION_METHODS

    assert set(CASE_AGGREGATIONS) == set(classify.CASE_AGGREGATIONS)
    assert set(CAM_FUSIONS) == set(FUSION_METHODS)
    assert set(SEGMENT_METHODS) == {"auto", "unet", "classical"}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("classify.batch_size=2.5", "classify.batch_size=2.5"),
        ("classify.batch_size=true", "classify.batch_size=True"),
        ("window.hu_min=100", "hu_min must be below hu_max"),
        ("severity.ggo_hu=[-300, -750]", "lower bound must be below"),
        ("ingest.min_slices=10", None),  # allowed: below max_slices
        ("roi.input_size=16", "at least 32"),
        ("runtime.device=gpu", "auto, cpu, cuda or cuda:N"),
        ("runtime.device=cuda:1", None),
        ('cam.layers=["", "layer3"]', "no empty names"),
        ("cam.layers=[]", None),  # the backbone's own layers
        ("classify.case_top_fraction=0", "(0, 1]"),
    ],
)
def test_rules_across_values(override: str, message: str | None) -> None:
    if message is None:
        load_config(None, [override])
        return
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(None, [override])


def test_a_config_file_with_a_bad_value_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"cam": {"activation_threshold": 1.5}}))
    with pytest.raises(ConfigError, match=r"cam.activation_threshold=1.5 is out of range.*\[0, 1\]"):
        load_config(path)


def test_the_python_api_checks_too() -> None:
    from corona_ct.pipeline.config import ClassifyConfig

    with pytest.raises(ConfigError, match=r"classify\.batch_size=-1"):
        ClassifyConfig(batch_size=-1)


def test_cli_refuses_a_negative_batch_size_before_any_work(tmp_path: Path, capsys) -> None:
    """Before: status ok, every probability null, case probability 0 (a silent false negative)."""
    code = main(["run", str(tmp_path), "--output", str(tmp_path / "out"), "--set", "classify.batch_size=-1"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "corona-ct: error: config value classify.batch_size=-1 is out of range: "
        "allowed is a finite number in [1, 4096]"
    )
    assert not (tmp_path / "out").exists()
