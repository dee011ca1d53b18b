"""What build_defaults writes into a card about the patients a run was trained on."""

from __future__ import annotations

from corona_ct.models.build_defaults import TRAINING_WORDS, training_words


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
