"""CSV tables given to the analyses: labels and groups files keyed by study.

A labels/groups file maps each study to a value (``label`` or ``group``). It names a
study by its ``study_id``, or, together with the ids file of ``corona-ct run --ids-file``,
by its input path or a folder or file name on that path that only one study has.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath

from corona_ct.pipeline.errors import InputError

#: Key columns accepted in labels/groups files, in order of preference.
KEY_COLUMNS = ("study_id", "input", "name")

#: Label spellings accepted in labels.csv (compared case-insensitively, spaces/underscores as '-').
POSITIVE_LABELS = frozenset(
    {"1", "covid", "covid-19", "covid19", "sars-cov-2", "positive", "pos", "yes", "true", "abnormal", "case"}
)
NEGATIVE_LABELS = frozenset(
    {
        "0",
        "normal",
        "non-covid",
        "noncovid",
        "non-covid-19",
        "negative",
        "neg",
        "no",
        "false",
        "healthy",
        "control",
    }
)


def read_csv(path: Path, required: Sequence[str], what: str) -> list[dict[str, str]]:
    """Rows of a CSV file as stripped strings; ``InputError`` naming ``what`` if absent or lacking columns."""
    if not path.is_file():
        raise InputError(f"{path}: {what} not found")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"{path}: cannot read {what} as CSV ({error})") from error
    missing = [c for c in required if c not in header]
    if missing:
        raise InputError(
            f"{path}: {what} lacks column(s) {', '.join(missing)} (found: {', '.join(header) or 'no header'})"
        )
    return rows


def read_mapping(path: Path, value_column: str, what: str, ids_file: Path | None = None) -> dict[str, str]:
    """study_id → value from a labels/groups CSV; with ``ids_file`` keys may also be input paths or names."""
    rows = read_csv(path, (value_column,), what)
    with path.open(newline="", encoding="utf-8-sig") as handle:
        header = [h.strip() for h in next(csv.reader(handle), [])]
    key_column = next((c for c in KEY_COLUMNS if c in header), None)
    if key_column is None or (key_column != "study_id" and ids_file is None):
        raise InputError(
            f"{path}: {what} lacks a study_id column (found: {', '.join(header) or 'no header'}); key it by "
            "study_id, or by input (path or folder name) together with --ids-file"
        )
    aliases = read_ids_aliases(ids_file) if ids_file is not None else None
    mapping: dict[str, str] = {}
    for row in rows:
        key, value = row[key_column], row[value_column]
        if not key:
            continue
        study_id = (
            key if aliases is None or ids_file is None else resolve_study_key(key, aliases, path, ids_file)
        )
        if study_id in mapping and mapping[study_id] != value:
            raise InputError(
                f"{path}: study {study_id!r} has two different {value_column}s "
                f"({mapping[study_id]!r} and {value!r}); keep one"
            )
        mapping[study_id] = value
    if not mapping:
        raise InputError(f"{path}: empty cohort: {what} lists no studies")
    return mapping


def read_ids_aliases(ids_file: Path) -> dict[str, set[str]]:
    """Every name a study can be given by → the study ids it may mean, from `run --ids-file`'s CSV.

    A study is known by its study_id, its input path (as written and resolved) and every
    folder or file name on that path (a NIfTI file also without its suffix).
    """
    aliases: dict[str, set[str]] = {}
    for row in read_csv(ids_file, ("study_id", "input"), "ids file"):
        study_id, source = row["study_id"], row["input"]
        if not study_id:
            continue
        path = PurePath(source)
        keys = {study_id, source, row.get("name", ""), *path.parts[1:]}
        for suffix in (".nii.gz", ".nii"):
            if path.name.endswith(suffix):
                keys.add(path.name[: -len(suffix)])
        for key in keys - {""}:
            aliases.setdefault(key, set()).add(study_id)
    if not aliases:
        raise InputError(f"{ids_file}: the ids file lists no studies")
    return aliases


def resolve_study_key(key: str, aliases: Mapping[str, set[str]], source: Path, ids_file: Path) -> str:
    """The study id a labels key means: a study_id, an input path or a name only one study's path has."""
    candidates = aliases.get(key)
    if candidates is None and ("/" in key or "\\" in key):
        candidates = aliases.get(str(Path(key).expanduser().resolve()))
    if not candidates:
        return key  # not in the ids file: kept as a study id (reported as unmatched if it is none)
    if len(candidates) > 1:
        raise InputError(
            f"{source}: {key!r} names several studies in {ids_file} ({', '.join(sorted(candidates))}); "
            "key those rows by study_id or by the full input path"
        )
    return next(iter(candidates))


def _normalise_label(value: str) -> str:
    text = value.strip().lower().replace("_", "-").replace(" ", "-")
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number in (0.0, 1.0) else text


def map_labels(raw: Mapping[str, str], *, positive: str | None, source: Path) -> dict[str, int]:
    """study_id -> 0/1 from 0/1 or names; ``positive`` names the positive value, all others negative."""
    if positive is not None:
        wanted = _normalise_label(positive)
        mapped = {s: int(_normalise_label(v) == wanted) for s, v in raw.items()}
        if not any(mapped.values()):
            values = sorted(set(raw.values()))
            raise InputError(
                f"{source}: no label equals --positive {positive!r}; labels found: {', '.join(values)}"
            )
        return mapped
    mapped, unknown = {}, set()
    for study_id, value in raw.items():
        key = _normalise_label(value)
        if key in POSITIVE_LABELS:
            mapped[study_id] = 1
        elif key in NEGATIVE_LABELS:
            mapped[study_id] = 0
        else:
            unknown.add(value)
    if unknown:
        raise InputError(
            f"{source}: cannot map label(s) {', '.join(sorted(unknown)[:8])} to positive/negative; use 0/1, "
            f"covid/normal, positive/negative, or name the positive value with --positive LABEL"
        )
    return mapped
