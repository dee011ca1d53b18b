"""Checkpoint I/O: a ``.safetensors`` tensor file beside a ``.json`` model card.

Weights are never pickled: ``torch.load`` on an untrusted ``.pt`` runs arbitrary
code, so pickle paths are refused outright. The card describes the network
(architecture, task, input preprocessing) and carries the SHA-256 of the tensor
file, so a corrupt, truncated or swapped file is refused before it is used.

Card schema (``docs/models.md``)::

    {"format": "corona-ct-checkpoint/1",
     "architecture": "classifier/resnet50" | "segmenter/unet-vgg16" | ...,
     "task": "covid-vs-normal slice classification",
     "input": {"size": 224, "channels": 3, "window": [-1000, 0], "roi": "lung-bbox"},
     "num_outputs": 1,            # classifiers (default 1)
     "num_classes": 3,            # segmenters (default 3)
     "sha256": "...", "n_parameters": 23510081,
     "created": "2025-01-01T00:00:00+00:00", "corona_ct_version": "0.1.0",
     ...free-form training metadata...}
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from corona_ct.models.classifier import BackboneSpec, backbone_spec, build_classifier
from corona_ct.models.segmenter import SEGMENTER_ARCHITECTURE, build_unet
from corona_ct.pipeline import __version__
from corona_ct.pipeline.atomic import atomic_path, sha256_file, write_json
from corona_ct.pipeline.device import resolve_device
from corona_ct.pipeline.errors import ModelError
from corona_ct.pipeline.preprocess import ROI_LUNG_BOX, ROI_LUNG_ONLY

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "corona-ct-checkpoint/1"
REQUIRED_CARD_KEYS = ("architecture", "task", "input")
REQUIRED_INPUT_KEYS = ("size", "channels", "window", "roi")
#: Keys written by :func:`save_checkpoint`; values passed in the card are replaced.
GENERATED_CARD_KEYS = ("format", "sha256", "n_parameters", "created", "corona_ct_version", "dtype")
PICKLE_SUFFIXES = frozenset({".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".tar"})

_HOW_TO_GET_WEIGHTS = (
    "pass trained weights with --cls-weights PATH (classifier) or --seg-weights PATH (segmenter), "
    "or train a classifier with `corona-ct train-cls`"
)


def _kind_of(path: Path) -> tuple[Path, Path]:
    """The (.safetensors, .json) pair for either member; pickle files are refused."""
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise ModelError(
            f"{path}: pickle checkpoints ({suffix}) are refused because loading them can run arbitrary "
            "code; convert the weights to a corona-ct .safetensors checkpoint with a .json card "
            "(models.checkpoint.save_checkpoint) in a trusted environment"
        )
    if suffix not in (".safetensors", ".json"):
        raise ModelError(
            f"{path}: not a corona-ct checkpoint; expected a .safetensors file with a .json card beside it"
        )
    return path.with_suffix(".safetensors"), path.with_suffix(".json")


def validate_card(card: Mapping[str, Any], source: str = "model card") -> None:
    """Raise :class:`ModelError` when a required card key is missing or malformed."""
    missing = [key for key in REQUIRED_CARD_KEYS if key not in card]
    if missing:
        raise ModelError(f"{source}: missing required key(s) {', '.join(missing)}")
    architecture = card["architecture"]
    if not isinstance(architecture, str) or "/" not in architecture:
        raise ModelError(
            f"{source}: 'architecture' must look like 'classifier/resnet50' or 'segmenter/unet-vgg16', "
            f"got {architecture!r}"
        )
    if not isinstance(card["task"], str) or not card["task"]:
        raise ModelError(f"{source}: 'task' must be a non-empty string")
    model_input = card["input"]
    if not isinstance(model_input, Mapping):
        raise ModelError(f"{source}: 'input' must be an object with {', '.join(REQUIRED_INPUT_KEYS)}")
    missing_input = [key for key in REQUIRED_INPUT_KEYS if key not in model_input]
    if missing_input:
        raise ModelError(f"{source}: 'input' lacks {', '.join(missing_input)}")


def _state_for_saving(model: nn.Module, half: bool) -> dict[str, torch.Tensor]:
    """CPU, contiguous, storage-unshared tensors (safetensors refuses shared storage)."""
    state: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, tensor in model.state_dict().items():
        value = tensor.detach().to("cpu")
        if half and value.is_floating_point():
            value = value.to(torch.float16)
        value = value.contiguous()
        storage = value.untyped_storage().data_ptr()
        if storage in seen_storages:
            value = value.clone()
        seen_storages.add(storage)
        state[name] = value
    return state


def save_checkpoint(
    model: nn.Module, path: str | Path, card: Mapping[str, Any], *, half: bool = False
) -> Path:
    """Write ``model``'s state dict to ``path`` (suffix forced to .safetensors) and its card beside it.

    ``half=True`` stores floating tensors as fp16 (half the size); integer buffers
    such as BatchNorm's ``num_batches_tracked`` keep their dtype. Both files are
    written atomically. Returns the .safetensors path.
    """
    validate_card(card, source=f"card for {path}")
    tensor_path = Path(path).with_suffix(".safetensors")
    card_path = tensor_path.with_suffix(".json")
    full_card = {key: value for key, value in card.items() if key not in GENERATED_CARD_KEYS}
    try:  # refuse a bad card before anything is written: the pair on disk must stay consistent
        json.dumps(full_card, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ModelError(f"card for {tensor_path} is not plain JSON: {error}") from None
    state = _state_for_saving(model, half)
    architecture = str(card["architecture"])
    with atomic_path(tensor_path) as tmp:
        save_file(state, str(tmp), metadata={"format": CHECKPOINT_FORMAT, "architecture": architecture})
    full_card.update(
        format=CHECKPOINT_FORMAT,
        sha256=sha256_file(tensor_path),
        n_parameters=int(sum(p.numel() for p in model.parameters())),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        corona_ct_version=__version__,
        dtype="float16" if half else "float32",
    )
    write_json(card_path, full_card, sort_keys=True)
    return tensor_path


def read_card(path: str | Path) -> dict[str, Any]:
    """The JSON card of a checkpoint, given either its .safetensors or its .json path."""
    _, card_path = _kind_of(Path(path))
    if not card_path.is_file():
        raise ModelError(
            f"model card {card_path} not found (it must sit beside the weights); {_HOW_TO_GET_WEIGHTS}"
        )
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelError(f"model card {card_path} is unreadable: {error}") from None
    if not isinstance(card, dict):
        raise ModelError(f"model card {card_path} must hold a JSON object")
    if card.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(
            f"model card {card_path} has format {card.get('format')!r}, expected {CHECKPOINT_FORMAT!r}; "
            "re-save the weights with models.checkpoint.save_checkpoint"
        )
    validate_card(card, source=str(card_path))
    return card


def load_checkpoint(
    path: str | Path, *, expected_architecture: str | None = None, verify: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint's tensors (floating ones as float32, on CPU) and its card.

    ``verify`` checks the SHA-256 in the card against the tensor file;
    ``expected_architecture`` (e.g. ``"classifier/resnet50"``) must equal the card's.
    """
    tensor_path, card_path = _kind_of(Path(path))
    if not tensor_path.is_file():
        raise ModelError(f"model weights {tensor_path} not found; {_HOW_TO_GET_WEIGHTS}")
    card = read_card(card_path)
    if expected_architecture is not None and card["architecture"] != expected_architecture:
        raise ModelError(
            f"{tensor_path} holds a {card['architecture']!r} network but {expected_architecture!r} "
            "was requested; pass weights trained for that architecture or change the backbone option"
        )
    if verify:
        actual = sha256_file(tensor_path)
        if actual != card.get("sha256"):
            raise ModelError(
                f"{tensor_path}: checksum mismatch: file corrupt or replaced (sha256 {actual[:12]}…, "
                f"card says {str(card.get('sha256'))[:12]}…); download or copy the weights again"
            )
    try:
        state = load_file(str(tensor_path), device="cpu")
    except (SafetensorError, OSError) as error:
        raise ModelError(f"{tensor_path} is not a readable safetensors file: {error}") from None
    state = {
        name: tensor.to(torch.float32) if tensor.is_floating_point() else tensor
        for name, tensor in state.items()
    }
    return state, card


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A network ready for inference with where it came from.

    ``module`` is in eval mode with frozen parameters on the requested device;
    ``trained`` is False for random initialisation (no weights given), whose
    outputs are meaningless and must be labelled so in reports.
    """

    module: nn.Module
    spec: BackboneSpec | None
    card: dict[str, Any]
    sha256: str
    path: Path | None
    trained: bool


def _load_state_strict(module: nn.Module, state: Mapping[str, torch.Tensor], source: Path) -> None:
    """``load_state_dict(strict=True)`` with a message listing what does not fit."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [
        f"{name} {tuple(state[name].shape)} vs {tuple(expected[name].shape)}"
        for name in sorted(set(state) & set(expected))
        if state[name].shape != expected[name].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s) e.g. {', '.join(missing[:3])}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s) e.g. {', '.join(unexpected[:3])}")
    if wrong_shape:
        problems.append(f"shape mismatch in {len(wrong_shape)} tensor(s) e.g. {'; '.join(wrong_shape[:3])}")
    if problems:
        raise ModelError(
            f"{source} does not fit the network its card names: {'; '.join(problems)}; "
            "the card and weights were probably saved from different models"
        )
    module.load_state_dict(state, strict=True)


def _ready(module: nn.Module, device: str | torch.device) -> nn.Module:
    module.eval()
    module.requires_grad_(False)  # Grad-CAM differentiates w.r.t. activations, never weights
    return module.to(resolve_device(device) if isinstance(device, str) else device)


def _architecture_name(card: Mapping[str, Any], kind: str, source: Path) -> str:
    family, _, name = str(card["architecture"]).partition("/")
    if family != kind or not name:
        raise ModelError(
            f"{source} holds a {card['architecture']!r} network, not a {kind}; "
            f"pass it with the {'--seg-weights' if family == 'segmenter' else '--cls-weights'} option"
        )
    return name


def load_classifier(
    path: Path | None, device: str | torch.device = "cpu", backbone: str = "resnet50", num_outputs: int = 1
) -> LoadedModel:
    """A slice classifier from a checkpoint, or randomly initialised when ``path`` is None.

    With a checkpoint the card decides the backbone (``classifier/<backbone>``) and
    ``num_outputs``; ``backbone``/``num_outputs`` only apply to random initialisation.
    """
    if path is None:
        spec = backbone_spec(backbone)
        module = build_classifier(backbone, num_outputs)
        log.warning("no classifier weights given: using untrained random weights (outputs are meaningless)")
        random_card: dict[str, Any] = {
            "architecture": f"classifier/{backbone}",
            "num_outputs": num_outputs,
            "note": "untrained random weights",
        }
        return LoadedModel(_ready(module, device), spec, random_card, sha256="", path=None, trained=False)
    path = Path(path)
    card = read_card(path)
    name = _architecture_name(card, "classifier", path)
    if name != backbone:
        log.info("classifier weights %s are a %s; using it instead of %s", path, name, backbone)
    spec = backbone_spec(name)
    state, card = load_checkpoint(path, expected_architecture=f"classifier/{name}")
    module = build_classifier(name, int(card.get("num_outputs", 1)), **card.get("backbone_options", {}))
    tensor_path = path.with_suffix(".safetensors")
    _load_state_strict(module, state, tensor_path)
    return LoadedModel(_ready(module, device), spec, card, str(card["sha256"]), tensor_path, trained=True)


def load_segmenter(path: Path, device: str | torch.device = "cpu") -> LoadedModel:
    """A lung-segmentation U-Net from a checkpoint (``segmenter/...`` card).

    ``num_classes`` comes from the card (default 3: background, right, left lung),
    the input channel count from ``card["input"]["channels"]``.
    """
    path = Path(path)
    card = read_card(path)
    name = _architecture_name(card, "segmenter", path)
    if f"segmenter/{name}" != SEGMENTER_ARCHITECTURE:
        raise ModelError(
            f"{path}: a 'segmenter/{name}' network; corona-ct builds only {SEGMENTER_ARCHITECTURE!r} "
            "(models/segmenter.py). Train one with `corona-ct train-seg`, or use --set segment.method=classical"
        )
    state, card = load_checkpoint(path, expected_architecture=SEGMENTER_ARCHITECTURE)

    module = build_unet(
        num_classes=int(card.get("num_classes", 3)), in_channels=int(card["input"]["channels"])
    )
    tensor_path = path.with_suffix(".safetensors")
    _load_state_strict(module, state, tensor_path)
    return LoadedModel(_ready(module, device), None, card, str(card["sha256"]), tensor_path, trained=True)


def input_contract_problems(
    card: Mapping[str, Any],
    window_hu: tuple[float, float],
    segmenter: LoadedModel | None,
    roi: str = ROI_LUNG_BOX,
) -> tuple[list[str], list[str]]:
    """(errors, warnings) where a run would feed a classifier inputs made unlike its training.

    The card's ``input`` says how its training images were made: ``window`` (HU mapped to
    [0, 1]), ``roi`` (``"lung-bbox"``: cropped to the lung box; ``"lung-bbox-masked"``: cropped and
    blanked outside the lungs; the run makes ``roi``, from ``RoiConfig.mask_outside_lungs``) and,
    optionally, ``segmenter`` (``{"architecture", "sha256"}`` of the network that drew the
    boxes). A different window or an ROI the pipeline does not make is an error; a box drawn
    by another segmenter is a warning (the crop differs, the model still applies).
    """
    contract = card.get("input", {}) or {}
    errors: list[str] = []
    warnings: list[str] = []
    window = contract.get("window")
    if window is not None and [float(v) for v in window] != [float(v) for v in window_hu]:
        errors.append(
            f"it was trained on the HU window {list(window)} but the config's window is {list(window_hu)}; "
            f"set --set window.hu_min={window[0]} --set window.hu_max={window[1]}"
        )
    trained_roi = contract.get("roi")
    if trained_roi == "lung":  # cards written before the names were fixed
        trained_roi = ROI_LUNG_BOX
    masked = {ROI_LUNG_BOX: "false", ROI_LUNG_ONLY: "true"}
    if trained_roi is not None and trained_roi != roi:
        if trained_roi in masked:
            errors.append(
                f"it was trained on roi {trained_roi!r} but this run makes {roi!r}; "
                f"set --set roi.mask_outside_lungs={masked[trained_roi]}"
            )
        else:
            errors.append(
                f"it was trained on roi {trained_roi!r} but the pipeline crops every slice to the lung box"
            )
    trained_with = contract.get("segmenter")
    if isinstance(trained_with, Mapping):
        used = (
            "the classical segmenter"
            if segmenter is None
            else f"{segmenter.card.get('architecture')} ({segmenter.sha256[:12]})"
        )
        if segmenter is None or segmenter.sha256 != trained_with.get("sha256"):
            warnings.append(
                f"the classifier was trained on lung boxes drawn by {trained_with.get('architecture')} "
                f"({str(trained_with.get('sha256', ''))[:12]}); this run uses {used}, so its crops differ from training"
            )
    return errors, warnings
