"""Series selection: which series of a study is analysed and why, ``--series``, and unknown UIDs."""

from __future__ import annotations

from pathlib import Path

import pytest

from corona_ct.pipeline.errors import AmbiguousInputError, ConfigError, UnsupportedInputError
from corona_ct.pipeline.ingest import (
    choose_series,
    discover,
    find_series,
    find_studies_holding,
    load_all_series,
    load_input,
    load_study,
)
from corona_ct.pipeline.ingest.select import SELECTION_RULE, series_listing
from tests.ingest.dicom_factory import AXIAL, CORONAL, phantom_hu, write_series

ORIGIN = (-11.2, -12.8, -100.0)
BASE = "1.2.826.0.1.3680043.8.498.77."


def _write(folder: Path, name: str, n: int, uid: str, **kwargs: object) -> None:
    """One series of ``n`` 16×16 slices into ``folder``, its files named ``{name}_{k}.dcm``."""
    thickness = float(kwargs.pop("thickness", 2.5))  # type: ignore[arg-type]
    write_series(
        folder, phantom_hu((n, 16, 16), seed=n), spacing=(thickness, 0.7, 0.7), origin=ORIGIN,
        names=[f"{name}_{k:02d}.dcm" for k in range(n)], series_uid=uid, thickness=thickness, **kwargs,
    )  # fmt: skip


def _write_three_series(root: Path) -> dict[str, str]:
    uids: dict[str, str] = {}
    for name, n, image_type, orientation, thickness in (
        ("primary", 6, ("ORIGINAL", "PRIMARY", "AXIAL"), AXIAL, 2.5),
        ("derived", 10, ("DERIVED", "SECONDARY", "AXIAL"), AXIAL, 1.0),
        ("coronal", 12, ("DERIVED", "SECONDARY", "REFORMATTED"), CORONAL, 2.0),
    ):
        uid = BASE + str(len(uids) + 1) + "00000000000" + str(n)
        uids[name] = uid
        write_series(
            root / name, phantom_hu((n, 16, 16), seed=n), spacing=(thickness, 0.7, 0.7), origin=ORIGIN,
            orientation=orientation, series_uid=uid, image_type=image_type, thickness=thickness,
        )  # fmt: skip
    return uids


def test_series_choice_rule_and_user_choice(tmp_path: Path) -> None:
    uids = _write_three_series(tmp_path / "study")
    (study,) = discover([tmp_path / "study"])
    assert len(study.series) == 3 and study.study_id == "study"
    chosen, reason = choose_series(study)
    assert chosen.uid == uids["primary"]  # axial beats coronal, ORIGINAL/PRIMARY beats more slices
    assert "decided by: ORIGINAL/PRIMARY" in reason and "--series" in reason
    coronal = next(s for s in study.series if s.uid == uids["coronal"])
    assert choose_series(study, coronal.short_uid)[0] == coronal
    assert choose_series(study, uids["derived"][:-1])[0].uid == uids["derived"]  # unique prefix
    with pytest.raises(
        ConfigError,
        match=r"'9\.9\.9' not found or not unique; series there: .*6 slices.*10 slices.*12 slices",
    ):
        choose_series(study, "9.9.9")
    volume = load_study(tmp_path / "study", series_uid=uids["coronal"])
    assert volume.geometry.shape == (16, 12, 16)  # coronal slices re-ordered into (S, P, L)
    default = load_study(tmp_path / "study")
    assert default.n_slices == 6 and any("several CT series" in w for w in default.warnings)
    volumes = load_all_series(study)
    assert sorted(v.n_slices for v in volumes) == [6, 10, 16]
    assert len({v.study_id for v in volumes}) == 3


def test_thinnest_breaks_a_tie(tmp_path: Path) -> None:
    for name, thickness in (("thick", 5.0), ("thin", 1.0)):
        write_series(
            tmp_path / "study" / name, phantom_hu((6, 16, 16)), spacing=(thickness, 0.7, 0.7), origin=ORIGIN,
            series_uid=f"1.2.3.4.{int(thickness)}", thickness=thickness,
        )  # fmt: skip
    chosen, reason = choose_series(discover([tmp_path / "study"])[0])
    assert chosen.uid == "1.2.3.4.1" and "decided by: thinnest" in reason


def test_several_series_in_one_folder(tmp_path: Path) -> None:
    """Series mixed file by file in one folder: grouped by UID, the rule picks one and says why."""
    folder = tmp_path / "export"
    _write(folder, "short", 6, BASE + "1")
    _write(folder, "long", 9, BASE + "2")
    _write(folder, "mpr", 12, BASE + "3", orientation=CORONAL)
    _write(folder, "mr", 5, BASE + "4", modality="MR")
    _write(folder, "scout", 1, BASE + "5", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    (study,) = discover([folder])
    assert {s.uid for s in study.series} == {BASE + str(i) for i in range(1, 5)}  # the scout is a note
    assert any("localizer/scout image(s) ignored" in note for note in study.notes)
    mr = next(s for s in study.series if s.uid == BASE + "4")
    assert not mr.usable and "magnetic resonance" in mr.problem

    chosen, reason = choose_series(study)
    assert chosen.uid == BASE + "2" and chosen.n_slices == 9
    # Both axial and ORIGINAL/PRIMARY: the number of slices decides; the coronal series comes last.
    assert f"best of 3 CT series by the rule {' > '.join(SELECTION_RULE)}" in reason
    assert "(decided by: most slices)" in reason
    others = reason.split("others: ", 1)[1]
    assert (
        others.index("…3.8.498.77.1 (axial") < others.index("…3.8.498.77.3 (coronal") and "MR" not in others
    )
    assert "--series UID" in reason and "--all-series" in reason

    volume = load_input(study)
    assert volume.n_slices == 9
    assert any("several CT series; analysed …3.8.498.77.2" in w for w in volume.warnings)


def test_the_only_usable_series_says_so(tmp_path: Path) -> None:
    folder = tmp_path / "export"
    _write(folder, "ct", 6, BASE + "1")
    _write(folder, "mr", 5, BASE + "2", modality="MR")
    chosen, reason = choose_series(discover([folder])[0])
    assert chosen.uid == BASE + "1"
    assert reason == "the only usable CT series; 1 other series not usable"


def test_series_uid_chooses_one(tmp_path: Path) -> None:
    folder = tmp_path / "export"
    _write(folder, "short", 6, BASE + "1000001")
    _write(folder, "long", 9, BASE + "2000002")
    (study,) = discover([folder])
    for query in (
        BASE + "1000001",
        "…8.77.1000001",
        "1000001",
        BASE + "1",
    ):  # full, short, suffix, prefix
        chosen, reason = choose_series(study, query)
        assert chosen.uid == BASE + "1000001" and reason == "chosen with --series …8.77.1000001"
    volume = load_study(folder, series_uid="1000001")
    assert volume.n_slices == 6
    assert not any("several CT series" in w for w in volume.warnings)  # the user chose; nothing to explain
    assert find_series(study, "2000002").n_slices == 9
    with pytest.raises(ConfigError, match="not found or not unique"):
        choose_series(study, BASE)  # a prefix of both


def test_series_uid_picks_the_study_that_holds_it(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    for patient in ("1", "2"):
        _write(
            folder,
            f"p{patient}",
            6,
            f"{BASE}{patient}.1",
            patient_id=f"P{patient}",
            study_uid=f"1.2.3.{patient}",
        )
    studies = discover([folder])
    assert len(studies) == 2
    with pytest.raises(AmbiguousInputError, match="2 studies"):
        load_study(folder)
    (holder,) = find_studies_holding(studies, f"{BASE}2.1")
    assert holder.series[0].uid == f"{BASE}2.1"
    assert load_study(folder, series_uid=f"{BASE}2.1").study_id == holder.study_id
    assert find_studies_holding(studies, "9.9.9") == []


def test_unknown_series_uid_lists_the_series_there(tmp_path: Path) -> None:
    folder = tmp_path / "export"
    _write(folder, "short", 6, BASE + "1000001")
    _write(folder, "long", 9, BASE + "2000002", thickness=1.25)
    (study,) = discover([folder])
    with pytest.raises(ConfigError) as raised:
        choose_series(study, "9.9.9")
    message = str(raised.value)
    assert message.startswith("study export: series '9.9.9' not found or not unique; series there: ")
    assert "…8.77.1000001 (axial CT, ORIGINAL/PRIMARY, 6 slices, 2.5 mm)" in message
    assert "…8.77.2000002 (axial CT, ORIGINAL/PRIMARY, 9 slices, 1.25 mm)" in message
    assert message.endswith("pass a full UID or a unique part of one")

    with pytest.raises(ConfigError) as raised:
        load_study(folder, series_uid="9.9.9")
    assert f"{folder}: no series matches '9.9.9'; series found: " in str(raised.value)
    assert series_listing([study]) == "export: …8.77.1000001, …8.77.2000002"
    assert series_listing([study]) in str(raised.value)


def test_no_series_to_choose(tmp_path: Path) -> None:
    _write(tmp_path / "mr", "mr", 5, BASE + "1", modality="MR")
    with pytest.raises(UnsupportedInputError, match="modality MR"):
        choose_series(discover([tmp_path / "mr"])[0])
    write_series(tmp_path / "nifti-like", phantom_hu())  # a DICOM study ...
    (tmp_path / "vol.nii.gz").write_bytes(b"\x00")  # ... and a NIfTI file, which has no series
    nifti = next(s for s in discover([tmp_path / "vol.nii.gz"]))
    with pytest.raises(ConfigError, match="nifti input, which has no DICOM series to choose"):
        choose_series(nifti)
