"""Study ids: which input a study is, and the id it keeps across runs into one output folder.

Each study's input identity (DICOM: series UIDs, file names and sizes; NIfTI and slice images:
file contents) is kept per id in ``OUT/.corona-ct-ids.json``; an input gets back its own id on a
later run, and two different inputs with one name get distinct ids (``name``, ``name-2``, ...).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from corona_ct.pipeline.atomic import sha256_file, write_json, write_text
from corona_ct.pipeline.errors import ConfigError
from corona_ct.pipeline.ingest import StudyInput
from corona_ct.pipeline.ingest.deid import clean_text
from corona_ct.pipeline.ingest.discovery import nifti_stem
from corona_ct.pipeline.ingest.slices import IMAGE_SUFFIXES, TIFF_SUFFIXES
from corona_ct.pipeline.layout import REGISTRY_NAME

StudyNaming = Literal["deidentified", "folder"]
STUDY_NAMING: tuple[StudyNaming, ...] = ("deidentified", "folder")


@dataclass(frozen=True)
class InputIdentity:
    """What a study's input is, cheaply: ``key`` names the study, ``fingerprint`` also changes with an edit.

    DICOM: the study's series UIDs and its files' names (relative to the study folder) and
    sizes make the key; their modification times are added to the fingerprint. NIfTI and
    slice images: SHA-256 of the file contents (key and fingerprint alike).
    """

    kind: str
    key: str
    fingerprint: str

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "key": self.key, "fingerprint": self.fingerprint}


def _digest(value: object) -> str:
    """Hex SHA-256 of ``value`` as JSON with sorted keys."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def input_identity(item: StudyInput) -> InputIdentity:
    """The identity of one discovered study (see :class:`InputIdentity`); reads no DICOM pixel data."""
    if item.kind == "dicom":
        root = item.source if item.source.is_dir() else item.source.parent
        files = sorted({f for series in item.series for f in series.files})
        listing, times = [], []
        for path in files:
            stat = path.stat()
            try:
                name = path.relative_to(root).as_posix()
            except ValueError:
                name = path.name
            listing.append([name, stat.st_size])
            times.append(stat.st_mtime_ns)
        key = _digest({"kind": "dicom", "series": sorted(s.uid for s in item.series), "files": listing})
        return InputIdentity("dicom", key, _digest([key, times]))
    if item.kind == "nifti":
        key = _digest({"kind": "nifti", "sha256": sha256_file(item.source)})
        return InputIdentity("nifti", key, key)

    suffixes = TIFF_SUFFIXES if item.kind == "tiff" else IMAGE_SUFFIXES
    images = sorted(
        p
        for p in item.source.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes
    )
    key = _digest({"kind": item.kind, "files": [[p.name, sha256_file(p)] for p in images]})
    return InputIdentity(item.kind, key, key)


def _folder_name(item: StudyInput) -> str:
    """The input's own name: the study folder, or a NIfTI file without its suffix."""
    return nifti_stem(item.source) if item.kind == "nifti" else item.source.name


def folder_study_id(item: StudyInput) -> str:
    """``--study-id folder``: the folder (or NIfTI) name as given, made safe as a folder name."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", _folder_name(item)).strip("._")
    return name[:80] or "study"


def load_registry(output: Path) -> dict[str, dict[str, str]]:
    """``OUT/.corona-ct-ids.json`` as study id → its input's ``key``, ``kind`` and ``naming`` ({} when absent)."""
    path = output / REGISTRY_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"{path}: unreadable ({error}); it maps study ids to inputs. Restore it, or pass a new --output"
        ) from error
    studies = data.get("studies", {}) if isinstance(data, dict) else {}
    return {str(k): dict(v) for k, v in studies.items() if isinstance(v, dict)}


def write_registry(output: Path, registry: dict[str, dict[str, str]]) -> None:
    """``OUT/.corona-ct-ids.json``, atomically: every study id ever given in ``output`` and its input's key."""
    write_json(output / REGISTRY_NAME, {"studies": registry}, sort_keys=True)


def assign_study_ids(
    items: Sequence[StudyInput],
    identities: Sequence[InputIdentity],
    registry: dict[str, dict[str, str]],
    naming: StudyNaming,
) -> list[str]:
    """One id per study, stable across runs into one output folder; ``registry`` is updated in place.

    An input whose identity is in the registry (under this naming, or with this base name) gets its
    earlier id back; any other
    takes its base name (de-identified id or folder name), or ``name-2``, ``name-3``, ... when that
    name belongs to a different input in this folder or in this run.
    """
    assigned: list[str] = []
    used: set[str] = set()
    for item, identity in zip(items, identities, strict=True):
        base = item.study_id if naming == "deidentified" else folder_study_id(item)
        variant = re.compile(re.escape(base) + r"(-\d+)?")
        earlier = sorted(
            (i for i, entry in registry.items()
             if entry.get("key") == identity.key and i not in used
             and (entry.get("naming") == naming or variant.fullmatch(i))),
            key=lambda i: (len(i), i),
        )  # fmt: skip
        if earlier:
            study_id = earlier[0]
        else:
            study_id, n = base, 2
            while study_id in used or study_id in registry:
                study_id, n = f"{base}-{n}", n + 1
            registry[study_id] = {"key": identity.key, "kind": identity.kind, "naming": naming}
        used.add(study_id)
        assigned.append(study_id)
    return assigned


def write_ids_file(path: Path, entries: Sequence[tuple[str, StudyInput]]) -> None:
    """CSV study_id,input,name,kind for the user's own records; rows of other ids in the file are kept."""
    rows: dict[str, dict[str, str]] = {}
    if path.is_file():
        with contextlib.suppress(OSError, csv.Error, UnicodeDecodeError), path.open(newline="") as handle:
            rows = {r["study_id"]: r for r in csv.DictReader(handle) if r.get("study_id")}
    for study_id, item in entries:
        rows[study_id] = {
            "study_id": study_id,
            "input": str(item.source.resolve()),
            "name": _folder_name(item),
            "kind": item.kind,
        }
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["study_id", "input", "name", "kind"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows[k] for k in sorted(rows))
    write_text(path, buffer.getvalue())


def display_source(item: StudyInput) -> str:
    """The input's kind and file or folder name, cleaned; never a header string.

    A DICOM folder's name is shown only when the study id was derived from it, i.e.
    when it was judged free of patient identifiers; otherwise it is withheld.
    """
    kind, name, study_id = item.kind, Path(item.source).name, item.study_id
    if kind == "dicom" and study_id != name and not re.fullmatch(re.escape(name) + r"-\d+", study_id):
        return "dicom:(folder name withheld)"
    return f"{kind}:{clean_text(name, 80)}"
