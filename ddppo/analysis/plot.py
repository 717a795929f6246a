"""``ddppo plot RUN [RUN ...]``: learning curves (success, SPL, ... against frames) from run directories."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

DEFAULT_METRICS = ("episode/success", "episode/spl")


def read_curves(run_dir: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    tb = Path(run_dir) / "tb"
    if not tb.is_dir():
        raise FileNotFoundError(f"run {run_dir}: no TensorBoard directory {tb}")
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: ([e.step for e in acc.Scalars(tag)], [e.value for e in acc.Scalars(tag)])
            for tag in acc.Tags()["scalars"]}


def drawn_values(metric: str, values: list[float], smooth: int) -> list[float]:
    """The points a curve draws: training windows (episode/*, loss/*, ...) as a trailing moving average over
    ``smooth`` points; evaluations (eval/*) as they are, each one a pass over the val split rather than a noisy
    window, and far apart in frames."""
    if smooth <= 1 or metric.startswith("eval/"):
        return list(values)
    return [sum(values[max(0, i - smooth + 1): i + 1]) / len(values[max(0, i - smooth + 1): i + 1])
            for i in range(len(values))]


def plot_runs(runs: list[str | Path], out: str | Path, metrics=DEFAULT_METRICS, smooth: int = 1) -> Path:
    """One panel per metric, one line per run (see :func:`drawn_values` for ``smooth``)."""
    curves = {str(r): read_curves(r) for r in runs}
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for name, c in curves.items():
            if metric not in c:
                raise ValueError(f"run {name}: no scalar {metric!r} (has {', '.join(sorted(c)[:8])}, ...)")
            steps, values = c[metric]
            evaluation = metric.startswith("eval/")
            ax.plot(steps, drawn_values(metric, values, smooth), marker="o" if evaluation else None,
                    label=Path(name).name)
        ax.set_xlabel("frames (environment steps)")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    return save_figure(fig, out, dpi=120)


def save_figure(fig, path: str | Path, dpi: int) -> Path:
    """Lay ``fig`` out, write it to ``path`` (its directory made) and close it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
