"""Training manifests: which image, which class, which patient group, which split.

Two ways in:

* a CSV file with columns ``path,label,group[,split]`` (paths relative to the CSV;
  label = class name or index; group = patient or volume id; split = train/val/test);
* class folders (``covid=DIR``, ``normal=DIR``) whose file names are grouped by a
  rule, a regular expression applied to the file name without its extension:

  ========== ================================================ =================================
  rule       pattern (group = named group ``group``)            example → group
  ========== ================================================ =================================
  covid-ctset ``(?:^|_)(?P<group>patient\\d+)(?:_|$)``           ``..._patient12_SR_3_IM00031`` → patient12
  ucsd       ``^(?P<group>.+?)(?=-p|%|_|$)``                    ``2020.03.22.20040782-p25-1`` → 2020.03.22.20040782; ``39%2`` → 39
  semiseg    ``^(?P<group>.+)_\\d+$``                           ``Data-1_coronacases_org_001_12`` → Data-1_coronacases_org_001
  ========== ================================================ =================================

  ``auto`` picks covid-ctset when every name matches it, else semiseg when every
  name looks like ``Data-<n>_..._<slice>``, else ucsd. ``regex:PATTERN`` uses your
  own pattern (named group ``group``, else the first capture group, else the match).
  Groups are shared across classes: the same group name in two class folders is
  treated as one source, the conservative choice for leakage.

The manifest's SHA-256 (over its canonical CSV text, paths relative to the data
root) goes into the model card so that a checkpoint names the exact data it saw.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from corona_ct.pipeline.errors import ConfigError, InputError, NoImageDataError
from corona_ct.pipeline.ingest.slices import SLICE_FILE_SUFFIXES

IMAGE_SUFFIXES = SLICE_FILE_SUFFIXES  # the project's one registry of slice-file suffixes
SPLITS = ("train", "val", "test")

GROUP_RULES: dict[str, str] = {
    "covid-ctset": r"(?:^|_)(?P<group>patient\d+)(?:_|$)",
    "ucsd": r"^(?P<group>.+?)(?=-p|%|_|$)",
    "semiseg": r"^(?P<group>.+)_\d+$",
}
_SEMISEG_NAME = re.compile(r"^Data-\d+_.+_\d+$")


@dataclass(frozen=True)
class ManifestEntry:
    path: Path
    label: int  # index into Manifest.class_names
    group: str  # patient, volume or source figure
    split: str | None = None  # "train", "val", "test" or None (decided by the splitter)


@dataclass(frozen=True)
class Manifest:
    """Labelled, grouped image list; ``class_names[1]`` is the positive (COVID) class."""

    entries: tuple[ManifestEntry, ...]
    class_names: tuple[str, ...]
    root: Path
    grouping: str  # how groups were obtained: "csv" or the rule name

    def __post_init__(self) -> None:
        if not self.entries:
            raise NoImageDataError(f"{self.root}: the manifest holds no images")

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def labels(self) -> npt.NDArray[np.int64]:
        return np.array([entry.label for entry in self.entries], dtype=np.int64)

    @property
    def groups(self) -> npt.NDArray[np.str_]:
        return np.array([entry.group for entry in self.entries], dtype=str)

    @property
    def paths(self) -> list[Path]:
        return [entry.path for entry in self.entries]

    def subset(self, indices: Sequence[int] | npt.NDArray[np.int64]) -> Manifest:
        return Manifest(
            tuple(self.entries[int(i)] for i in indices), self.class_names, self.root, self.grouping
        )

    def split_indices(self, split: str) -> npt.NDArray[np.int64]:
        return np.array([i for i, entry in enumerate(self.entries) if entry.split == split], dtype=np.int64)

    def to_csv(self) -> str:
        """Canonical CSV text (``path,label,group,split``; paths relative to ``root`` where possible)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["path", "label", "group", "split"])
        for entry in self.entries:
            try:
                shown = entry.path.relative_to(self.root).as_posix()
            except ValueError:
                shown = entry.path.as_posix()
            writer.writerow([shown, self.class_names[entry.label], entry.group, entry.split or ""])
        return buffer.getvalue()

    def sha256(self) -> str:
        return hashlib.sha256(self.to_csv().encode("utf-8")).hexdigest()

    def summary(self) -> str:
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        per_class = ", ".join(f"{name} {count}" for name, count in zip(self.class_names, counts, strict=True))
        return f"{len(self)} images ({per_class}) in {np.unique(self.groups).size} groups [{self.grouping}]"


def group_rule(rule: str) -> re.Pattern[str]:
    """Compiled pattern of a built-in rule name or of ``regex:PATTERN``."""
    if rule.startswith("regex:"):
        try:
            return re.compile(rule[len("regex:") :])
        except re.error as error:
            raise ConfigError(f"grouping regex {rule[6:]!r} is invalid: {error}") from None
    if rule not in GROUP_RULES:
        raise ConfigError(
            f"unknown grouping rule {rule!r}; use auto, {', '.join(GROUP_RULES)} or regex:PATTERN"
        )
    return re.compile(GROUP_RULES[rule])


def group_of(name: str, pattern: re.Pattern[str]) -> str | None:
    """The group a file name (extension removed) belongs to under ``pattern``; None if no match."""
    stem = Path(name).stem
    match = pattern.search(stem)
    if match is None:
        return None
    if "group" in match.re.groupindex:
        return match.group("group")
    return match.group(1) if match.re.groups else match.group(0)


def detect_rule(names: Sequence[str]) -> str:
    """The built-in rule for a list of file names (see module docstring)."""
    ctset = re.compile(GROUP_RULES["covid-ctset"])
    stems = [Path(name).stem for name in names]
    if stems and all(ctset.search(stem) for stem in stems):
        return "covid-ctset"
    if stems and all(_SEMISEG_NAME.match(stem) for stem in stems):
        return "semiseg"
    return "ucsd"


def image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted; hidden files skipped."""
    if not folder.is_dir():
        raise NoImageDataError(f"class folder {folder} does not exist or is not a folder")
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )
    if not files:
        raise NoImageDataError(f"class folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def ordered_class_names(names: Sequence[str], positive: str) -> tuple[str, ...]:
    """Binary class order: the negative class first, ``positive`` (index 1) second."""
    unique = list(dict.fromkeys(names))
    if len(unique) != 2:
        raise ConfigError(f"binary training needs exactly 2 classes, got {len(unique)}: {unique}")
    if positive not in unique:
        raise ConfigError(f"positive class {positive!r} is not among the classes {unique}; set --positive")
    negative = next(name for name in unique if name != positive)
    return (negative, positive)


def manifest_from_class_folders(
    class_folders: Mapping[str, str | Path], rule: str = "auto", positive: str = "covid"
) -> Manifest:
    """Manifest of every image under each class folder, grouped by ``rule`` on the file names."""
    class_names = ordered_class_names(list(class_folders), positive)
    files = {name: image_files(Path(folder).resolve()) for name, folder in class_folders.items()}
    all_names = [path.name for paths in files.values() for path in paths]
    chosen = detect_rule(all_names) if rule == "auto" else rule
    pattern = group_rule(chosen)
    entries = []
    for name, paths in files.items():
        for path in paths:
            group = group_of(path.name, pattern)
            if group is None:
                raise ConfigError(
                    f"{path}: file name does not match the grouping rule {chosen!r} ({pattern.pattern}); "
                    "choose another --group-rule or give a manifest CSV with a group column"
                )
            entries.append(ManifestEntry(path, class_names.index(name), group))
    root = Path(os.path.commonpath([Path(folder).resolve() for folder in class_folders.values()]))
    return Manifest(tuple(entries), class_names, root, chosen)


def read_manifest_csv(path: str | Path, positive: str = "covid") -> Manifest:
    """Read ``path,label,group[,split]`` rows; relative paths are resolved against the CSV's folder."""
    csv_path = Path(path)
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read manifest {csv_path}: {error}") from None
    rows = list(csv.DictReader(io.StringIO(text)))
    required = {"path", "label", "group"}
    if not rows or not required <= set(rows[0]):
        raise InputError(f"manifest {csv_path} must have a header with columns path,label,group[,split]")
    raw_labels = [row["label"].strip() for row in rows]
    if all(label in {"0", "1"} for label in raw_labels):
        class_names: tuple[str, ...] = (
            ("negative", "positive") if positive == "covid" else ("other", positive)
        )
        labels = [int(label) for label in raw_labels]
    else:
        class_names = ordered_class_names(raw_labels, positive)
        labels = [class_names.index(label) for label in raw_labels]
    entries = []
    for line, (row, label) in enumerate(zip(rows, labels, strict=True), start=2):
        split = (row.get("split") or "").strip().lower() or None
        if split is not None and split not in SPLITS:
            raise InputError(f"manifest {csv_path} line {line}: split {split!r} is not one of {SPLITS}")
        group = row["group"].strip()
        if not group:
            raise InputError(f"manifest {csv_path} line {line}: empty group (patient id) column")
        image = Path(row["path"].strip())
        image = (image if image.is_absolute() else csv_path.parent / image).resolve()
        if not image.is_file():
            raise InputError(f"manifest {csv_path} line {line}: image {image} does not exist")
        entries.append(ManifestEntry(image, label, group, split))
    return Manifest(tuple(entries), class_names, csv_path.parent.resolve(), "csv")
