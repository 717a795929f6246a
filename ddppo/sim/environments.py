"""The one place that turns a config into a batched environment, so the trainer, evaluation and benchmarks all
get the same backend and task for the same config."""

from __future__ import annotations

import torch

from ddppo.config import Backend, ConfigError, TrainConfig
from ddppo.sim.dataset_dir import load_split
from ddppo.sim.tasks import TASKS


def require_backend(cfg: TrainConfig) -> None:
    """Fail now, in one line (a ConfigError), if ``cfg.sim.backend`` cannot run here: habitat-sim that does not
    import. The launchers call it right after loading the config, before any expensive work."""
    if cfg.sim.backend != Backend.habitat:
        return
    from ddppo.sim.habitat_backend import HabitatUnavailable, require_habitat_sim

    try:
        require_habitat_sim()
    except HabitatUnavailable as e:
        raise ConfigError(str(e)) from None


def make_vector_env(cfg: TrainConfig, split: str, num_envs: int, *, seed: int = 0, env_offset: int = 0,
                    device: str | torch.device = "cpu", episode_ids: list[int] | None = None,
                    order: str = "shuffle", num_shares: int | None = None):
    """``num_envs`` environments of ``cfg.task.type`` over ``split`` (all its episodes, or those at ``episode_ids``).

    ``seed`` and ``env_offset`` pick the episode streams (see PointNavVectorEnv); ``order="partition"`` runs every
    episode exactly once, as evaluation does. ``cfg.sim.backend=habitat`` runs habitat-sim instead of the
    embedded simulator (ddppo/sim/habitat_backend.py), with the same task code and interface."""
    if cfg.sim.backend == Backend.habitat:
        from ddppo.sim.habitat_backend import make_habitat_vector_env

        return make_habitat_vector_env(cfg, split, num_envs, seed=seed, env_offset=env_offset, device=device,
                                       episode_ids=episode_ids, order=order, num_shares=num_shares)
    episodes, navs = load_split(cfg.task.data_dir, split)
    if episode_ids is not None:
        episodes = [episodes[k] for k in episode_ids]
    return TASKS[cfg.task.type](episodes, navs, num_envs, cfg.sim, cfg.task, seed=seed, env_offset=env_offset,
                                device=device, order=order, num_shares=num_shares)
