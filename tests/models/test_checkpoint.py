"""Checkpoint format: round trips, integrity and architecture checks, no pickle."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import torch
from torch import nn

from corona_ct.models.checkpoint import (
    CHECKPOINT_FORMAT,
    LoadedModel,
    load_checkpoint,
    load_classifier,
    load_segmenter,
    read_card,
    save_checkpoint,
)
from corona_ct.models.classifier import build_classifier
from corona_ct.models.segmenter import SEGMENTER_ARCHITECTURE
from corona_ct.models.weights import default_weights
from corona_ct.pipeline.errors import ConfigError, ModelError


def _card(architecture: str = "classifier/resnet50", **extra: object) -> dict[str, object]:
    return {
        "architecture": architecture,
        "task": "covid-vs-normal slice classification",
        "input": {"size": 224, "channels": 3, "window": [-1000, 0], "roi": "lung-bbox"},
        **extra,
    }


def _resnet_with_trained_buffers(num_outputs: int = 1) -> nn.Module:
    """A ResNet-50 whose BatchNorm statistics differ from their defaults, so buffers matter."""
    torch.manual_seed(0)
    model = build_classifier("resnet50", num_outputs)
    generator = torch.Generator().manual_seed(1)
    for name, buffer in model.named_buffers():
        if name.endswith("running_mean"):
            buffer.copy_(0.1 * torch.randn(buffer.shape, generator=generator))
        elif name.endswith("running_var"):
            buffer.copy_(1.0 + 0.2 * torch.rand(buffer.shape, generator=generator))
        elif name.endswith("num_batches_tracked"):
            buffer.fill_(7)
    return model.eval()


def _head(model: nn.Module) -> nn.Linear:
    head = model.get_submodule("fc")
    assert isinstance(head, nn.Linear)
    return head


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    return _resnet_with_trained_buffers()


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))


class Tiny(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.norm = nn.BatchNorm2d(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


def test_round_trip_gives_identical_outputs(resnet: nn.Module, batch: torch.Tensor, tmp_path: Path) -> None:
    path = save_checkpoint(resnet, tmp_path / "classifier.pt", _card(num_outputs=1, epochs=3))
    assert path == tmp_path / "classifier.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classifier.json", "classifier.safetensors"]

    loaded = load_classifier(path)
    assert isinstance(loaded, LoadedModel)
    assert loaded.trained and loaded.path == path and loaded.spec is not None
    assert loaded.spec.name == "resnet50"
    assert not loaded.module.training
    assert not any(p.requires_grad for p in loaded.module.parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(batch), resnet(batch), rtol=0, atol=0)
    reference = resnet.state_dict()
    for name, tensor in loaded.module.state_dict().items():
        assert torch.equal(tensor, reference[name]), name


def test_card_holds_checksum_size_and_provenance(resnet: nn.Module, tmp_path: Path) -> None:
    path = save_checkpoint(resnet, tmp_path / "cls", _card(epochs=3, sha256="caller value is replaced"))
    card = read_card(path.with_suffix(".json"))
    assert card == read_card(path)
    assert card["format"] == CHECKPOINT_FORMAT
    assert card["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert card["n_parameters"] == sum(p.numel() for p in resnet.parameters())
    assert datetime.fromisoformat(card["created"]).utcoffset() == timedelta(0)
    assert card["epochs"] == 3 and card["input"]["window"] == [-1000, 0]
    assert card["dtype"] == "float32"


def test_half_precision_checkpoint_is_smaller_and_close(
    resnet: nn.Module, batch: torch.Tensor, tmp_path: Path
) -> None:
    full = save_checkpoint(resnet, tmp_path / "full", _card())
    half = save_checkpoint(resnet, tmp_path / "half", _card(), half=True)
    assert half.stat().st_size < 0.55 * full.stat().st_size
    state, card = load_checkpoint(half, expected_architecture="classifier/resnet50")
    assert card["dtype"] == "float16"
    assert state["conv1.weight"].dtype == torch.float32
    assert state["bn1.num_batches_tracked"].dtype == torch.int64
    assert int(state["bn1.num_batches_tracked"]) == 7
    loaded = load_classifier(half)
    with torch.no_grad():
        expected = resnet(batch)
        torch.testing.assert_close(
            loaded.module(batch), expected, rtol=2e-2, atol=2e-2 * expected.abs().max()
        )


def test_two_output_head_comes_from_the_card(tmp_path: Path) -> None:
    model = _resnet_with_trained_buffers(num_outputs=2)
    path = save_checkpoint(model, tmp_path / "cls2", _card(num_outputs=2))
    loaded = load_classifier(path, backbone="resnet50", num_outputs=1)
    assert _head(loaded.module).out_features == 2


def test_wrong_architecture_is_refused(resnet: nn.Module, tmp_path: Path) -> None:
    path = save_checkpoint(resnet, tmp_path / "cls", _card())
    with pytest.raises(ModelError, match=r"classifier/resnet50.*classifier/resnet152"):
        load_checkpoint(path, expected_architecture="classifier/resnet152")
    with pytest.raises(ModelError, match="not a segmenter"):
        load_segmenter(path)


def test_weights_that_do_not_fit_the_named_network_are_refused(tmp_path: Path) -> None:
    path = save_checkpoint(Tiny(), tmp_path / "tiny", _card("classifier/resnet50"))
    with pytest.raises(ModelError, match="does not fit"):
        load_classifier(path)


def test_tampered_file_is_refused(resnet: nn.Module, tmp_path: Path) -> None:
    path = save_checkpoint(Tiny(), tmp_path / "tiny", _card("classifier/tiny"))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # flips one bit of the last tensor value
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="checksum mismatch: file corrupt or replaced"):
        load_checkpoint(path)
    state, _ = load_checkpoint(path, verify=False)  # an explicit opt-out still reads it
    assert set(state) == set(Tiny().state_dict())


@pytest.mark.parametrize(
    ("card", "missing"),
    [
        ({"task": "t", "input": {"size": 1, "channels": 1, "window": [0, 1], "roi": "none"}}, "architecture"),
        ({"architecture": "classifier/resnet50", "input": {}}, "task"),
        ({"architecture": "classifier/resnet50", "task": "t"}, "input"),
        (
            {"architecture": "classifier/resnet50", "task": "t", "input": {"size": 224, "channels": 3}},
            "window",
        ),
        ({"architecture": "resnet50", "task": "t", "input": {}}, "architecture"),
    ],
)
def test_incomplete_cards_are_refused(card: dict[str, object], missing: str, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=missing):
        save_checkpoint(Tiny(), tmp_path / "tiny", card)
    assert not any(tmp_path.iterdir())


def test_hand_edited_card_without_required_key_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint(Tiny(), tmp_path / "tiny", _card("segmenter/tiny"))
    card_path = path.with_suffix(".json")
    card = json.loads(card_path.read_text())
    del card["task"]
    card_path.write_text(json.dumps(card))
    with pytest.raises(ModelError, match="task"):
        load_checkpoint(path)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt"])
def test_pickle_checkpoints_are_refused_without_unpickling(
    suffix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / f"weights{suffix}"
    torch.save(Tiny().state_dict(), path)

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load must never be called on a user file")

    monkeypatch.setattr(torch, "load", forbidden)
    with pytest.raises(ModelError, match="pickle"):
        load_checkpoint(path)
    with pytest.raises(ModelError, match="pickle"):
        load_classifier(path)


def test_missing_weights_say_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"nowhere\.safetensors.*--cls-weights.*train-cls"):
        load_checkpoint(tmp_path / "nowhere.safetensors")
    path = save_checkpoint(Tiny(), tmp_path / "tiny", _card("classifier/tiny"))
    path.with_suffix(".json").unlink()
    with pytest.raises(ModelError, match=r"tiny\.json not found"):
        load_checkpoint(path)


def test_saving_replaces_an_existing_checkpoint_atomically(tmp_path: Path) -> None:
    first = save_checkpoint(Tiny(), tmp_path / "tiny", _card("classifier/tiny"))
    torch.manual_seed(5)
    replacement = Tiny()
    second = save_checkpoint(replacement, tmp_path / "tiny.safetensors", _card("classifier/tiny"))
    assert first == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.json", "tiny.safetensors"]  # no temp files
    state, _ = load_checkpoint(second)
    assert torch.equal(state["conv.weight"], replacement.conv.weight)


def test_untrained_classifier_is_labelled(batch: torch.Tensor) -> None:
    loaded = load_classifier(None, backbone="resnet50", num_outputs=2)
    assert not loaded.trained and loaded.path is None and loaded.sha256 == ""
    assert loaded.card["architecture"] == "classifier/resnet50"
    assert "untrained" in loaded.card["note"]
    assert _head(loaded.module).out_features == 2 and not loaded.module.training


def test_segmenter_is_built_from_its_card(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[tuple[int, int]] = []

    def build_unet(num_classes: int = 3, in_channels: int = 1) -> nn.Module:
        built.append((num_classes, in_channels))
        return Tiny(in_channels, num_classes)

    monkeypatch.setattr("corona_ct.models.checkpoint.build_unet", build_unet)
    torch.manual_seed(3)
    model = Tiny(in_channels=1, num_classes=4)
    card = _card(SEGMENTER_ARCHITECTURE, num_classes=4)
    card["input"] = {"size": 256, "channels": 1, "window": [-1000, 400], "roi": "none"}
    path = save_checkpoint(model, tmp_path / "segmenter", card)
    loaded = load_segmenter(path)
    assert built == [(4, 1)]
    assert loaded.spec is None and loaded.trained
    image = torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(image), model.eval()(image), rtol=0, atol=0)


def test_a_segmenter_of_another_architecture_is_refused_by_name(tmp_path: Path) -> None:
    path = save_checkpoint(
        Tiny(in_channels=1, num_classes=3), tmp_path / "segmenter", _card("segmenter/unet-tiny")
    )
    with pytest.raises(ModelError, match=r"segmenter/unet-tiny.*builds only 'segmenter/unet-vgg16'"):
        load_segmenter(path)


def test_default_weights_need_both_files(tmp_path: Path) -> None:
    assert default_weights("classifier", tmp_path) is None
    save_checkpoint(Tiny(), tmp_path / "segmenter", _card("segmenter/tiny"))
    assert default_weights("segmenter", tmp_path) == tmp_path / "segmenter.safetensors"
    (tmp_path / "segmenter.json").unlink()
    assert default_weights("segmenter", tmp_path) is None
    with pytest.raises(ConfigError):
        default_weights("detector", tmp_path)  # type: ignore[arg-type]


def test_a_card_that_is_not_json_writes_nothing(tmp_path: Path) -> None:
    card = dict(_card("classifier/tiny"), validation={"auc": float("nan")})
    with pytest.raises(ModelError, match="not plain JSON"):
        save_checkpoint(Tiny(), tmp_path / "tiny", card)
    assert list(tmp_path.iterdir()) == []  # no orphan tensors without their card


def test_input_contract_refuses_another_window_and_warns_about_another_segmenter() -> None:
    from corona_ct.models.checkpoint import LoadedModel, input_contract_problems

    card = {"input": {"size": 224, "window": [-1000.0, 0.0], "roi": "lung-bbox",
                      "segmenter": {"architecture": "segmenter/unet-vgg16", "sha256": "a" * 64}}}  # fmt: skip
    same = LoadedModel(
        torch.nn.Identity(), None, {"architecture": "segmenter/unet-vgg16"}, "a" * 64, None, True
    )
    other = LoadedModel(
        torch.nn.Identity(), None, {"architecture": "segmenter/unet-vgg16"}, "b" * 64, None, True
    )
    assert input_contract_problems(card, (-1000.0, 0.0), same) == ([], [])
    errors, _ = input_contract_problems(card, (-1350.0, 150.0), same)
    assert len(errors) == 1 and "window.hu_min=-1000.0" in errors[0]
    _, warnings = input_contract_problems(card, (-1000.0, 0.0), other)
    assert len(warnings) == 1 and "crops differ" in warnings[0]
    _, warnings = input_contract_problems(card, (-1000.0, 0.0), None)
    assert "classical segmenter" in warnings[0]
    errors, _ = input_contract_problems({"input": {"roi": "none"}}, (-1000.0, 0.0), same)
    assert "roi 'none'" in errors[0]


def test_input_contract_refuses_a_lung_only_card_on_lung_box_input_and_back() -> None:
    from corona_ct.models.checkpoint import input_contract_problems

    window = (-1000.0, 0.0)
    masked = {"input": {"window": [-1000.0, 0.0], "roi": "lung-bbox-masked"}}
    boxed = {"input": {"window": [-1000.0, 0.0], "roi": "lung-bbox"}}
    legacy = {"input": {"window": [-1000.0, 0.0], "roi": "lung"}}
    assert input_contract_problems(masked, window, None, "lung-bbox-masked")[0] == []
    assert input_contract_problems(boxed, window, None, "lung-bbox")[0] == []
    assert input_contract_problems(legacy, window, None, "lung-bbox")[0] == []
    errors, _ = input_contract_problems(masked, window, None, "lung-bbox")
    assert len(errors) == 1 and "--set roi.mask_outside_lungs=true" in errors[0]
    errors, _ = input_contract_problems(boxed, window, None, "lung-bbox-masked")
    assert len(errors) == 1 and "--set roi.mask_outside_lungs=false" in errors[0]
