"""TensorBoard scalars, flushed at every write (a run read while it trains, or killed, shows every point)."""

from __future__ import annotations

from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


class TBWriter:
    def __init__(self, log_dir: str | Path, purge_step: int | None = None):
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, float(v), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
