"""The shared epoch loop on a one-weight model: best epoch kept, patience, resume, refused resume."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn

from corona_ct.models.fit import MODEL_FILE, EpochResult, TrainResult, fit
from corona_ct.pipeline.errors import ConfigError, ModelError

CARD = {
    "architecture": "test/linear",
    "task": "loop test",
    "input": {"size": 1, "channels": 1, "window": [0.0, 1.0], "roi": "none"},
}


@dataclass
class Run:
    """A Linear(1, 1) whose weight becomes the epoch number after each epoch's Adam step.

    ``scores[epoch - 1]`` is that epoch's selection score. ``calls`` lists the epochs run,
    ``weights_at_start`` the weight each epoch found, ``steps_at_start`` Adam's step count.
    """

    scores: Sequence[float]
    model: nn.Linear = field(default_factory=lambda: nn.Linear(1, 1, bias=False))
    calls: list[int] = field(default_factory=list)
    weights_at_start: list[float] = field(default_factory=list)
    steps_at_start: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        with torch.no_grad():
            self.model.weight.fill_(-1.0)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=0.1)

    def run_epoch(self, epoch: int) -> EpochResult:
        self.calls.append(epoch)
        self.weights_at_start.append(float(self.model.weight.detach()))
        state = self.optimizer.state.get(self.model.weight, {})
        self.steps_at_start.append(int(state["step"]) if "step" in state else 0)
        loss = self.model(torch.ones(1, 1)).sum()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            self.model.weight.fill_(float(epoch))
        score = self.scores[epoch - 1]
        return EpochResult({"train_loss": float(loss.detach())}, score, {"auc": score})

    def fit(
        self, output: Path, epochs: int, patience: int, resume: bool = False, lr: float = 0.1
    ) -> TrainResult:
        config = {"lr": lr, "epochs": epochs, "patience": patience}
        return fit(
            self.model, self.optimizer, self.run_epoch, output, CARD, config,
            epochs=epochs, patience=patience, resume=resume, score_name="validation AUC",
        )  # fmt: skip


def _card(output: Path) -> dict[str, object]:
    card: dict[str, object] = json.loads((output / "model.json").read_text())
    return card


def test_best_epoch_is_kept_and_patience_stops_the_loop(tmp_path: Path) -> None:
    run = Run([0.5, 0.9, 0.7, 0.9, 0.6, 0.95])  # epoch 4 only ties the best: no gain
    result = run.fit(tmp_path, epochs=6, patience=3)
    assert run.calls == [1, 2, 3, 4, 5]  # three epochs without gain after epoch 2
    assert result.best_epoch == 2 and result.best_metrics == {"auc": 0.9}
    assert float(result.model.weight.detach()) == 2.0 and not result.model.training  # best weights, eval mode
    card = _card(tmp_path)
    assert card["best_epoch"] == 2 and card["epochs_run"] == 5 and card["stopped_early"] is True
    assert card["best_validation"] == {"auc": 0.9}
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4, 5]
    assert all(
        later["seconds"] >= earlier["seconds"] for earlier, later in zip(result.history, result.history[1:])
    )
    lines = (tmp_path / "history.csv").read_text().splitlines()
    assert lines[0] == "epoch,train_loss,seconds" and len(lines) == 6


def test_patience_zero_runs_every_epoch(tmp_path: Path) -> None:
    run = Run([0.5, 0.9, 0.7, 0.9, 0.6, 0.95])
    result = run.fit(tmp_path, epochs=6, patience=0)
    assert run.calls == [1, 2, 3, 4, 5, 6] and result.best_epoch == 6
    assert _card(tmp_path)["stopped_early"] is False


def test_resume_continues_after_the_last_finished_epoch_with_its_state(tmp_path: Path) -> None:
    scores = [0.5, 0.9, 0.7, 0.8, 0.95]
    Run(scores).fit(tmp_path, epochs=3, patience=0)
    resumed = Run(scores)  # a fresh model and optimizer, as after a restart
    result = resumed.fit(tmp_path, epochs=5, patience=0, resume=True)
    assert resumed.calls == [4, 5]
    assert resumed.weights_at_start[0] == 3.0  # the weights of epoch 3, not a fresh start
    assert resumed.steps_at_start == [3, 4]  # Adam's state came back too
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4, 5]
    assert result.best_epoch == 5 and float(result.model.weight.detach()) == 5.0


def test_resume_keeps_the_best_epoch_of_the_first_part(tmp_path: Path) -> None:
    scores = [0.5, 0.9, 0.7, 0.8]
    Run(scores).fit(tmp_path, epochs=2, patience=0)
    result = Run(scores).fit(tmp_path, epochs=4, patience=0, resume=True)
    assert result.best_epoch == 2 and float(result.model.weight.detach()) == 2.0


def test_a_run_that_stopped_early_stays_stopped_on_resume(tmp_path: Path) -> None:
    scores = [0.9, 0.1, 0.2, 0.3, 0.99]
    Run(scores).fit(tmp_path, epochs=5, patience=1)
    again = Run(scores)
    result = again.fit(tmp_path, epochs=5, patience=1, resume=True)
    assert again.calls == [] and result.best_epoch == 1
    assert result.card["stopped_early"] is True and result.card["epochs_run"] == 2


def test_without_resume_a_run_folder_starts_over(tmp_path: Path) -> None:
    scores = [0.5, 0.6, 0.7]
    Run(scores).fit(tmp_path, epochs=2, patience=0)
    again = Run(scores)
    again.fit(tmp_path, epochs=3, patience=0)
    assert again.calls == [1, 2, 3] and again.weights_at_start[0] == -1.0


def test_resume_refuses_other_settings_but_accepts_more_epochs(tmp_path: Path) -> None:
    scores = [0.5, 0.6, 0.7]
    Run(scores).fit(tmp_path, epochs=1, patience=0)
    with pytest.raises(ConfigError, match="different lr"):
        Run(scores).fit(tmp_path, epochs=2, patience=0, resume=True, lr=0.5)
    assert Run(scores).fit(tmp_path, epochs=2, patience=0, resume=True).best_epoch == 2


def test_nan_scores_never_count_as_a_gain(tmp_path: Path) -> None:
    result = Run([math.nan, 0.4, math.nan]).fit(tmp_path / "some", epochs=3, patience=0)
    assert result.best_epoch == 2
    with pytest.raises(ModelError, match="validation AUC was never finite"):
        Run([math.nan, math.nan]).fit(tmp_path / "none", epochs=2, patience=0)
    assert not (tmp_path / "none" / MODEL_FILE).exists()
