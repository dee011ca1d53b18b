import json

import pytest

from corona_ct.models.classifier import backbone_spec
from corona_ct.pipeline.config import PipelineConfig, load_config, parse_overrides
from corona_ct.pipeline.errors import ConfigError


def test_defaults_are_the_papers_values() -> None:
    config = PipelineConfig()
    assert (config.window.hu_min, config.window.hu_max) == (-1000.0, 0.0)
    assert config.roi.input_size == 0  # the backbone's native size: 224 for ResNet-50
    assert config.cam.layers == ()  # the backbone's own Grad-CAM layers:
    assert backbone_spec(config.classify.backbone).cam_layers == ("layer2", "layer3")  # 28×28 and 14×14
    assert config.cam.activation_threshold == 0.6
    assert config.classify.positive_threshold == 0.5
    assert config.classify.backbone == "resnet50"


def test_overrides_are_typed_and_change_the_hash() -> None:
    base = PipelineConfig()
    changed = base.replace(parse_overrides(["cam.activation_threshold=0.5", "severity.ggo_hu=[-700, -300]"]))
    assert changed.cam.activation_threshold == 0.5
    assert changed.severity.ggo_hu == (-700.0, -300.0)
    assert changed.hash() != base.hash()
    assert base.cam.activation_threshold == 0.6  # the original is untouched


def test_runtime_settings_do_not_change_the_hash() -> None:
    base = PipelineConfig()
    assert base.replace({"runtime.device": "cpu"}).hash() == base.hash()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("nosuch.field=1", "unknown config key"),
        ("cam.nosuch=1", "cam has"),
        ("cam.activation_threshold=high", "should look like 0.6"),
        ("runtime.amp=1", "should look like True"),
        ("severity.ggo_hu=[1]", "should look like"),
        ("novalue", "section.field=value"),
    ],
)
def test_bad_overrides_are_refused_with_a_message(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_config_file_then_overrides(tmp_path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"roi": {"margin_fraction": 0.1}, "classify": {"batch_size": 4}}))
    config = load_config(path, ["classify.batch_size=8"])
    assert config.roi.margin_fraction == 0.1
    assert config.classify.batch_size == 8
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "bad.json")


def test_to_dict_round_trips_through_a_file(tmp_path) -> None:
    config = PipelineConfig().replace({"segment.method": "classical", "roi.input_size": 256})
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config.to_dict()))
    assert load_config(path) == config
