"""What benchmarks and tests ask of a training run besides learning, kept out of the training loop: an artificial
straggler, and throughput figures the run's result carries (``ddppo bench train``/``scaling`` read them)."""

from __future__ import annotations

import time

import torch


class BenchHooks:
    """Called by the trainer after each environment step, rollout and update; :meth:`results` adds to the run's
    result ``progress`` (wall clock and env steps after each update), ``steady_fps`` (throughput after the first
    update: start-up, compilation and cache fills excluded), ``sim_s_per_step`` (this rank's simulator seconds per
    rollout step) and ``param_checksum`` (lets callers check that every rank ended with the same weights).

    ``ddppo.slowdown`` seconds of sleep after every environment step of rank ``ddppo.slow_rank`` make it a straggler
    whose environments are that much slower (the sleep counts as simulator time)."""

    def __init__(self, ddppo_cfg, rank: int):
        self.slowdown = ddppo_cfg.slowdown if rank == ddppo_cfg.slow_rank else 0.0
        self.progress: list[tuple[float, int]] = []
        self.sim_seconds = 0.0
        self.rollout_steps = 0

    def after_env_step(self) -> None:
        if self.slowdown > 0:
            time.sleep(self.slowdown)

    def after_rollout(self, sim_seconds: float, steps: int) -> None:
        self.sim_seconds += sim_seconds
        self.rollout_steps += steps

    def after_update(self, env_steps: int) -> None:
        self.progress.append((time.perf_counter(), env_steps))

    def results(self, policy: torch.nn.Module) -> dict:
        with torch.no_grad():
            checksum = sum(float(t.double().sum()) for t in policy.state_dict().values() if t.is_floating_point())
        out = {"param_checksum": checksum, "progress": self.progress,
               "sim_s_per_step": self.sim_seconds / max(1, self.rollout_steps)}
        if len(self.progress) > 1:
            (t_a, s_a), (t_b, s_b) = self.progress[0], self.progress[-1]
            out["steady_fps"] = (s_b - s_a) / max(t_b - t_a, 1e-9)
        return out
