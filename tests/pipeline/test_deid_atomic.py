from pathlib import Path

import pytest

from corona_ct.pipeline.atomic import atomic_path, write_text
from corona_ct.pipeline.ingest.deid import clean_text, derive_study_id, hashed_id


def test_study_id_uses_a_safe_folder_name_else_a_hash() -> None:
    assert derive_study_id("case_017", "1.2.3", ["DOE^JOHN", "12345"]) == "case_017"
    hashed = derive_study_id("DOE_JOHN_CT", "1.2.3", ["DOE^JOHN", "12345"])
    assert hashed == hashed_id("1.2.3") and "DOE" not in hashed
    assert derive_study_id("LIDC-IDRI-0001", "1.2.3", ["LIDC-IDRI-0001"]).startswith("study-")
    assert derive_study_id("../etc", "1.2.3").startswith("study-")
    assert derive_study_id("a" * 80, "1.2.3").startswith("study-")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Müller^Jörg", "Muller_Jorg"),
        ("../../etc/passwd", "____etc_passwd"),
        ("a\x00b\nc", "a_b_c"),
        ("LUNG 1.0 B70f", "LUNG 1.0 B70f"),
    ],
)
def test_clean_text_removes_control_and_path_characters(raw: str, expected: str) -> None:
    assert clean_text(raw) == expected


def test_clean_text_never_yields_path_tricks() -> None:
    for raw in ["..", "a/../b", "\\..\\x", "....//", "\u202e/etc"]:
        cleaned = clean_text(raw)
        assert "/" not in cleaned and "\\" not in cleaned and ".." not in cleaned and cleaned.isascii()


def test_atomic_write_leaves_no_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "out" / "report.json"
    write_text(target, "first")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half written")
        raise RuntimeError("crash while writing")
    assert target.read_text() == "first"
    assert [p.name for p in target.parent.iterdir()] == ["report.json"]
    with atomic_path(tmp_path / "mask.nii.gz") as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".nii.gz") and tmp.name.startswith(".")
        tmp.write_text("new")
    assert (tmp_path / "mask.nii.gz").read_text() == "new"


def test_write_json_writes_plain_json_without_nan(tmp_path: Path) -> None:
    import json

    import numpy as np

    from corona_ct.pipeline.atomic import write_json

    value = {
        "auc": np.float32(0.5), "n": np.int64(3), "curve": np.array([0.0, np.nan, 1.0]),
        "missing": float("nan"), "big": float("inf"), "where": tmp_path, 1: (True, None),
    }  # fmt: skip
    path = write_json(tmp_path / "out.json", value, sort_keys=False)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text and text.endswith("\n")
    assert json.loads(text) == {
        "auc": 0.5, "n": 3, "curve": [0.0, None, 1.0], "missing": None, "big": None,
        "where": str(tmp_path), "1": [True, None],
    }  # fmt: skip
