"""cam.layers and cam.fusion act on the maps the pipeline produces, and a wrong layer is refused at load."""

from __future__ import annotations

import numpy as np
import pytest

from corona_ct.data.phantom import make_phantom
from corona_ct.pipeline.config import PipelineConfig
from corona_ct.pipeline.errors import ModelError
from corona_ct.pipeline.modelset import ModelSet, load_models
from corona_ct.pipeline.run import analyze_study

SMALL = {"roi.input_size": 64, "runtime.device": "cpu"}


@pytest.fixture(scope="module")
def volume():  # type: ignore[no-untyped-def]
    return make_phantom(seed=3, shape=(8, 96, 96), spacing_mm=(5.0, 3.2, 3.2), lesions="mixed").to_volume()


@pytest.fixture(scope="module")
def models() -> ModelSet:
    """One set of random weights for every setting, so that only the setting differs between maps."""
    return load_models(PipelineConfig().replace(SMALL), allow_untrained=True)


def _maps(volume, models: ModelSet, **settings: object) -> tuple[np.ndarray, tuple[str, ...], str]:  # type: ignore[no-untyped-def]
    config = PipelineConfig().replace({**SMALL, **settings})
    result = analyze_study(volume, models, config)
    return result.cams.maps, result.cams.layers, result.cams.fusion


def test_fusion_and_layers_change_the_maps_and_are_recorded(volume, models: ModelSet) -> None:  # type: ignore[no-untyped-def]
    product, layers, fusion = _maps(volume, models)
    assert (layers, fusion) == (("layer2", "layer3"), "product")  # ResNet-50's own layers by default
    mean, _, fusion = _maps(volume, models, **{"cam.fusion": "mean"})
    assert fusion == "mean" and not np.allclose(product, mean)
    coarse, layers, _ = _maps(volume, models, **{"cam.layers": ["layer3"]})
    assert layers == ("layer3",) and not np.allclose(product, coarse)


def test_a_layer_the_classifier_lacks_is_refused_at_load() -> None:
    config = PipelineConfig().replace({**SMALL, "cam.layers": ["layer9"]})
    with pytest.raises(ModelError, match=r"layer9.*its Grad-CAM layers are layer2, layer3"):
        load_models(config, allow_untrained=True)
