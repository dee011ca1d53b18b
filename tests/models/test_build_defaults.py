"""What build_defaults writes into a card: the patients a run was trained on, and new validation figures."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from corona_ct.models.build_defaults import TRAINING_WORDS, _weakness, main, training_words
from corona_ct.models.checkpoint import read_card
from tests.conftest import SHIPPED_WEIGHTS_DIR


def test_card_words_name_the_patients_left_out_and_count_the_rest() -> None:
    use, words = training_words([])
    assert "trained on 3 patients of one scanner" in use and words == TRAINING_WORDS
    use, words = training_words(["P002"])
    assert "trained on 2 patients of one scanner" in use
    assert words["positive"].endswith("left out of training (validation): P002 (COVID-19)")
    assert words["negative"].endswith("left out of training (validation): P002 (COVID-19)")
    assert words["split"] == TRAINING_WORDS["split"]
    use, words = training_words(["normal001", "TCGA-17-Z011"])
    assert "trained on 2 patients" in use and "normal001 (normal), TCGA-17-Z011" in words["negative"]
    use, _ = training_words(["P002", "cap002"])
    assert "trained on 1 patient of one scanner" in use


def test_figures_only_install_replaces_the_validated_sections_and_keeps_the_rest(tmp_path: Path) -> None:
    shutil.copyfile(SHIPPED_WEIGHTS_DIR / "classifier.json", tmp_path / "classifier.json")
    before = read_card(tmp_path / "classifier.json")
    lopo = {"patients": {"P002": {"slice_auc": {"auc": 0.777, "n": 109}, "slices": [1, 2]},
                         "normal001": {"clean_called_positive": 0.016}}}  # fmt: skip
    figures = tmp_path / "validation.json"
    figures.write_text(json.dumps({"lopo": lopo}))
    pydicom_level = logging.getLogger("pydicom").level
    main(["install", "--figures-only", "--weights-dir", str(tmp_path), "--validation", str(figures)])
    after = read_card(tmp_path / "classifier.json")
    assert after["validation"]["lopo"]["patients"]["P002"] == {"slice_auc": {"auc": 0.777, "n": 109}}
    assert after["validation"]["phantom_cohort"] == before["validation"]["phantom_cohort"]
    assert after["sha256"] == before["sha256"]  # the weights are not touched
    use = after["intended_use"]
    assert use.count("under-trained") == 1 and "AUC 0.78" in use
    assert "2 % (10 % when trained again) of a held-out normal" in use  # the shipped card's second run stays
    assert use.startswith(training_words([])[0])
    assert logging.getLogger("pydicom").level == pydicom_level  # a caller's logging is left alone


def test_a_second_training_run_is_stored_beside_the_first_and_named_in_the_intended_use(
    tmp_path: Path,
) -> None:
    shutil.copyfile(SHIPPED_WEIGHTS_DIR / "classifier.json", tmp_path / "classifier.json")
    rerun = tmp_path / "rerun.json"
    lopo = {"patients": {"P002": {"slice_auc": {"auc": 0.591}, "slices": [1]}}, "by_lung_fraction": {}}
    rerun.write_text(json.dumps({"lopo": lopo}))  # per-slice rows and the lung-area split stay out
    main(["install", "--figures-only", "--weights-dir", str(tmp_path), "--rerun", str(rerun)])
    after = read_card(tmp_path / "classifier.json")
    assert after["validation"]["lopo_rerun"] == {"patients": {"P002": {"slice_auc": {"auc": 0.591}}}}
    assert "(AUC 0.59 when trained again)" in after["intended_use"]
    rerun.write_text(json.dumps({"clean_ct_final": {}}))
    with pytest.raises(SystemExit, match=r"rerun\.json holds no 'lopo' section"):
        main(["install", "--figures-only", "--weights-dir", str(tmp_path), "--rerun", str(rerun)])


def test_install_without_a_run_says_what_it_needs(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--run RUN"):
        main(["install", "--weights-dir", str(tmp_path)])


def test_unreadable_figures_are_named_and_the_card_is_left_as_it_was(tmp_path: Path) -> None:
    shutil.copyfile(SHIPPED_WEIGHTS_DIR / "classifier.json", tmp_path / "classifier.json")
    before = (tmp_path / "classifier.json").read_bytes()
    missing = tmp_path / "no-such-validation.json"
    with pytest.raises(SystemExit, match=r"no-such-validation\.json.*tools\.validate_source_matched"):
        main(["install", "--figures-only", "--weights-dir", str(tmp_path), "--validation", str(missing)])
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(SystemExit, match=r"list\.json holds no JSON object"):
        main(
            [
                "install",
                "--figures-only",
                "--weights-dir",
                str(tmp_path),
                "--cohort",
                str(tmp_path / "list.json"),
            ]
        )
    assert (tmp_path / "classifier.json").read_bytes() == before


@pytest.mark.slow
def test_train_takes_the_backbone_and_the_pipeline_explains_with_it(tmp_path: Path) -> None:
    """``train --backbone resnet18``: the card names it and its Grad-CAM layers give two map scales."""
    import numpy as np
    import torch

    from corona_ct.data.source_matched import PreparedSlices
    from corona_ct.models.build_defaults import VAL_GROUPS
    from corona_ct.models.checkpoint import load_classifier
    from corona_ct.pipeline.explain import explain_batch

    generator = torch.Generator().manual_seed(0)
    n = 16
    labels = np.tile([0, 1], n // 2).astype(np.int64)
    images = torch.rand(n, 32, 32, generator=generator).to(torch.float16)
    masks = np.zeros((n, 32, 32), dtype=np.uint8)
    groups = [VAL_GROUPS[0]] * 4 + ["train-patient"] * (n - 4)
    prepared = tmp_path / "prepared.safetensors"
    PreparedSlices(images, labels, masks, groups, ["clean", "counterfactual"] * (n // 2)).save(prepared)
    run = tmp_path / "run"
    main(
        [
            "train",
            "--prepared",
            str(prepared),
            "--output",
            str(run),
            "--epochs",
            "1",
            "--backbone",
            "resnet18",
        ]
    )

    assert read_card(run / "model.safetensors")["backbone"] == "resnet18"
    loaded = load_classifier(run / "model.safetensors")
    assert loaded.spec is not None and loaded.spec.feature_dim == 512
    result = explain_batch(loaded.module, loaded.spec, images[:2].float()[:, None].expand(-1, 3, -1, -1))
    assert result.features is not None and result.features.shape == (2, 512)
    # layer2 and layer3 at 32 px: 1/8 and 1/16 of the input (28 and 14 at 224)
    assert {name: m.shape[-2:] for name, m in result.layer_maps.items()} == {
        "layer2": (4, 4),
        "layer3": (2, 2),
    }


def test_the_weakness_line_names_the_held_out_figures_and_the_false_calls() -> None:
    figures = {
        "lopo": {
            "patients": {"P002": {"slice_auc": {"auc": 0.695}}, "normal001": {"clean_called_positive": 0.0}},
            "pooled_slice_auc": {"auc": 0.755},
        },
        "phantom_cohort": {
            "corona_score_cm3": {"pearson_r": 0.777},
            "case_called_positive": {"threshold": 0.5, "with_lesions": 1.0, "without_lesions": 1.0},
        },
    }
    line = _weakness(figures)
    assert "AUC 0.69" in line and "0 % of a held-out normal patient's slices" in line
    assert "pooled over the held-out patients: AUC 0.76" in line and "r 0.78" in line
    assert "100 % of lesion-free phantoms called positive" in line
    figures["phantom_cohort"]["case_called_positive"]["without_lesions"] = 0.0  # type: ignore[index]
    assert "lesion-free" not in _weakness(figures)
    # the same recipe trained again: each held-out figure with the second run's beside it
    figures["lopo_rerun"] = {
        "patients": {"P002": {"slice_auc": {"auc": 0.591}}, "normal001": {"clean_called_positive": 0.096}},
        "pooled_slice_auc": {"auc": 0.6},
    }
    line = _weakness(figures)
    assert "AUC 0.69 (AUC 0.59 when trained again)" in line
    assert "0 % (10 % when trained again) of a held-out normal patient's slices" in line
    assert "pooled over the held-out patients: AUC 0.76 (AUC 0.60 when trained again)" in line


def test_a_missing_prepared_set_or_a_bad_setting_is_named_not_a_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "prepared.safetensors"
    with pytest.raises(
        SystemExit, match=r"build_defaults train: .*prepared\.safetensors: no prepared training set"
    ):
        main(["train", "--prepared", str(missing), "--output", str(tmp_path / "run")])
    import numpy as np
    import torch

    from corona_ct.data.source_matched import PreparedSlices

    prepared = tmp_path / "small.safetensors"
    masks = np.zeros((4, 32, 32), dtype=np.uint8)
    PreparedSlices(
        torch.zeros(4, 32, 32, dtype=torch.float16), np.array([0, 1, 0, 1]), masks, ["a"] * 4, ["clean"] * 4
    ).save(prepared)
    with pytest.raises(
        SystemExit, match=r"build_defaults train: training config: ema_decay must be in \[0, 1\)"
    ):
        main(["train", "--prepared", str(prepared), "--output", str(tmp_path / "run"), "--ema-decay", "1.5"])
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())  # nothing half-written
