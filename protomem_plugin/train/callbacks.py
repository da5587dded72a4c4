"""What the training loop reports: progress, TensorBoard scalars, a JSON-lines log, verification."""
from __future__ import annotations

import json
import warnings
import os
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

class TrainingLogger:
    """Rank-0 reporting: tqdm bar, ``frequent``-step log lines, TensorBoard and ``train_log.jsonl``."""

    def __init__(self, output: str, *, enabled: bool, total_steps: int, start_step: int, frequent: int,
                 global_batch: int, progress: bool = True) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.frequent = max(1, int(frequent))
        self.global_batch = global_batch
        self.writer = None
        self.bar = None
        self.jsonl = None
        self.textlog = None
        self._tick = time.time()
        self._tick_step = start_step
        self._losses: list[float] = []
        self._pending: list[tuple] = []
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=os.path.join(output, "tensorboard"))
        self.jsonl = open(Path(output) / "train_log.jsonl", "a", encoding="utf-8")
        self.textlog = open(Path(output) / "training.log", "a", encoding="utf-8")
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def step(self, global_step: int, epoch: int, loss: torch.Tensor | float, lr: float, skipped: bool) -> None:
        """Record one optimisation step (``loss`` is NaN for a skipped step).

        ``loss`` may be a device tensor: it is kept there and read with the other pending steps at
        the next :meth:`flush` (a report, a checkpoint, the end), so a step costs no host sync.
        """
        if not self.enabled:
            return
        self._pending.append((global_step, epoch, loss, lr, skipped))
        if self.bar is not None:
            self.bar.update(1)

    def flush(self) -> None:
        """Write the pending steps to ``train_log.jsonl`` (one read of their losses from the device)."""
        if not self.enabled or not self._pending:
            return
        losses = [row[2] for row in self._pending]
        on_device = [i for i, v in enumerate(losses) if isinstance(v, torch.Tensor)]
        if on_device:
            read = torch.stack([losses[i].detach().reshape(()).double() for i in on_device]).tolist()
            for i, value in zip(on_device, read):
                losses[i] = value
        for (global_step, epoch, _, lr, skipped), loss in zip(self._pending, losses):
            loss = float("nan") if skipped else loss
            self.jsonl.write(json.dumps({"step": global_step, "epoch": epoch, "loss": loss, "lr": lr,
                                         "skipped": skipped}) + "\n")
            if not skipped:
                self._losses.append(loss)
        if self.bar is not None:
            last = self._pending[-1]
            self.bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{last[3]:.4f}", epoch=last[1])
        self._pending = []
        self.jsonl.flush()

    def report(self, global_step: int, epoch: int, lr: float, head_stats: dict[str, float], extra: dict[str, float]) -> None:
        """The every-``frequent``-steps line: samples/s, mean loss, lr, ETA; scalars to TensorBoard."""
        if not self.enabled:
            return
        self.flush()
        now = time.time()
        steps = max(1, global_step - self._tick_step)
        speed = steps * self.global_batch / max(now - self._tick, 1e-9)
        eta_h = (self.total_steps - global_step) * (now - self._tick) / steps / 3600
        mean_loss = sum(self._losses) / len(self._losses) if self._losses else float("nan")
        self._tick, self._tick_step, self._losses = now, global_step, []
        self.write(f"Speed {speed:.1f} samples/sec  Loss {mean_loss:.4f}  LearningRate {lr:.6f}  "
                   f"Epoch {epoch}  Global Step {global_step}  Required {eta_h:.2f} hours")
        self.writer.add_scalar("loss", mean_loss, global_step)
        self.writer.add_scalar("learning_rate", lr, global_step)
        self.writer.add_scalar("samples_per_sec", speed, global_step)
        for name, value in {**head_stats, **extra}.items():
            self.writer.add_scalar(f"head/{name}" if name in head_stats else name, value, global_step)
        self.jsonl.flush()

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.enabled:
            self.writer.add_scalar(name, value, step)

    def write(self, message: str, console: bool = True) -> None:
        """A line to ``output/training.log`` and, with ``console``, to the terminal above the bar."""
        if not self.enabled:
            return
        stamped = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        self.textlog.write(stamped + "\n")
        self.textlog.flush()
        if console:
            (self.bar.write if self.bar is not None else print)(stamped)

    def close(self) -> None:
        self.flush()
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
            self.textlog.close()


class VerificationCallback:
    """10-fold verification accuracy on ``{rec}/{name}.bin`` for each name in ``val_targets`` (rank 0)."""

    def __init__(self, rec: str, val_targets, image_size: int, device: torch.device) -> None:
        self.paths = {}
        for name in val_targets or []:
            path = Path(rec) / f"{name}.bin"
            if path.is_file():
                self.paths[name] = path
            else:
                warnings.warn(f"verification target {name!r} not found at {path}; skipped", stacklevel=2)
        self.image_size = image_size
        self.device = device
        self.best: dict[str, float] = {}

    def __call__(self, backbone: nn.Module, global_step: int, logger: TrainingLogger) -> dict[str, float]:
        from ..eval.verification import evaluate_bin

        results = {}
        was_training = backbone.training
        backbone.eval()
        try:
            for name, path in self.paths.items():
                res = evaluate_bin(backbone, str(path), batch_size=64, device=self.device,
                                   image_size=(self.image_size, self.image_size))
                acc = float(res["accuracy"])
                self.best[name] = max(self.best.get(name, 0.0), acc)
                results[name] = acc
                logger.write(f"[{name}][{global_step}] Accuracy-Flip: {acc:.5f}+-{float(res['std']):.5f}  "
                             f"XNorm: {float(res['xnorm']):.3f}  Best: {self.best[name]:.5f}")
                logger.scalar(f"verification/{name}", acc, global_step)
        finally:
            backbone.train(was_training)
        return results


def head_diagnostics(head: nn.Module) -> dict[str, float]:
    """The head's per-step diagnostics (collective: every rank calls it at the same step)."""
    fn: Optional[callable] = getattr(head, "diagnostics", None)
    return fn() if fn is not None else {}
