"""``ddppo bench peer``: ddppo's trainer against the packaged peers a user would pick instead, side by side.

The peers are stable-baselines3 PPO (feed-forward; ddppo then also trains its policy with a feed-forward core,
``policy.rnn_type=none``, for a like-for-like ratio) and sb3-contrib RecurrentPPO (LSTM), trained on the same
batched environment (``PointNavVectorEnv`` through ``SB3VecEnv``), with the same visual encoder and goal embedding
(ddppo's own modules, wrapped as an sb3 features extractor) and the same rollout and batch sizes, learning rate
(and its decay), PPO epochs, minibatches, clipping and coefficients. Each trainer runs the same frame budget, one
after another, each in a fresh process of its own: a peer runs as its users run it, with none of the process-wide
settings an earlier trainer made (ddppo's ``keep_freed_memory`` allocator setting, thread pools), and each peak
RSS is that trainer's. Throughput is measured two ways: wall-clock env-steps/s after the first update
(start-up excluded, as ``ddppo bench train`` does), and env-steps per second of the trainer's CPU time, which other
processes on a shared machine disturb far less; ``wall_s_<trainer>`` is the whole run, start-up included. Every
trained agent is then evaluated deterministically on the same val episodes by the same code.

stable-baselines3 and sb3-contrib are a benchmark-only extra: ``pip install "ddppo[bench]"``.
"""

from __future__ import annotations

import copy
import functools
import multiprocessing
import os
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from ddppo.config import PolicyConfig, TrainConfig
from ddppo.distributed import resolve_device, resolve_sim_device
from ddppo.policy import GOAL_SENSOR, Policy, goal_features
from ddppo.policy.precision import encode
from ddppo.sim.gym_env import _observation_space
from ddppo.trainer.peak_memory import peak_memory, reset_peak_rss

SB3_MISSING = 'ddppo bench peer needs stable-baselines3 and sb3-contrib: pip install "ddppo[bench]"'

try:
    from gymnasium import spaces
    from sb3_contrib import RecurrentPPO
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
    from stable_baselines3.common.vec_env import VecEnv
except ImportError as e:  # the command prints this one line (see ddppo/launch/cli.py)
    raise ModuleNotFoundError(SB3_MISSING) from e

PEERS = ("ppo", "recurrent_ppo")


class SB3VecEnv(VecEnv):
    """stable-baselines3's VecEnv contract over a batched ``PointNavVectorEnv``.

    Observations are dicts of numpy arrays (views of the simulator's fresh per-step tensors on CPU: no copy);
    an ended episode restarts automatically and its last observation is in ``info["terminal_observation"]``,
    with ``info["TimeLimit.truncated"]`` true when the step limit (not STOP) ended it, so sb3 bootstraps."""

    def __init__(self, env):
        self.env = env
        self.render_mode = None  # VecEnv.__init__ reads it through get_attr
        self._actions: torch.Tensor | None = None
        super().__init__(env.num_envs, _observation_space(env), spaces.Discrete(4))

    @staticmethod
    def _numpy(obs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        return {k: v.cpu().numpy() for k, v in obs.items()}

    def reset(self):
        return self._numpy(self.env.reset())

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = torch.as_tensor(np.asarray(actions)).reshape(-1)

    def step_wait(self):
        r = self.env.step(self._actions)
        done = r.done.cpu().numpy()
        infos: list[dict] = [{} for _ in range(self.num_envs)]
        ended = np.flatnonzero(done)
        if len(ended):
            final = self._numpy(r.final_obs)
            truncated = r.truncated.cpu().numpy()
            success = r.info["success"].cpu().numpy()
            for e in ended:
                infos[e] = {"terminal_observation": {k: v[e] for k, v in final.items()},
                            "TimeLimit.truncated": bool(truncated[e]), "is_success": bool(success[e])}
        return self._numpy(r.obs), r.reward.cpu().numpy(), done, infos

    def close(self) -> None:
        self.env.close()

    def get_attr(self, attr_name, indices=None):
        return [getattr(self, attr_name)] * len(list(self._get_indices(indices)))

    def set_attr(self, attr_name, value, indices=None) -> None:
        setattr(self, attr_name, value)

    def env_method(self, method_name, *method_args, indices=None, **method_kwargs):
        raise NotImplementedError("SB3VecEnv runs one batched simulator: it has no per-environment methods")

    def env_is_wrapped(self, wrapper_class, indices=None):
        return [False] * len(list(self._get_indices(indices)))


class DDPPOFeatures(BaseFeaturesExtractor):
    """ddppo's visual input, encoder, visual FC and goal embedding as an sb3 features extractor: the modules come
    from a ddppo ``Policy`` built from the same policy config, so the peers train the same network up to the core.

    ``core_fc`` adds a Linear(features, hidden_size) + ReLU, the feed-forward stand-in for the recurrent core, so
    that the PPO peer has a hidden layer of the core's width before its (linear) heads. The encoder computes in the
    config's ``encoder_precision``, as ddppo's does."""

    def __init__(self, observation_space: spaces.Dict, policy_cfg: dict, core_fc: bool = False):
        obs_spaces = {k: (self._hwc(k, s.shape), torch.uint8 if s.dtype == np.uint8 else torch.float32)
                      for k, s in observation_space.spaces.items()}
        policy = Policy(obs_spaces, PolicyConfig(**policy_cfg))
        width = (policy_cfg["hidden_size"] if policy.visual_fc is not None else 0) + (
            policy.goal_embed.out_features if policy.goal_embed is not None else 0)
        out = policy_cfg["hidden_size"] if core_fc else width
        super().__init__(observation_space, out)
        self.visual_input, self.encoder, self.visual_fc = policy.visual_input, policy.encoder, policy.visual_fc
        self.goal_embed = policy.goal_embed
        self.encoder_precision = policy.encoder_precision
        # sb3 moves channel-last uint8 images channel-first (VecTransposeImage); ddppo's VisualInput wants them back
        self.transposed = {k for k, s in observation_space.spaces.items() if k == "rgb" and s.shape[0] == 3}
        self.core = nn.Sequential(nn.Linear(width, out), nn.ReLU()) if core_fc else nn.Identity()

    @staticmethod
    def _hwc(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (shape[1], shape[2], shape[0]) if key == "rgb" and shape[0] == 3 else tuple(shape)

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        feats = []
        if self.encoder is not None:
            obs = {k: (v.permute(0, 2, 3, 1) if k in self.transposed else v) for k, v in obs.items()}
            feats.append(self.visual_fc(encode(self.encoder, self.visual_input(obs), self.encoder_precision)))
        if self.goal_embed is not None:
            feats.append(self.goal_embed(goal_features(obs[GOAL_SENSOR].reshape(-1, 2))))
        return self.core(torch.cat(feats, dim=-1))


class _Progress(BaseCallback):
    """(wall clock, env steps) at the start of every rollout and at the end: the same points as ddppo's
    ``progress`` (after each update), so both rates are taken after the first update."""

    def __init__(self):
        super().__init__()
        self.points: list[tuple[float, int]] = []

    def _on_rollout_start(self) -> None:
        self.points.append((time.perf_counter(), self.model.num_timesteps))

    def _on_step(self) -> bool:
        return True

    def _on_training_end(self) -> None:
        self.points.append((time.perf_counter(), self.model.num_timesteps))


class SB3Agent:
    """An sb3 model as an agent of ``ddppo.evaluation.evaluate.evaluate``: deterministic actions, LSTM state carried
    between steps and reset where ``masks`` marks an episode start."""

    def __init__(self, model):
        self.model, self.state = model, None

    def act(self, obs, prev_actions, masks):
        starts = (masks == 0).cpu().numpy()
        actions, self.state = self.model.predict({k: v.cpu().numpy() for k, v in obs.items()}, state=self.state,
                                                 episode_start=starts, deterministic=True)
        return torch.as_tensor(actions).long().reshape(-1)


def make_peer(kind: str, cfg, venv: VecEnv, device: str = "cpu"):
    """sb3 PPO (``kind="ppo"``) or sb3-contrib RecurrentPPO (``"recurrent_ppo"``) with ddppo's hyperparameters."""
    ppo = cfg.ppo
    batch = ppo.num_steps * ppo.num_envs
    if batch % ppo.num_mini_batch:
        raise ValueError(f"num_steps x num_envs = {batch} is not divisible by ppo.num_mini_batch={ppo.num_mini_batch}")
    # sb3 calls the schedule with the fraction of training left: the same linear decay as ddppo's LambdaLR
    lr = (lambda left: ppo.lr * left) if ppo.lr_decay else ppo.lr
    policy_cfg = OmegaConf.to_container(cfg.policy)
    policy_kwargs = dict(features_extractor_class=DDPPOFeatures, net_arch=[], normalize_images=False,
                         optimizer_kwargs={"eps": ppo.eps},
                         features_extractor_kwargs={"policy_cfg": policy_cfg, "core_fc": kind == "ppo"})
    common = dict(learning_rate=lr, n_steps=ppo.num_steps, batch_size=batch // ppo.num_mini_batch,
                  n_epochs=ppo.ppo_epoch, gamma=ppo.gamma, gae_lambda=ppo.tau, clip_range=ppo.clip,
                  clip_range_vf=ppo.clip if ppo.clipped_value_loss else None,
                  normalize_advantage=ppo.normalize_advantages, ent_coef=ppo.entropy_coef, vf_coef=ppo.value_coef,
                  max_grad_norm=ppo.max_grad_norm, seed=cfg.seed, device=device, verbose=0)
    if kind == "ppo":
        return PPO("MultiInputPolicy", venv, policy_kwargs=policy_kwargs, **common)
    if kind == "recurrent_ppo":
        # sb3-contrib's defaults otherwise: separate actor and critic LSTMs over the shared encoder (its
        # shared_lstm option would stop the value loss from training the LSTM and the encoder)
        policy_kwargs.update(lstm_hidden_size=cfg.policy.hidden_size, n_lstm_layers=cfg.policy.num_recurrent_layers)
        return RecurrentPPO("MultiInputLstmPolicy", venv, policy_kwargs=policy_kwargs, **common)
    raise ValueError(f"unknown peer {kind!r}; use one of {', '.join(PEERS)}")


def _steady_fps(points: list[tuple[float, int]]) -> float:
    (t_a, s_a), (t_b, s_b) = points[0], points[-1]
    return (s_b - s_a) / max(t_b - t_a, 1e-9)


def _evaluate(cfg: TrainConfig, make_agent, val_episodes: int) -> dict:
    """Every trained agent the same way: the first ``val_episodes`` of val, 8 environments, deterministic actions
    (what ddppo's trainer does at the end of a run)."""
    from ddppo.evaluation.evaluate import evaluate, summarize

    return summarize(evaluate(cfg, make_agent, "val", val_episodes, num_envs=8)) if val_episodes else {}


class LoadSampler:
    """Mean 1-minute load average while a trainer runs, sampled every few seconds in a thread: the trainers run one
    after another, so a wall-clock ratio is only as good as the load was even; this says how even it was."""

    def __init__(self, every_s: float = 5.0):
        self.samples = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return sum(self.samples) / len(self.samples)


def _timing(t0: float, c0: float, frames: int, points: list[tuple[float, int]], load: LoadSampler) -> dict:
    """Wall-clock env-steps/s after the first update, and env-steps per second of this process's CPU time over the
    whole training (start-up included): the CPU rate is what other processes on a shared machine disturb least."""
    cpu = time.process_time() - c0
    return {"fps": _steady_fps(points), "cpu_fps": frames / max(cpu, 1e-9), "frames": frames,
            "wall_s": time.perf_counter() - t0, "cpu_s": cpu, "load": load.stop(), **peak_memory()}


def run_ddppo(cfg: TrainConfig, val_episodes: int, device: str) -> dict:
    from pathlib import Path

    from ddppo.evaluation.episodes import PolicyAgent
    from ddppo.io import checkpoint
    from ddppo.trainer.loop import train

    reset_peak_rss()
    t0, c0, load = time.perf_counter(), time.process_time(), LoadSampler()
    result = train(cfg, fresh=True, log=lambda *_: None, show_progress=False)
    if result["signal"] is not None:
        raise RuntimeError(f"ddppo bench peer: training stopped by signal {result['signal']}")
    out = _timing(t0, c0, result["env_steps"], result["progress"], load)
    weights = checkpoint.load(checkpoint.latest(Path(result["run_dir"]) / "checkpoints"))["policy"]

    def agent(envs):
        policy = Policy(envs.obs_spaces, cfg.policy)
        policy.load_state_dict(weights)
        return PolicyAgent(policy.to(device).eval(), envs.num_envs, device, deterministic=True)

    return {**out, "eval": _evaluate(cfg, agent, val_episodes)}


def run_peer(kind: str, cfg, val_episodes: int, device: str) -> dict:
    from ddppo.sim.environments import make_vector_env

    reset_peak_rss()
    t0, c0, load = time.perf_counter(), time.process_time(), LoadSampler()
    sim_device = resolve_sim_device(cfg.sim.device, device)
    venv = SB3VecEnv(make_vector_env(cfg, cfg.task.split, cfg.ppo.num_envs, seed=cfg.seed, device=sim_device))
    model = make_peer(kind, cfg, venv, device)
    progress = _Progress()
    model.learn(total_timesteps=cfg.total_steps, callback=progress)
    # ddppo's rate starts after its first update: drop the first rollout's start here too
    out = _timing(t0, c0, model.num_timesteps, progress.points[1:], load)
    return {**out, "eval": _evaluate(cfg, lambda envs: SB3Agent(model), val_episodes)}


def in_own_process(fn, *args):
    """``fn(*args)`` in a freshly spawned process (a trainer's process-wide settings die with it)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def bench_peer(overrides: list[str], frames: int = 100_000, val_episodes: int = 100,
               config_file: str | None = None, peers: tuple[str, ...] = PEERS, repeats: int = 1) -> dict:
    """Env-steps/s of ddppo's trainer and of each peer on ``frames`` env-steps, and val success of each at that
    budget, as JSON-ready numbers. ``speedup_vs_<peer>`` = ddppo's env-steps/s ÷ the peer's, like for like: against
    RecurrentPPO ddppo trains the config's recurrent policy (``ddppo``), against feed-forward PPO the same policy
    with a feed-forward core (``ddppo_ff``, ``policy.rnn_type=none``); ``speedup_recurrent_vs_ppo`` compares the
    recurrent one with PPO.

    The trainers run one after another, so a machine whose speed drifts between them (a shared VM: ±5-10% from one
    minute to the next) moves a single ratio as much as the code does. ``repeats`` > 1 runs every trainer that many
    rounds, the order reversed every other round, and reports each ratio as the median of the rounds' ratios
    (``speedups_vs_<peer>`` lists them) and each rate as the median of its rounds (``fps_rounds_<name>``). The runs
    are deterministic, so every round trains the same agents: only the first round's agents are evaluated."""
    from ddppo.bench.throughput import machine
    from ddppo.config import load_config
    from ddppo.sim.dataset_dir import ensure_dataset

    unknown = set(peers) - set(PEERS)
    if unknown:
        raise ValueError(f"unknown peer(s) {sorted(unknown)}; use {', '.join(PEERS)}")
    if repeats < 1:
        raise ValueError(f"--repeats {repeats}: must be at least 1")
    with tempfile.TemporaryDirectory() as tmp:
        # ddppo trains without its own final evaluation: every agent is evaluated after training, by _evaluate
        cfg = load_config(config_file, [*overrides, f"run_dir={tmp}", "name=ddppo", f"total_steps={frames}",
                                        "eval_episodes=0", "eval_interval=0", "log_interval=1000000",
                                        "checkpoint_interval=1000000"])
        per_update = cfg.ppo.num_steps * cfg.ppo.num_envs
        if frames < 2 * per_update:
            raise ValueError(f"--frames {frames}: need at least 2 updates ({2 * per_update} frames) for a rate "
                             "measured after the first update")
        ensure_dataset(cfg.task, cfg.dataset, log=lambda *_: None)
        device = str(resolve_device(cfg.device))
        cfg.device = device  # ddppo and the peers on the same device
        trainers = {"ddppo": (run_ddppo, cfg)}
        if "ppo" in peers and cfg.policy.rnn_type != "none":
            # PPO's network is feed-forward: ddppo trains that network too, for the like-for-like ratio
            ff = copy.deepcopy(cfg)
            ff.policy.rnn_type, ff.name = "none", "ddppo_ff"
            trainers["ddppo_ff"] = (run_ddppo, ff)
        for kind in peers:
            trainers[kind] = (functools.partial(run_peer, kind), cfg)
        rounds: list[dict] = []
        orders = [list(trainers) if r % 2 == 0 else list(reversed(trainers)) for r in range(repeats)]
        for r, order in enumerate(orders):
            rounds.append({name: in_own_process(_run, trainers[name], val_episodes if r == 0 else 0, device)
                           for name in order})
    runs = rounds[0]
    out: dict = {"bench": "peer", "frames": frames, "val_episodes": val_episodes, "repeats": repeats,
                 "round_orders": orders}

    def ours(kind: str) -> str:
        return "ddppo_ff" if kind == "ppo" and "ddppo_ff" in runs else "ddppo"

    pairs = {f"vs_{kind}": (ours(kind), kind) for kind in peers}
    if "ddppo_ff" in runs:  # ddppo's own (recurrent) agent against the feed-forward peer, for the record
        pairs["recurrent_vs_ppo"] = ("ddppo", "ppo")
    for label, (a, b) in pairs.items():
        ratios = [rd[a]["fps"] / rd[b]["fps"] for rd in rounds]
        out[f"speedup_{label}"] = float(np.median(ratios))
        out[f"cpu_speedup_{label}"] = float(np.median([rd[a]["cpu_fps"] / rd[b]["cpu_fps"] for rd in rounds]))
        out[f"speedups_{label}"] = ratios
    for name, r in runs.items():
        out[f"fps_{name}"] = float(np.median([rd[name]["fps"] for rd in rounds]))
        out[f"fps_rounds_{name}"] = [rd[name]["fps"] for rd in rounds]
        out[f"cpu_fps_{name}"] = float(np.median([rd[name]["cpu_fps"] for rd in rounds]))
        out[f"frames_{name}"] = r["frames"]  # each trainer's own count: equal budgets, checked not assumed
        if r["eval"]:
            for k in ("success", "success_ci95", "spl"):
                out[f"val_{k}_{name}"] = r["eval"][k]
        out[f"wall_s_{name}"] = r["wall_s"]
        out[f"loadavg_{name}"] = float(np.mean([rd[name]["load"] for rd in rounds]))
        out[f"peak_rss_mib_{name}"] = r["peak_rss_mib"]
        if "cuda_max_allocated_mib" in r:
            out[f"cuda_max_allocated_mib_{name}"] = r["cuda_max_allocated_mib"]
    out.update(num_envs=cfg.ppo.num_envs, num_steps=cfg.ppo.num_steps, ppo_epoch=cfg.ppo.ppo_epoch,
               num_mini_batch=cfg.ppo.num_mini_batch, lr=cfg.ppo.lr, device=device, config=config_file,
               overrides=overrides, machine=machine())
    return out


def _run(trainer, val_episodes: int, device: str) -> dict:
    fn, cfg = trainer
    return fn(cfg, val_episodes, device)
