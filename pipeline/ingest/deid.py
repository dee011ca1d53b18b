"""De-identification helpers: safe study ids, cleaned text and file names for outputs.

No output (file names, reports, logs) may carry a patient's name, id, birth
date or accession number, so study ids are derived, never copied from tags.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable
from pathlib import Path

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9 ._:+()/,=-]")


def hashed_id(*keys: str, prefix: str = "study") -> str:
    """``prefix-`` plus 10 hex digits of SHA-256 over the keys (e.g. StudyInstanceUID)."""
    digest = hashlib.sha256("\x1f".join(keys).encode("utf-8", "replace")).hexdigest()
    return f"{prefix}-{digest[:10]}"


def derive_study_id(folder_name: str | None, uid: str, identifiers: Iterable[str] = ()) -> str:
    """A folder-safe study id.

    The input folder's name is used when it is a plain, short name that contains
    none of the patient ``identifiers`` (name parts, patient id, accession number,
    birth date); otherwise a hash of ``uid`` (StudyInstanceUID or file path).
    """
    if folder_name and _SAFE_NAME.match(folder_name) and folder_name not in {".", ".."}:
        lowered = folder_name.lower()
        parts = {
            p.lower() for ident in identifiers for p in re.split(r"[\^\s,]+", ident or "") if len(p) >= 3
        }
        if not any(part in lowered for part in parts):
            return folder_name
    return hashed_id(uid)


def clean_text(value: object, max_length: int = 64) -> str:
    """Printable ASCII version of a header string: no control characters, no path tricks."""
    text = unicodedata.normalize("NFKD", str(value))
    text = text.encode("ascii", "ignore").decode("ascii")
    text = _UNSAFE_CHARS.sub("_", text).replace("..", "_").replace("/", "_")
    return text.strip()[:max_length]


def display_path(path: Path, root: Path | None = None) -> str:
    """A file name safe to print: relative to ``root`` when possible, each part cleaned."""
    try:
        parts = path.relative_to(root).parts if root is not None else (path.name,)
    except ValueError:
        parts = (path.name,)
    return "/".join(clean_text(part, max_length=80) or "_" for part in parts) or "_"
