"""Device-side training statistics and the non-finite loss watch."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from modeling_mfm.training.run.step_statistics import NonFiniteLossError, StepStatistics


@pytest.fixture
def accelerator():
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(True)


def test_window_means_and_reset(accelerator):
    stats = StepStatistics(torch.device("cpu"))
    for step, (loss, skipped) in enumerate([(1.0, 0), (3.0, 2)]):
        stats.add_micro_batch(torch.tensor(loss, requires_grad=True) * 1, torch.tensor(skipped), step)
    stats.add_grad_norm(torch.tensor(2.0))
    stats.add_grad_norm(torch.tensor(float("inf")))  # an fp16 overflow step: left out of the mean
    assert stats.pending_skipped(accelerator) == 2
    assert stats.collect(accelerator) == {"loss": 2.0, "grad_norm": 2.0, "skipped": 2}
    values = stats.collect(accelerator)  # the window was reset
    assert values["skipped"] == 0 and values["loss"] != values["loss"]  # NaN: nothing recorded


def test_non_finite_loss_stops_without_patience(accelerator):
    stats = StepStatistics(torch.device("cpu"), patience=0)
    stats.add_micro_batch(torch.tensor(0.5), torch.tensor(0), 0)
    stats.check_finite(accelerator)
    stats.add_micro_batch(torch.tensor(float("nan")), torch.tensor(0), 1)
    stats.add_micro_batch(torch.tensor(0.5), torch.tensor(0), 2)  # recovering later does not undo it
    with pytest.raises(NonFiniteLossError, match=r"at step 2 .*1 micro-batch.*last good checkpoint is ckpt-1"):
        stats.check_finite(accelerator, "ckpt-1")
    assert stats.collect(accelerator)["loss"] == 0.5  # the NaN is kept out of the logged mean


def test_patience_counts_consecutive_non_finite_losses(accelerator):
    stats = StepStatistics(torch.device("cpu"), patience=2)
    for step, loss in enumerate([float("inf"), float("nan"), 1.0, float("inf"), 1.0]):
        stats.add_micro_batch(torch.tensor(loss), torch.tensor(0), step)
    stats.check_finite(accelerator)  # never more than 2 in a row: the fp16 scaler's retries
    for step in range(5, 8):
        stats.add_micro_batch(torch.tensor(float("nan")), torch.tensor(0), step)
    with pytest.raises(NonFiniteLossError, match="stayed so for 3"):
        stats.check_finite(accelerator)
    with pytest.raises(ValueError, match="patience"):
        StepStatistics(torch.device("cpu"), patience=-1)
