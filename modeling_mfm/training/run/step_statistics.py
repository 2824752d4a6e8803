"""Training statistics kept on the device between two log steps, so that the loop never waits for the device.

Per micro-batch the loop adds its loss and skipped-image count, per optimizer step the gradient norm (pre-training:
`StepStatistics`; fine-tuning and segmentation: `RunningSums`); the tensors are only read (one synchronisation,
reduced over processes) when metrics are logged or a checkpoint is written.
The same goes for the watch on non-finite losses: a device-side count of consecutive non-finite micro-batches,
checked at those moments, stops the run before a checkpoint could store weights that a NaN has reached.
"""

from __future__ import annotations

from typing import Any

import torch

from ...cli import RunStopped

__all__ = ["NonFiniteLossError", "RunningSums", "StepStatistics"]


class NonFiniteLossError(RunStopped, RuntimeError):
    """The loss became NaN or infinite; the run stopped, leaving the last good checkpoint (exit code 3)."""


class StepStatistics:
    """Device-side sums over a logging window, and the non-finite watch.

    Args:
        device: where the statistics live (the accelerator's device).
        patience: consecutive non-finite micro-batches tolerated (with fp16 the grad scaler skips such steps and
            lowers the loss scale, so a few are expected; without it, none).
    """

    def __init__(self, device: torch.device, patience: int = 0) -> None:
        if patience < 0:
            raise ValueError(f"patience must be >= 0, got {patience}")
        self.patience = patience
        dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64
        # loss sum, finite micro-batches, grad-norm sum, finite grad norms, skipped images
        self.window = torch.zeros(5, dtype=dtype, device=device)
        self.streak = torch.zeros((), dtype=torch.int64, device=device)
        self.worst_streak = torch.zeros((), dtype=torch.int64, device=device)
        self.first_bad_step = torch.full((), -1, dtype=torch.int64, device=device)

    def add_micro_batch(self, loss: torch.Tensor, skipped: torch.Tensor, step: int) -> None:
        """Records one micro-batch's loss (during optimizer step ``step``, 0-based) and its skipped images."""
        loss = loss.detach()
        finite = torch.isfinite(loss)
        self.window[0] += torch.where(finite, loss.to(self.window.dtype), 0.0)
        self.window[1] += finite.to(self.window.dtype)
        self.window[4] += skipped.to(self.window.dtype)
        self.streak.copy_(torch.where(finite, 0, self.streak + 1))
        torch.maximum(self.worst_streak, self.streak, out=self.worst_streak)
        self.first_bad_step.copy_(torch.where((self.first_bad_step < 0) & ~finite, step, self.first_bad_step))

    def add_grad_norm(self, norm: torch.Tensor) -> None:
        """Records the gradient norm of an optimizer step (non-finite norms, e.g. fp16 overflows, are left out)."""
        norm = norm.detach()
        finite = torch.isfinite(norm)
        self.window[2] += torch.where(finite, norm.to(self.window.dtype), 0.0)
        self.window[3] += finite.to(self.window.dtype)

    def check_finite(self, accelerator: Any, last_checkpoint: Any = None) -> None:
        """Raises `NonFiniteLossError` (on every process alike) if any process saw more than ``patience``
        consecutive non-finite losses. Synchronises."""
        worst = int(accelerator.gather(self.worst_streak.view(1)).max())
        if worst <= self.patience:
            return
        steps = accelerator.gather(self.first_bad_step.view(1))
        first = int(steps[steps >= 0].min()) + 1 if bool((steps >= 0).any()) else -1
        advice = f"The last good checkpoint is {last_checkpoint}." if last_checkpoint else "No checkpoint was saved."
        raise NonFiniteLossError(
            f"the loss became non-finite (NaN or inf) at step {first} and stayed so for {worst} micro-batch(es) "
            f"(tolerated: {self.patience}); stopping. {advice} Lower --base_learning_rate or check the data."
        )

    def pending_skipped(self, accelerator: Any) -> int:
        """Skipped images of the current window, summed over processes (synchronises)."""
        return int(accelerator.reduce(self.window[4].clone(), reduction="sum"))

    def collect(self, accelerator: Any) -> dict[str, float]:
        """Sums the window over processes, resets it and returns ``loss`` (mean over finite micro-batches),
        ``grad_norm`` (mean over finite norms) and ``skipped`` (synchronises)."""
        totals = accelerator.reduce(self.window.clone(), reduction="sum").tolist()
        self.window.zero_()
        loss_sum, micro_batches, norm_sum, norms, skipped = totals
        return {
            "loss": loss_sum / micro_batches if micro_batches else float("nan"),
            "grad_norm": norm_sum / norms if norms else float("nan"),
            "skipped": int(skipped),
        }


class RunningSums:
    """The micro-batch losses and skipped-image counts since the last read, on the device."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), device=device)
        self.micro_batches = 0
        self.skipped = torch.zeros((), dtype=torch.long, device=device)

    def add(self, loss: torch.Tensor, skipped: torch.Tensor) -> None:
        self.loss += loss.detach()
        self.micro_batches += 1
        self.skipped += skipped

    def mean_loss(self, accelerator: Any) -> float:
        """The mean loss since the last call, averaged over processes (synchronises)."""
        mean = accelerator.reduce(self.loss / self.micro_batches, reduction="mean").item()
        self.loss.zero_()
        self.micro_batches = 0
        return mean

    def skipped_images(self, accelerator: Any) -> int:
        """The images skipped since the last call, summed over processes (synchronises)."""
        total = int(accelerator.reduce(self.skipped, reduction="sum").item())
        self.skipped.zero_()
        return total
