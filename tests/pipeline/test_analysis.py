"""``pipeline.analysis`` used as a library, without the command line (fake ``run`` outputs)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from corona_ct.pipeline.analysis import DEFAULT_SCORE
from corona_ct.pipeline.analysis.cluster_report import ClusterSettings, cluster_report, write_cluster_outputs
from corona_ct.pipeline.analysis.cohort import load_cohort, match_studies, require_matches, select_scores
from corona_ct.pipeline.analysis.degenerate import MIN_MATCHED_SHARE, by_reason, unmatched_problem
from corona_ct.pipeline.analysis.documents import fmt_p
from corona_ct.pipeline.analysis.group_report import group_order, group_report, write_group_outputs
from corona_ct.pipeline.analysis.roc_report import roc_console_lines, roc_report, write_roc_outputs
from corona_ct.pipeline.analysis.slices import load_slices
from corona_ct.pipeline.analysis.tables import map_labels, read_csv, read_mapping
from corona_ct.pipeline.atomic import write_json
from corona_ct.pipeline.errors import ConfigError, InputError
from corona_ct.pipeline.stats import roc_analysis
from tests.commands.test_analyze import _cohort, write_run_output


@pytest.fixture
def run_output(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """A run output of 12 studies (6 positive), one failed and one not assessable, with labels."""
    scores, labels = _cohort(n=12, seed=7)
    run = tmp_path / "run"
    write_run_output(run, scores | {"FAILED": None}, not_assessable={"NA": "no plausible lungs"}, slices=4)
    return run, labels


# ----------------------------------------------------------------------------- tables


def test_labels_map_from_names_numbers_or_a_named_positive_value(tmp_path: Path) -> None:
    source = tmp_path / "labels.csv"
    raw = {"a": "COVID-19", "b": "Normal", "c": "1.0", "d": "non_covid", "e": "healthy control"}
    with pytest.raises(InputError, match="healthy control"):
        map_labels(raw, positive=None, source=source)
    del raw["e"]
    assert map_labels(raw, positive=None, source=source) == {"a": 1, "b": 0, "c": 1, "d": 0}
    assert map_labels({"a": "cap", "b": "covid"}, positive="COVID", source=source) == {"a": 0, "b": 1}
    with pytest.raises(InputError, match="no label equals --positive"):
        map_labels({"a": "cap"}, positive="covid", source=source)


def test_a_table_that_gives_one_study_two_values_is_refused(tmp_path: Path) -> None:
    table = tmp_path / "groups.csv"
    table.write_text("study_id,group\nA,mild\nA,mild\nB,severe\n")
    assert read_mapping(table, "group", "groups file") == {"A": "mild", "B": "severe"}
    table.write_text("study_id,group\nA,mild\nA,severe\n")
    with pytest.raises(InputError, match="two different groups"):
        read_mapping(table, "group", "groups file")
    with pytest.raises(InputError, match="lacks column"):
        read_csv(table, ("label",), "labels file")


# ----------------------------------------------------------------------------- cohort


def test_cohort_lists_failed_and_not_assessable_studies_and_matches_a_table(run_output) -> None:
    run, labels = run_output
    cohort = load_cohort([run / "summary.csv"])  # the summary itself names its folder
    assert cohort.sources == [str(run)] and not cohort.include_not_assessable
    assert set(cohort.failed) == {"FAILED"} and set(cohort.not_assessable) == {"NA"}
    assert len(cohort.studies) == 12 and math.isnan(cohort.studies["S000"]["ggo_percent"])

    assert select_scores(cohort, None) == [DEFAULT_SCORE]
    assert select_scores(cohort, ["case_probability", "case_probability"]) == ["case_probability"]
    with pytest.raises(ConfigError, match="unknown --score column nope"):
        select_scores(cohort, ["nope"])

    table = dict(list(labels.items())[:10]) | {"FAILED": 1, "GHOST": 0}
    matched = match_studies(cohort, table, [DEFAULT_SCORE])
    assert matched.study_ids == list(labels)[:10]
    assert matched.values[DEFAULT_SCORE].shape == (10,)
    assert matched.missing_from_results == ["GHOST"]
    assert matched.not_in_table == list(labels)[10:]
    assert set(matched.failed_in_run) == {"FAILED"} and set(matched.not_assessable) == {"NA"}

    kept = load_cohort([run], include_not_assessable=True, prefix_ids=True)
    assert kept.include_not_assessable and kept.included_not_assessable == ["run/NA"]
    none = match_studies(kept, {"run/NA": 1}, [DEFAULT_SCORE])  # kept, but without a score
    assert none.missing_score == {"run/NA": [DEFAULT_SCORE]}
    with pytest.raises(InputError, match="empty cohort: no study is both in"):
        require_matches(none, Path("labels.csv"), 1, "labelled", kept)


# ----------------------------------------------------------------------------- degenerate and text


def test_most_unmatched_and_problems_by_reason() -> None:
    assert unmatched_problem(5, 10, "t.csv") is None  # exactly half usable is enough
    assert MIN_MATCHED_SHARE == 0.5
    assert "only 4 of 10" in (unmatched_problem(4, 10, "t.csv") or "")
    lines = by_reason({"a": ["constant"], "b": ["constant", "few"]})
    assert lines == ["a, b: constant", "b: few"]


def test_json_has_no_nan_and_p_values_read_as_text(tmp_path: Path) -> None:
    write_json(tmp_path / "x.json", {"a": np.float32(1.5), "b": math.nan, "c": np.array([1, np.inf])})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1.5, "b": None, "c": [1.0, None]}
    assert (fmt_p(0.0004), fmt_p(0.04567)) == ("< 0.001", "0.046")


# ----------------------------------------------------------------------------- analyses


def test_roc_report_is_stats_roc_analysis_of_the_matched_studies(run_output, tmp_path: Path) -> None:
    run, labels = run_output
    cohort = load_cohort([run])
    scores = [DEFAULT_SCORE, "case_probability"]
    matched = match_studies(cohort, labels, scores)
    report = roc_report(cohort, matched, labels, tmp_path / "labels.csv", n_bootstrap=100, seed=2)
    y = np.array([labels[s] for s in matched.study_ids])
    expected = roc_analysis(y, matched.values[DEFAULT_SCORE], ci="bootstrap", n_bootstrap=100, seed=2)
    assert report.results[DEFAULT_SCORE].auc == expected.auc
    assert (report.results[DEFAULT_SCORE].ci_low, report.results[DEFAULT_SCORE].ci_high) == (
        expected.ci_low,
        expected.ci_high,
    )
    assert len(report.comparisons) == 1 and report.reasons == []
    assert report.payload["n_bootstrap"] == 100 and report.payload["ci_method"] == "bootstrap"
    lines = roc_console_lines(report)
    assert lines[0].startswith(f"{DEFAULT_SCORE}: AUC ") and lines[-1].startswith("DeLong ")
    assert write_roc_outputs(report, tmp_path / "out") == ("roc.png", "roc.json", "roc.md")
    assert json.loads((tmp_path / "out" / "roc.json").read_text())["n_studies"] == 12

    one_class = dict.fromkeys(labels, 1)
    with pytest.raises(InputError, match="ROC needs both classes"):
        roc_report(cohort, match_studies(cohort, one_class, scores), one_class, tmp_path / "l.csv")


def test_group_report_orders_groups_and_leaves_out_single_studies(run_output, tmp_path: Path) -> None:
    run, labels = run_output
    cohort = load_cohort([run])
    groups = {s: ("severe" if y else "mild") for s, y in labels.items()}
    groups["S000"] = "critical"  # a single study
    source = tmp_path / "groups.csv"
    order = group_order("severe", groups, source)
    assert order == ["severe", "critical", "mild"]  # then first appearance (S000 comes first)
    with pytest.raises(ConfigError, match="--group-order names moderate"):
        group_order("moderate", groups, source)
    report = group_report(cohort, match_studies(cohort, groups, [DEFAULT_SCORE]), groups, source, order=order)
    assert report.kept == ["severe", "mild"] and report.dropped == {"critical": ["S000"]}
    pair = report.comparisons[DEFAULT_SCORE].pairwise[0]
    assert (pair["group_a"], pair["group_b"]) == ("severe", "mild")
    assert report.payload["analysis"] == "wilcoxon" and report.reasons == []
    write_group_outputs(report, tmp_path / "out")
    assert "critical" in (tmp_path / "out" / "wilcoxon.md").read_text()


def test_cluster_report_with_a_fixed_k_on_the_cpu(run_output, tmp_path: Path) -> None:
    run, _ = run_output
    cohort = load_cohort([run])
    table = load_slices(cohort, positive_only=False, threshold=0.5)
    assert len(table.study_id) == 12 * 4 and set(table.skipped) == {"FAILED", "NA"}
    settings = ClusterSettings(k=3, k_max=4, restarts=2, key_slices=2)
    report = cluster_report(cohort, table, settings, torch.device("cpu"))
    assert not hasattr(table, "weighted")  # freed once on the device
    assert report.labels.shape == (48,) and set(report.labels.tolist()) == {0, 1, 2}
    assert [len(idx) for idx in report.nearest] == [2, 2, 2]
    assert set(report.key_images) == {int(i) for idx in report.nearest for i in idx}
    payload = report.payload
    assert payload["k"] == 3 and payload["k_choice"] == "--k" and payload["elbow"]["k"] == [1, 2, 3, 4]
    assert sum(c["n_slices"] for c in payload["clusters"]) == 48
    assert payload["key_slices_with_empty_cam"] == 0  # the fake maps are random, not empty
    written = write_cluster_outputs(report, table, tmp_path / "out")
    assert all((tmp_path / "out" / name).is_file() for name in written)
