import pytest
import torch

from corona_ct.pipeline.device import resolve_device
from corona_ct.pipeline.errors import ConfigError


def test_resolve_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("tpu")
    with pytest.raises(ConfigError, match=r"'cuda:1'.*devices here: cpu"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: f"Test GPU {index}")
    with pytest.raises(
        ConfigError, match=r"'cuda:3' does not exist; this machine has 1 GPU\(s\): cpu, cuda:0 \(Test GPU 0\)"
    ):
        resolve_device("cuda:3")


def test_set_threads_refuses_less_than_one() -> None:
    from corona_ct.pipeline.device import set_threads

    with pytest.raises(ConfigError, match="threads=0"):
        set_threads(0)
