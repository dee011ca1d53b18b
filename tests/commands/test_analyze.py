"""``corona-ct analyze roc|wilcoxon`` and ``corona-ct cluster`` end to end on fake run outputs."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import roc_auc_score

from corona_ct.pipeline import cli

SUMMARY_COLUMNS = [
    "study_id", "status", "source", "n_slices", "slices_evaluated", "positive_slices", "case_probability",
    "corona_score_cm3", "corona_score_in_lung_cm3", "lung_volume_cm3", "affected_percent", "ggo_percent",
    "consolidation_percent", "reason", "error",
]  # fmt: skip
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def only_analysis_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    """Build the CLI with this module's commands only, so sibling commands cannot break these tests."""
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("corona_ct.pipeline.commands.analyze",))


def write_run_output(
    folder: Path,
    scores: Mapping[str, tuple[float, float] | None],
    *,
    feature_dim: int = 32,
    slices: int = 6,
    seed: int = 0,
    with_features: bool = True,
    not_assessable: Mapping[str, str] | None = None,
) -> None:
    """A `corona-ct run` output: summary.csv (+ features.npz per study) following the run contract.

    ``scores`` maps study_id -> (corona_score_cm3, case_probability), or None for a failed study;
    ``not_assessable`` maps study_id -> reason for studies without plausible lungs (no scores, no features).
    Slice features come from three well-separated "manifestations", so clustering has structure.
    """
    rng = np.random.default_rng(seed)
    prototypes = np.random.default_rng(99).normal(size=(3, feature_dim)) * 4.0
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        for study_id, reason in (not_assessable or {}).items():
            row = dict.fromkeys(SUMMARY_COLUMNS, "")
            row.update(
                study_id=study_id,
                source=f"/data/{study_id}",
                status="not-assessable",
                reason=reason,
                n_slices="20",
                slices_evaluated="0",
                lung_volume_cm3="18.3",
            )
            writer.writerow(row)
        for study_id, values in scores.items():
            row = dict.fromkeys(SUMMARY_COLUMNS, "")
            row.update(study_id=study_id, source=f"/data/{study_id}")
            if values is None:
                row.update(status="failed", error="[segment] no lung found")
                writer.writerow(row)
                continue
            score, probability = values
            row.update(
                status="ok",
                n_slices=str(slices),
                slices_evaluated=str(slices),
                positive_slices=str(int(probability > 0.5) * 2),
                case_probability=f"{probability:.4f}",
                corona_score_cm3=f"{score:.3f}",
                corona_score_in_lung_cm3=f"{0.9 * score:.3f}",
                lung_volume_cm3="4200",
                affected_percent=f"{score / 42:.3f}",
            )
            writer.writerow(row)
            if not with_features:
                continue
            kind = rng.integers(0, 3, size=slices)
            features = np.abs(prototypes[kind] + rng.normal(size=(slices, feature_dim))).astype(np.float32)
            study_dir = folder / study_id
            study_dir.mkdir()
            np.savez(
                study_dir / "features.npz",
                study_id=np.array(study_id),
                slice_index=np.arange(slices, dtype=np.int64) + 10,
                z_mm=np.arange(slices, dtype=np.float64) * 2.5 - 100.0,
                probability=np.where(kind == 0, 0.9, 0.2).astype(np.float32),
                features=features,
                weights=np.ones((slices, feature_dim), dtype=np.float32),
                thumbnails=rng.integers(0, 256, size=(slices, 112, 112), dtype=np.uint8),
                cams=rng.integers(0, 256, size=(slices, 112, 112), dtype=np.uint8),
            )


def _cohort(n: int = 24, seed: int = 1) -> tuple[dict[str, tuple[float, float]], dict[str, int]]:
    rng = np.random.default_rng(seed)
    labels = {f"S{i:03d}": int(i % 2) for i in range(n)}
    scores = {
        s: (
            float(max(0.0, 30 * y + rng.normal(scale=25))),
            float(np.clip(0.3 + 0.4 * y + rng.normal(scale=0.25), 0, 1)),
        )
        for s, y in labels.items()
    }
    return scores, labels


def _write_table(path: Path, column: str, mapping: Mapping[str, object]) -> Path:
    path.write_text("study_id," + column + "\n" + "".join(f"{k},{v}\n" for k, v in mapping.items()))
    return path


def _main(*argv: str | Path) -> int:
    return cli.main([str(a) for a in argv])


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC)


def test_roc_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scores, labels = _cohort()
    run_a, run_b = tmp_path / "run_a", tmp_path / "run_b"
    studies = list(scores)
    write_run_output(run_a, {s: scores[s] for s in studies[:12]} | {"FAILED1": None}, with_features=False)
    write_run_output(
        run_b, {s: scores[s] for s in studies[12:]} | {"UNLABELLED": (5.0, 0.5)}, with_features=False
    )
    label_file = _write_table(tmp_path / "labels.csv", "label", labels | {"FAILED1": 1, "NOT_RUN": 0})
    out = tmp_path / "roc"
    code = _main(
        "analyze", "roc", "--results", run_a, run_b, "--labels", label_file, "--output", out,
        "--score", "corona_score_cm3", "--score", "case_probability",
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    _assert_png(out / "roc.png")
    report = json.loads((out / "roc.json").read_text())
    y = np.array([labels[s] for s in studies])
    for column, position in (("corona_score_cm3", 0), ("case_probability", 1)):
        values = np.round([scores[s][position] for s in studies], 3 if position == 0 else 4)
        result = report["scores"][column]
        assert result["auc"] == pytest.approx(roc_auc_score(y, values), abs=1e-12)
        assert result["ci_low"] < result["auc"] < result["ci_high"]
        assert result["curve"]["thresholds"][0] is None  # +inf written as null
    assert report["n_studies"] == 24 and report["n_positive"] == 12
    assert len(report["delong_tests"]) == 1 and 0 <= report["delong_tests"][0]["p_value"] <= 1
    excluded = report["excluded"]
    assert excluded["in_labels_not_in_results"] == ["NOT_RUN"]
    assert [f["study_id"] for f in excluded["failed_in_run"]] == ["FAILED1"]
    assert excluded["in_results_not_in_labels"] == ["UNLABELLED"]
    assert report["degenerate"] is False and report["degenerate_reasons"] == []
    assert all(result["problems"] == [] for result in report["scores"].values())
    markdown = (out / "roc.md").read_text()
    assert "| corona_score_cm3 |" in markdown and "NOT_RUN" in markdown and "FAILED1" in markdown
    assert "DEGENERATE" not in markdown
    assert "DeLong" in capsys.readouterr().out


def test_roc_accepts_label_names_and_bootstrap(tmp_path: Path) -> None:
    scores, labels = _cohort(seed=2)
    write_run_output(tmp_path / "run", scores, with_features=False)
    numeric = _write_table(tmp_path / "numeric.csv", "label", labels)
    named = _write_table(
        tmp_path / "named.csv", "label", {s: ("COVID-19" if y else "Normal") for s, y in labels.items()}
    )
    outputs = []
    for name, table in (("a", numeric), ("b", named), ("c", named)):
        args: list[str | Path] = [
            "analyze",
            "roc",
            "--results",
            tmp_path / "run",
            "--labels",
            table,
            "--output",
            tmp_path / name,
        ]
        assert _main(*args, "--bootstrap", "200", "--seed", "4") == 0
        outputs.append(json.loads((tmp_path / name / "roc.json").read_text()))
    assert outputs[0]["ci_method"] == "bootstrap"
    assert outputs[0]["scores"] == outputs[1]["scores"] == outputs[2]["scores"]  # names map like 0/1; seeded


def test_wilcoxon_two_groups_end_to_end(tmp_path: Path) -> None:
    scores, _ = _cohort(n=20, seed=3)
    write_run_output(tmp_path / "run", scores, with_features=False)
    groups = {s: ("severe" if i < 9 else "non-severe") for i, s in enumerate(scores)}
    table = _write_table(tmp_path / "severity.csv", "group", groups | {"GHOST": "severe"})
    out = tmp_path / "wil"
    assert (
        _main("analyze", "wilcoxon", "--results", tmp_path / "run", "--groups", table, "--output", out) == 0
    )
    _assert_png(out / "wilcoxon.png")
    report = json.loads((out / "wilcoxon.json").read_text())
    severe = np.round([scores[s][0] for s in scores if groups[s] == "severe"], 3)
    other = np.round([scores[s][0] for s in scores if groups[s] == "non-severe"], 3)
    pair = report["scores"]["corona_score_cm3"]["pairwise"][0]
    assert (pair["group_a"], pair["group_b"]) == ("severe", "non-severe")  # order of first appearance
    assert pair["p_value"] == pytest.approx(sps.mannwhitneyu(severe, other).pvalue, rel=1e-10)
    summary = report["scores"]["corona_score_cm3"]["summaries"]["severe"]
    assert summary["median"] == pytest.approx(np.median(severe))
    assert report["excluded"]["in_groups_not_in_results"] == ["GHOST"]
    markdown = (out / "wilcoxon.md").read_text()
    assert "GHOST" in markdown and "rank-biserial" in markdown


def test_wilcoxon_three_groups_runs_kruskal_and_drops_single_study_group(tmp_path: Path) -> None:
    scores, _ = _cohort(n=21, seed=4)
    write_run_output(tmp_path / "run", scores, with_features=False)
    names = ["mild", "moderate", "severe"]
    groups = {s: names[i % 3] for i, s in enumerate(scores)} | {"S020": "critical"}
    table = _write_table(tmp_path / "groups.csv", "group", groups)
    out = tmp_path / "kw"
    assert (
        _main("analyze", "wilcoxon", "--results", tmp_path / "run", "--groups", table, "--output", out) == 0
    )
    report = json.loads((out / "wilcoxon.json").read_text())
    values = {g: np.round([scores[s][0] for s in scores if groups[s] == g], 3) for g in names}
    kruskal = report["scores"]["corona_score_cm3"]["kruskal_wallis"]
    assert kruskal["p_value"] == pytest.approx(sps.kruskal(*values.values()).pvalue, rel=1e-10)
    assert len(report["scores"]["corona_score_cm3"]["pairwise"]) == 3
    assert report["groups_left_out"] == {"critical": ["S020"]}
    assert "critical" in (out / "wilcoxon.md").read_text()


@pytest.mark.slow
def test_cluster_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scores, _ = _cohort(n=10, seed=5)
    studies = list(scores)
    write_run_output(tmp_path / "a", {s: scores[s] for s in studies[:5]}, seed=1)
    write_run_output(tmp_path / "b", {s: scores[s] for s in studies[5:]} | {"BAD": None}, seed=2)
    out = tmp_path / "clusters"
    args: list[str | Path] = [
        "cluster",
        "--results",
        tmp_path / "a",
        tmp_path / "b",
        "--output",
        out,
        "--restarts",
        "2",
    ]
    assert _main(*args, "--seed", "1", "--device", "cpu") == 0, capsys.readouterr().err
    for name in ("elbow.png", "pca.png", "key_slices.png"):
        _assert_png(out / name)
    with (out / "clusters.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 60
    assert list(rows[0]) == [
        "study_id", "slice_index", "z_mm", "probability", "cluster", "distance_to_centre", "pc1", "pc2",
    ]  # fmt: skip
    report = json.loads((out / "cluster.json").read_text())
    assert report["k"] == report["knee"] == 3  # three manifestations were written
    assert report["degenerate"] is False and report["key_slices_with_empty_cam"] == 0
    assert {int(r["cluster"]) for r in rows} == {1, 2, 3}
    for cluster in report["clusters"]:
        # Each fake manifestation has its own slice probability, so clusters are pure.
        assert cluster["fraction_positive_slices"] in (0.0, 1.0)
        assert len(cluster["key_slices"]) == 4
        members = [r for r in rows if int(r["cluster"]) == cluster["cluster"]]
        nearest = sorted(float(r["distance_to_centre"]) for r in members)[:4]
        assert [k["distance_to_centre"] for k in cluster["key_slices"]] == pytest.approx(nearest, abs=1e-5)
    assert report["skipped_studies"] == [{"study_id": "BAD", "reason": "failed in `corona-ct run`"}]
    assert "BAD" in (out / "cluster.md").read_text()

    positive = tmp_path / "positive"
    assert _main(*args[:-2], "--output", positive, "--positive-only", "--k", "2", "--restarts", "1") == 0
    with (positive / "clusters.csv").open() as handle:
        kept = list(csv.DictReader(handle))
    assert 0 < len(kept) < 60 and all(float(r["probability"]) >= 0.5 for r in kept)
    assert json.loads((positive / "cluster.json").read_text())["k"] == 2


NOT_ASSESSABLE = {
    "ABDOMEN": "no lungs in view: the largest lung cross-section is 6.7 cm²",
    "HEAD": "no lungs found",
}


def test_not_assessable_studies_are_left_out_unless_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scores, labels = _cohort(seed=6)
    write_run_output(tmp_path / "run", scores, with_features=False, not_assessable=NOT_ASSESSABLE)
    label_file = _write_table(tmp_path / "labels.csv", "label", labels | {"ABDOMEN": 1, "HEAD": 0})
    base = ["analyze", "roc", "--results", tmp_path / "run", "--labels", label_file]

    assert _main(*base, "--output", tmp_path / "roc") == 0
    out = capsys.readouterr().out
    assert "left out 2 studies not assessable" in out
    report = json.loads((tmp_path / "roc" / "roc.json").read_text())
    assert report["n_studies"] == 24 and report["include_not_assessable"] is False
    assert report["excluded"]["not_assessable"] == [
        {"study_id": s, "reason": r} for s, r in NOT_ASSESSABLE.items()
    ]
    assert report["excluded"]["missing_score"] == []
    markdown = (tmp_path / "roc" / "roc.md").read_text()
    assert "not assessable in `corona-ct run`" in markdown and "2 (`ABDOMEN`, `HEAD`)" in markdown
    assert f"`ABDOMEN`: {NOT_ASSESSABLE['ABDOMEN']}" in markdown

    # kept on request: they have no classifier score, so they are listed as lacking it, never scored 0
    assert _main(*base, "--output", tmp_path / "kept", "--include-not-assessable") == 0
    assert "kept 2 studies not assessable" in capsys.readouterr().out
    kept = json.loads((tmp_path / "kept" / "roc.json").read_text())
    assert kept["n_studies"] == 24 and kept["excluded"]["not_assessable"] == []
    assert [m["study_id"] for m in kept["excluded"]["missing_score"]] == ["ABDOMEN", "HEAD"]
    # ... and they count where they have a value
    groups = _write_table(
        tmp_path / "groups.csv",
        "group",
        {s: ("a" if i % 2 else "b") for i, s in enumerate([*NOT_ASSESSABLE, *scores])},
    )
    wilcoxon = [
        "analyze",
        "wilcoxon",
        "--results",
        tmp_path / "run",
        "--groups",
        groups,
        "--score",
        "lung_volume_cm3",
    ]
    # every ok study has 4200 cm³: a constant score is degenerate (outputs written, exit 3)
    assert _main(*wilcoxon, "--output", tmp_path / "w1") == 3
    assert _main(*wilcoxon, "--output", tmp_path / "w2", "--include-not-assessable") == 0
    n = [len(json.loads((tmp_path / w / "wilcoxon.json").read_text())["studies"]) for w in ("w1", "w2")]
    assert n == [24, 26]


@pytest.mark.slow
def test_cluster_leaves_out_not_assessable_studies_with_their_reason(tmp_path: Path) -> None:
    scores, _ = _cohort(n=6, seed=7)
    write_run_output(tmp_path / "run", scores, not_assessable=NOT_ASSESSABLE)
    args = ["cluster", "--results", tmp_path / "run", "--k", "2", "--restarts", "1", "--device", "cpu"]
    assert _main(*args, "--output", tmp_path / "c") == 0
    skipped = json.loads((tmp_path / "c" / "cluster.json").read_text())["skipped_studies"]
    assert skipped == [
        {"study_id": s, "reason": f"not assessable in `corona-ct run`: {r}"}
        for s, r in NOT_ASSESSABLE.items()
    ]
    assert _main(*args, "--output", tmp_path / "c2", "--include-not-assessable") == 0
    skipped = json.loads((tmp_path / "c2" / "cluster.json").read_text())["skipped_studies"]
    assert {s["study_id"]: s["reason"] for s in skipped} == dict.fromkeys(
        NOT_ASSESSABLE, "not assessable: nothing was classified"
    )


def test_duplicate_study_ids_across_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scores, labels = _cohort(n=8, seed=6)
    write_run_output(tmp_path / "site1", scores, with_features=False)
    write_run_output(tmp_path / "site2", scores, with_features=False)
    label_file = _write_table(tmp_path / "labels.csv", "label", labels)
    base: list[str | Path] = [
        "analyze",
        "roc",
        "--results",
        tmp_path / "site1",
        tmp_path / "site2",
        "--output",
        tmp_path / "o",
    ]
    assert _main(*base, "--labels", label_file) == 2
    assert "appears in both" in capsys.readouterr().err
    prefixed = {f"{site}/{s}": y for site in ("site1", "site2") for s, y in labels.items()}
    prefixed_file = _write_table(tmp_path / "prefixed.csv", "label", prefixed)
    assert _main(*base, "--labels", prefixed_file, "--prefix-ids") == 0
    assert json.loads((tmp_path / "o" / "roc.json").read_text())["n_studies"] == 16


def _error_case(tmp_path: Path, case: str) -> list[str | Path]:
    scores, labels = _cohort(n=8, seed=7)
    run = tmp_path / "run"
    write_run_output(run, scores, feature_dim=8, slices=2)
    out = tmp_path / "out"
    roc: list[str | Path] = ["analyze", "roc", "--results", run, "--output", out, "--labels"]
    if case == "missing summary":
        return [
            "analyze",
            "roc",
            "--results",
            tmp_path / "nowhere",
            "--output",
            out,
            "--labels",
            run / "x.csv",
        ]
    if case == "missing labels":
        return [*roc, tmp_path / "labels.csv"]
    if case == "empty cohort":
        return [*roc, _write_table(tmp_path / "labels.csv", "label", {"OTHER1": 0, "OTHER2": 1})]
    if case == "single class":
        return [*roc, _write_table(tmp_path / "labels.csv", "label", dict.fromkeys(labels, "covid"))]
    if case == "unmappable label":
        return [*roc, _write_table(tmp_path / "labels.csv", "label", dict.fromkeys(labels, "maybe"))]
    if case == "unknown score":
        return [*roc, _write_table(tmp_path / "labels.csv", "label", labels), "--score", "corona"]
    if case == "group with one study":
        groups = {s: ("severe" if i == 0 else "mild") for i, s in enumerate(scores)}
        table = _write_table(tmp_path / "g.csv", "group", groups)
        return ["analyze", "wilcoxon", "--results", run, "--groups", table, "--output", out]
    if case == "empty summary":
        write_run_output(tmp_path / "empty", {})
        return ["cluster", "--results", tmp_path / "empty", "--output", out]
    if case == "bad k":
        return ["cluster", "--results", run, "--output", out, "--k", "many"]
    raise AssertionError(case)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing summary", "nowhere/summary.csv: not found"),
        ("missing labels", "labels.csv: labels file not found"),
        ("empty cohort", "empty cohort: no study is both in"),
        ("single class", "ROC needs both classes; labels.csv has only positive"),
        ("unmappable label", "cannot map label(s) maybe"),
        ("unknown score", "unknown --score column corona; the summaries have: n_slices"),
        ("group with one study", "group 'severe' has 1 matched study (S000)"),
        ("empty summary", "empty cohort"),
        ("bad k", "--k must be 'auto' or a whole number"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, expected: str
) -> None:
    argv = _error_case(tmp_path, case)
    capsys.readouterr()
    assert _main(*argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("corona-ct: error: "), captured.err
    assert expected in lines[0]
    assert "Traceback" not in captured.err and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- degenerate results


def test_roc_from_one_positive_and_one_negative_is_degenerate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_run_output(tmp_path / "run", {"S1": (40.0, 0.9), "S2": (2.0, 0.1)}, with_features=False)
    labels = _write_table(tmp_path / "labels.csv", "label", {"S1": 1, "S2": 0})
    base: list[str | Path] = ["analyze", "roc", "--results", tmp_path / "run", "--labels", labels]
    base += ["--score", "corona_score_cm3", "--score", "case_probability"]
    capsys.readouterr()
    assert _main(*base, "--output", tmp_path / "roc") == 3
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    assert (
        "DEGENERATE: corona_score_cm3, case_probability: fewer than 2 cases in a class (1 positive, 1 negative)"
        in printed
    )
    assert "AUC 1.000 from 1 positive and 1 negative studies, degenerate" in printed
    assert "1.000–1.000" not in printed and "95% CI" not in printed and "exit code 3" in captured.err
    report = json.loads((tmp_path / "roc" / "roc.json").read_text())
    assert report["degenerate"] is True and report["allow_degenerate"] is False
    for result in report["scores"].values():
        assert result["auc"] == 1.0 and result["ci_low"] is None and result["ci_high"] is None
        assert result["auc_se"] is None and result["degenerate"] is True
    assert report["delong_tests"] == []  # no paired test on one case per class
    markdown = (tmp_path / "roc" / "roc.md").read_text()
    assert markdown.count("DEGENERATE RESULT") == 1 and "1.000–1.000" not in markdown
    assert "| corona_score_cm3 | 1.000 (degenerate: no CI) |" in markdown

    assert _main(*base, "--output", tmp_path / "allowed", "--allow-degenerate") == 0
    allowed = json.loads((tmp_path / "allowed" / "roc.json").read_text())
    assert allowed["degenerate"] is True and allowed["allow_degenerate"] is True
    assert "1.000–1.000" not in capsys.readouterr().out


def test_roc_of_a_constant_score_is_degenerate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scores, labels = _cohort(seed=8)
    flat = {s: (0.0, probability) for s, (_, probability) in scores.items()}
    write_run_output(tmp_path / "run", flat, with_features=False)
    table = _write_table(tmp_path / "labels.csv", "label", labels)
    args = ["analyze", "roc", "--results", tmp_path / "run", "--labels", table, "--output", tmp_path / "o"]
    assert _main(*args, "--score", "corona_score_cm3", "--score", "case_probability") == 3
    report = json.loads((tmp_path / "o" / "roc.json").read_text())
    assert report["degenerate_reasons"] == [
        "corona_score_cm3: the score is constant (0 for all 24 studies): AUC 0.5 by ties"
    ]
    assert report["scores"]["corona_score_cm3"]["ci_low"] is None
    assert report["scores"]["case_probability"]["degenerate"] is False
    assert report["scores"]["case_probability"]["ci_low"] is not None
    assert "DEGENERATE: corona_score_cm3: the score is constant" in capsys.readouterr().out


def test_roc_with_most_labels_unmatched_is_degenerate(tmp_path: Path) -> None:
    scores, labels = _cohort(seed=9)
    write_run_output(tmp_path / "run", scores, with_features=False)
    elsewhere = {f"OTHER{i}": i % 2 for i in range(30)}
    table = _write_table(tmp_path / "labels.csv", "label", labels | elsewhere)
    args = ["analyze", "roc", "--results", tmp_path / "run", "--labels", table, "--output", tmp_path / "o"]
    assert _main(*args) == 3
    report = json.loads((tmp_path / "o" / "roc.json").read_text())
    assert report["degenerate_reasons"] == [
        "most studies in labels.csv are unmatched: only 24 of 54 have results with a value for every score "
        "(see the studies left out)"
    ]
    assert report["scores"]["corona_score_cm3"]["ci_low"] is not None  # the ROC itself is sound
    # half of them matched is not "most unmatched"
    half = _write_table(tmp_path / "half.csv", "label", labels | dict(list(elsewhere.items())[:24]))
    assert _main(*args[:-4], "--labels", half, "--output", tmp_path / "h") == 0


def _rewrite_features(folder: Path, study_id: str, **arrays: np.ndarray) -> None:
    path = folder / study_id / "features.npz"
    with np.load(path) as npz:
        content = {k: npz[k] for k in npz.files}
    np.savez(path, **(content | arrays))


def _cluster_args(out: Path, *results: Path) -> list[str | Path]:
    return [
        "cluster",
        "--results",
        *results,
        "--output",
        out,
        "--k",
        "2",
        "--restarts",
        "2",
        "--device",
        "cpu",
    ]


@pytest.mark.slow
def test_clusters_that_coincide_with_studies_are_degenerate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    write_run_output(run, {"A": (10.0, 0.9), "B": (0.0, 0.1)}, feature_dim=16, slices=8)
    rng = np.random.default_rng(3)
    for shift, study in ((0.0, "A"), (9.0, "B")):  # each scan its own features, whatever it shows
        _rewrite_features(run, study, features=(shift + rng.normal(size=(8, 16))).astype(np.float32))
    assert _main(*_cluster_args(tmp_path / "c", run)) == 3
    report = json.loads((tmp_path / "c" / "cluster.json").read_text())
    assert report["degenerate"] is True
    (reason,) = report["degenerate_reasons"]
    assert reason.startswith("the clusters coincide with studies (C1: ") and "100%" in reason
    assert reason.endswith("they separate scans, not manifestations")
    assert {c["dominant_study"]["study_id"] for c in report["clusters"]} == {"A", "B"}
    assert all(c["dominant_study"]["share"] == 1.0 for c in report["clusters"])
    assert "DEGENERATE RESULT" in (tmp_path / "c" / "cluster.md").read_text()
    assert "DEGENERATE: the clusters coincide with studies" in capsys.readouterr().out
    assert _main(*_cluster_args(tmp_path / "ok", run), "--allow-degenerate") == 0


@pytest.mark.slow
def test_clusters_that_coincide_with_sources_are_degenerate(tmp_path: Path) -> None:
    site_a, site_b = tmp_path / "site_a", tmp_path / "site_b"
    rng = np.random.default_rng(4)
    for site, shift in ((site_a, 0.0), (site_b, 9.0)):  # a scanner effect: every study of a site alike
        studies = {f"{site.name}-{i}": (float(i), 0.5) for i in range(3)}
        write_run_output(site, studies, feature_dim=16, slices=6)
        for study in studies:
            _rewrite_features(site, study, features=(shift + rng.normal(size=(6, 16))).astype(np.float32))
    assert _main(*_cluster_args(tmp_path / "c", site_a, site_b)) == 3
    report = json.loads((tmp_path / "c" / "cluster.json").read_text())
    (reason,) = report["degenerate_reasons"]  # not the studies: each cluster holds three of them
    assert reason.startswith("the clusters coincide with result folders (sources) (C1: site_")
    assert reason.endswith("they separate data sources, not manifestations")
    assert all(c["dominant_source"]["share"] == 1.0 for c in report["clusters"])
    assert all(c["dominant_study"]["share"] == pytest.approx(1 / 3) for c in report["clusters"])


@pytest.mark.slow
def test_clusters_of_a_single_study_are_degenerate(tmp_path: Path) -> None:
    write_run_output(tmp_path / "run", {"ONLY": (10.0, 0.9)}, feature_dim=16, slices=12)
    assert _main(*_cluster_args(tmp_path / "c", tmp_path / "run")) == 3
    reasons = json.loads((tmp_path / "c" / "cluster.json").read_text())["degenerate_reasons"]
    assert reasons[0] == (
        "all 12 slices come from one study (ONLY): the clusters cannot tell manifestations from the scan"
    )


@pytest.fixture
def saved_figures(monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[str, int, list[str]]]:
    """file name -> (figure title, number of axes, axes titles) of every figure the command saves."""
    from corona_ct.pipeline.analysis import figures

    saved: dict[str, tuple[str, int, list[str]]] = {}
    real = figures.save_figure

    def record(figure, path: Path) -> None:  # type: ignore[no-untyped-def]
        title = figure._suptitle.get_text() if figure._suptitle is not None else ""
        saved[path.name] = (title, len(figure.axes), [a.get_title() for a in figure.axes])
        real(figure, path)

    monkeypatch.setattr(figures, "save_figure", record)
    return saved


@pytest.mark.slow
def test_key_slices_claim_an_overlay_only_with_a_colour_bar_and_a_map(tmp_path: Path, saved_figures) -> None:
    scores, _ = _cohort(n=6, seed=10)
    write_run_output(tmp_path / "run", scores)
    assert _main(*_cluster_args(tmp_path / "c", tmp_path / "run")) == 0
    title, n_axes, _ = saved_figures["key_slices.png"]
    assert title.startswith("Key slices nearest each cluster centre (Grad-CAM overlaid")
    assert n_axes == 2 * 4 + 1  # k = 2 rows of 4 key slices, and the colour bar

    for study in scores:  # every Grad-CAM map empty (all zero)
        _rewrite_features(tmp_path / "run", study, cams=np.zeros((6, 112, 112), np.uint8))
    assert _main(*_cluster_args(tmp_path / "e", tmp_path / "run")) == 0
    title, n_axes, axes_titles = saved_figures["key_slices.png"]
    assert "overlaid" not in title and "every Grad-CAM map is empty" in title
    assert n_axes == 2 * 4  # no colour bar
    assert all(t.endswith("Grad-CAM map empty") for t in axes_titles)
    assert json.loads((tmp_path / "e" / "cluster.json").read_text())["key_slices_with_empty_cam"] == 8
