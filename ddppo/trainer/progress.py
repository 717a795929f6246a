"""A console progress display that people can trust (fps, ETA, latest success/SPL)."""

from __future__ import annotations

import sys
import time


class ProgressDisplay:
    """A rich progress bar on a terminal; on a pipe (CI, SLURM logs) a plain line at most every few seconds."""

    def __init__(self, total_steps: int, enabled: bool = True, every_s: float = 3.0):
        self.total = total_steps
        self.enabled = enabled
        self.every_s = every_s
        self.tty = sys.stdout.isatty()
        self._progress = None
        self._last_print = 0.0
        self._final_printed = False

    def start(self, done: int = 0) -> None:
        self._t0, self._done0 = time.perf_counter(), done
        if not self.enabled or not self.tty:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[stats]}"), TimeRemainingColumn())
        self._task = self._progress.add_task("train", total=self.total, completed=done, stats="")
        self._progress.start()

    def _stats(self, steps: int, metrics: dict) -> str:
        fps = (steps - self._done0) / max(time.perf_counter() - self._t0, 1e-9)
        parts = [f"{fps:,.0f} fps"]
        for key, label in (("episode/success", "success"), ("episode/spl", "SPL"), ("episode/reward", "reward")):
            if key in metrics:
                parts.append(f"{label} {metrics[key]:.3f}")
        return " | ".join(parts)

    def update(self, steps: int, metrics: dict) -> None:
        if not self.enabled:
            return
        stats = self._stats(steps, metrics)
        if self._progress is not None:
            self._progress.update(self._task, completed=min(steps, self.total), stats=stats)
            return
        now = time.perf_counter()
        final = steps >= self.total and not self._final_printed
        if now - self._last_print >= self.every_s or final:
            self._last_print = now
            self._final_printed = self._final_printed or final
            eta = max(0, self.total - steps) / max((steps - self._done0) / max(now - self._t0, 1e-9), 1e-9)
            print(f"[train] {steps:,}/{self.total:,} steps | {stats} | ETA {eta / 60:.1f} min", flush=True)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
