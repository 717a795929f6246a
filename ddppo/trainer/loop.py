"""DD-PPO training, top to bottom.

    ddppo train [--config FILE] [--fresh] [key=value ...]
    torchrun --nproc-per-node N ddppo/train.py [--config FILE] [key=value ...]

Every worker steps its own batch of environments, collects a rollout (cut short when enough other workers are
done: straggler preemption), computes PPO gradients over its samples and all-reduces them, weighted by sample
count, so the update equals one over the concatenation of all workers' samples. Running the same command again
resumes the run from its directory; --fresh starts over.

The loop in :func:`train` runs named phases: :func:`collect_rollout`, :func:`update`, :func:`log_progress`,
:func:`evaluate_on_schedule` and :func:`checkpoint_or_stop`, after :func:`set_up` and before :func:`finish`
(docs/design.md draws the data flow).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import numba
import torch
import torch.distributed as dist

from ddppo.config import TimeLimit, TrainConfig, save_config
from ddppo.distributed import (
    RolloutCounter,
    all_reduce_sum,
    broadcast_module,
    init_distributed,
    resolve_sim_device,
)
from ddppo.evaluation.evaluate import evaluate_policy
from ddppo.io.atomic import atomic_write_text
from ddppo.policy import Policy
from ddppo.rl.episode_stats import EpisodeStats
from ddppo.rl.flat_grads import FlatGradients
from ddppo.rl.ppo import bootstrap_truncated, make_adam
from ddppo.rl.storage import RolloutStorage
from ddppo.sim.dataset_dir import ensure_dataset
from ddppo.sim.environments import make_vector_env
from ddppo.sim.kernels.numba_kernels import set_render_threads
from ddppo.trainer.hooks import BenchHooks
from ddppo.trainer.malloc_settings import keep_freed_memory
from ddppo.trainer.peak_memory import peak_memory
from ddppo.trainer.progress import ProgressDisplay
from ddppo.trainer.records import (
    Counters,
    Learned,
    Preemption,
    Progress,
    Rollout,
    RolloutTotals,
    Run,
    StopRequest,
    Timings,
)
from ddppo.trainer.resume import TorchRNG, restore_resume, save_resume, set_aside_previous_run
from ddppo.trainer.tensorboard import TBWriter
from ddppo.trainer.transfer import apply_transfer
from ddppo.trainer.update import ppo_update

EXIT_REQUEUE = 3
"""Exit code after SIGUSR1: the resume state is saved and the run is not finished; requeue or restart me."""


def train(cfg: TrainConfig, fresh: bool = False, log=print, show_progress: bool = True) -> dict:
    """Train until ``cfg.total_steps`` env steps (over all workers), a stop signal, or too many bad updates in a row
    (FloatingPointError); returns the run's final metrics and figures (also written as summary.json)."""
    run = set_up(cfg, fresh, log, show_progress)
    with stop_requests() as stop:
        while run.progress.counters.env_steps < cfg.total_steps:
            rollout = collect_rollout(run)
            learned = update(run, rollout)
            log_progress(run, rollout, learned)
            evaluate_on_schedule(run)
            if checkpoint_or_stop(run, stop):
                break
    return finish(run, stop)


# ----------------------------------------------------------------------------------------------- set-up
def set_up(cfg: TrainConfig, fresh: bool, log, show_progress: bool) -> Run:
    """This worker's process group, run directory, environments, policy and optimiser, resumed from the run
    directory's resume state when it has one."""
    info = init_distributed(cfg.device, cfg.ddppo.backend)
    log = log if info.is_main else (lambda *a, **k: None)
    set_thread_budget(cfg)
    if cfg.keep_freed_memory:
        keep_freed_memory()
    run_dir = Path(cfg.run_dir) / cfg.name
    if info.is_main:
        ensure_dataset(cfg.task, cfg.dataset, log=log)
        run_dir.mkdir(parents=True, exist_ok=True)
        if fresh:
            set_aside_previous_run(run_dir, log)
        save_config(cfg, run_dir / "config.yaml")
    if info.enabled:
        dist.barrier()
    sim_device = resolve_sim_device(cfg.sim.device, info.device)
    envs = make_vector_env(cfg, cfg.task.split, cfg.ppo.num_envs, seed=cfg.seed,
                           env_offset=info.rank * cfg.ppo.num_envs, device=sim_device)
    run = build_learner(cfg, info, run_dir, log, envs, sim_device)
    if (run_dir / "resume.pt").is_file():
        resume(run)
    else:
        run.storage.set_first_observation(run.policy.preprocess(
            {k: v.to(info.device) for k, v in envs.reset().items()}))
    # a resumed run may repeat steps logged after its resume state was saved: drop those points
    purge_step = run.progress.counters.env_steps + 1 if run.progress.resumed_from else None
    run.writer = TBWriter(run_dir / "tb", purge_step=purge_step) if info.is_main else None
    run.display = ProgressDisplay(cfg.total_steps, enabled=info.is_main and show_progress)
    run.display.start(run.progress.counters.env_steps)
    run.progress.t_start = time.perf_counter() - run.progress.counters.wall_time
    return run


def set_thread_budget(cfg: TrainConfig) -> None:
    """torch's threads (``num_threads``, else SLURM's CPUs per task), and the same number for the simulator's numba
    kernels: otherwise every rank of a torchrun job renders (and, through the OpenMP runtime both share, runs
    torch) on all the machine's cores."""
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    elif "SLURM_CPUS_PER_TASK" in os.environ and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(int(os.environ["SLURM_CPUS_PER_TASK"]))
    set_render_threads(torch.get_num_threads())


def build_learner(cfg: TrainConfig, info, run_dir: Path, log, envs, sim_device: torch.device) -> Run:
    """The policy (the same initial weights on every rank), its optimiser and schedule, and the rollout's storage."""
    torch.manual_seed(cfg.seed)  # same initial weights everywhere; the broadcast below makes it certain
    policy = Policy(envs.obs_spaces, cfg.policy).to(info.device)
    broadcast_module(policy, info)
    torch.manual_seed(cfg.seed + 1000 * info.rank)  # each worker samples its own actions
    # transferred weights (cfg.transfer), frozen parts left out, the visual pathway in its own lr group
    params, param_groups = apply_transfer(policy, cfg, run_dir, log, write=info.is_main)
    optimizer = make_adam(param_groups, lr=cfg.ppo.lr, eps=cfg.ppo.eps)
    counters = Counters(world_size=info.world_size)
    # linear decay by the fraction of total_steps done (habitat-baselines' percent_done), not by a planned update
    # count: preempted rollouts are shorter, so a run takes more updates than full rollouts would
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda _: max(0.0, 1 - counters.env_steps / cfg.total_steps) if cfg.ppo.lr_decay else 1.0
    )
    storage = RolloutStorage(cfg.ppo.num_steps, cfg.ppo.num_envs, policy.storage_spaces(envs.obs_spaces),
                             (policy.num_hidden_layers, cfg.policy.hidden_size), info.device)
    return Run(
        cfg=cfg, info=info, run_dir=run_dir, log=log, envs=envs, sim_device=sim_device, policy=policy,
        optimizer=optimizer, scheduler=scheduler,
        grads=FlatGradients(params),  # zeroed, all-reduced and clipped as one buffer
        storage=storage, counter=RolloutCounter(info), progress=Progress(counters),
        episodes=EpisodeStats(cfg.ppo.num_envs, envs.episode_metrics),
        preemption=Preemption.from_config(cfg, info), hooks=BenchHooks(cfg.ddppo, info.rank),
        # the rollout loop's settings as plain values: OmegaConf attribute reads are slow, and a step makes several
        num_steps=cfg.ppo.num_steps, gamma=cfg.ppo.gamma,
        bootstrap_time_limits=cfg.ppo.time_limit == TimeLimit.bootstrap,  # else terminal (habitat-baselines)
    )


def shared_components(run: Run) -> dict:
    """What every rank holds alike, saved once by rank 0 (ddppo.trainer.resume): ``state`` is the run's counters."""
    return {"policy": run.policy, "optimizer": run.optimizer, "scheduler": run.scheduler,
            "state": run.progress.counters}


def rank_components(run: Run) -> dict:
    """What each rank saves for itself: its RNG, environments (mid-episode, with their episode iterators), the
    storage's live steps, and its windows of episode metrics and straggler figures."""
    return {"rng": TorchRNG(), "envs": run.envs, "storage": run.storage, "episodes": run.episodes,
            "sync_window": run.progress.window}


def resume(run: Run) -> None:
    """Continue from the run directory's resume state (ddppo.trainer.resume), every component as saved."""
    restore_resume(run.run_dir, run.info, shared_components(run), rank_components(run))
    counters = run.progress.counters
    run.counter.round = run.progress.resumed_from = counters.update
    run.log(f"resumed {run.run_dir} at update {counters.update}, {counters.env_steps} env steps")


# ----------------------------------------------------------------------------------------------- rollout
def collect_rollout(run: Run) -> Rollout:
    """Step the environments with the policy, storing what it saw and did, for ``ppo.num_steps`` steps or until
    preempted (:meth:`Preemption.stop_after`)."""
    policy, storage = run.policy, run.storage
    policy.eval()
    t0 = time.perf_counter()
    t_sim = t_act = 0.0
    for t in range(run.num_steps):
        ta = time.perf_counter()
        with torch.inference_mode():  # lighter than no_grad: no version counters
            obs_t = {k: v[t] for k, v in storage.obs.items()}
            actions, log_probs, values, hidden = policy.act(obs_t, storage.prev_actions[t], storage.masks[t],
                                                            storage.hidden[t])
        tb = time.perf_counter()
        result = run.envs.step(actions.to(run.sim_device))
        run.hooks.after_env_step()
        tc = time.perf_counter()
        t_act += tb - ta
        t_sim += tc - tb
        store_step(run, result, actions, log_probs, values, hidden)
        if run.preemption.stop_after(t + 1, run.counter):
            break
    run.counter.finished()
    run.hooks.after_rollout(t_sim, storage.step)
    return Rollout(storage.step, time.perf_counter() - t0, t_sim, t_act)


def store_step(run: Run, result, actions, log_probs, values, hidden) -> None:
    """One step's transition into the storage and the episode statistics; an episode cut by the time limit is
    bootstrapped from the value of its last observation unless ``ppo.time_limit=terminal``."""
    device = run.info.device
    rewards = result.reward.to(device)
    if run.bootstrap_time_limits and result.truncated.any():  # not terminal: bootstrap from V(final obs)
        with torch.inference_mode():
            final_obs = {k: v.to(device) for k, v in result.final_obs.items()}
            _, final_values, _ = run.policy(final_obs, actions, torch.ones_like(rewards), hidden)
        rewards = bootstrap_truncated(rewards, result.truncated.to(device), final_values, run.gamma)
    not_done = (~result.done.to(device)).float()
    stored_obs = run.policy.preprocess({k: v.to(device) for k, v in result.obs.items()})
    run.storage.insert(stored_obs, hidden, actions, log_probs, values, rewards, not_done, not_done)
    run.episodes.add(result.reward, result.done, result.info)


# ----------------------------------------------------------------------------------------------- update
def update(run: Run, rollout: Rollout) -> Learned:
    """Returns from where the rollout stopped (full or preempted), the PPO update over every worker's samples,
    and the counters and learning rate moved on."""
    cfg, info, policy, storage = run.cfg, run.info, run.policy, run.storage
    t_start = time.perf_counter()
    with torch.no_grad():
        s = storage.step
        last = {k: v[s] for k, v in storage.obs.items()}
        _, next_value, _ = policy(last, storage.prev_actions[s], storage.masks[s], storage.hidden[s])
    storage.compute_returns(next_value, cfg.ppo.gamma, cfg.ppo.tau)
    policy.train()  # from here on the visual normaliser updates (a collective: same count on every rank)
    t_wait = time.perf_counter()  # the first collective after the rollout: a fast rank waits here
    totals = RolloutTotals(*all_reduce_sum([storage.num_samples, float(rollout.steps < run.num_steps),
                                            rollout.steps / run.num_steps], info).tolist())
    t_wait = time.perf_counter() - t_wait
    stats = ppo_update(policy, run.optimizer, run.grads, storage, cfg.ppo, info, cfg.ddppo.grad_weighting)
    count_bad_update(run, stats.skipped)
    storage.after_update()
    run.counter.next_round()
    learned = Learned(stats, totals, time.perf_counter() - t_start, t_wait)
    counters = run.progress.counters
    counters.update += 1
    counters.env_steps += int(totals.samples)
    if not stats.skipped:  # a skipped update learned nothing: the schedule does not step for it
        run.scheduler.step()  # the next update's lr, from the steps done so far
    counters.wall_time = time.perf_counter() - run.progress.t_start
    run.hooks.after_update(counters.env_steps)
    return learned


def count_bad_update(run: Run, skipped: bool) -> None:
    """A NaN/Inf loss or gradient made ppo_update roll the update back: count it (too many in a row stop the run in
    :func:`checkpoint_or_stop`)."""
    counters = run.progress.counters
    if not skipped:
        counters.bad_in_a_row = 0
        return
    counters.skipped_updates += 1
    counters.bad_in_a_row += 1
    run.log(f"update {counters.update + 1}: NaN/Inf loss or gradient, update skipped ({counters.bad_in_a_row} in a "
            f"row, at most ppo.max_bad_updates={run.cfg.ppo.max_bad_updates})")


def diverged(run: Run) -> bool:
    return run.progress.counters.bad_in_a_row >= run.cfg.ppo.max_bad_updates


# ----------------------------------------------------------------------------------------------- log
def log_progress(run: Run, rollout: Rollout, learned: Learned) -> None:
    """The progress display every update; every ``log_interval`` updates (and at the end) the metrics, all-reduced
    over ranks, to TensorBoard (rank 0)."""
    cfg, info, progress = run.cfg, run.info, run.progress
    counters = progress.counters
    timing = Timings(*(all_reduce_sum([rollout.seconds, learned.seconds, rollout.sim_seconds, rollout.act_seconds,
                                       learned.wait_seconds], info) / info.world_size).tolist())
    progress.window.add(learned.totals.preempted_ranks, learned.totals.rollout_fraction / info.world_size, timing.wait)
    run.display.update(counters.env_steps, run.progress.metrics)
    if counters.update % cfg.log_interval and counters.env_steps < cfg.total_steps and not diverged(run):
        return
    episodes = run.episodes.summarize(all_reduce_sum(run.episodes.take(), info).tolist())
    counters.episodes += episodes.episodes
    samples = learned.totals.samples
    run.progress.metrics = {
        **episodes.means,
        "perf/fps": counters.env_steps / max(counters.wall_time, 1e-9),
        "perf/env_fps": samples / max(timing.rollout, 1e-9),
        "perf/learner_fps": samples / max(timing.learn, 1e-9),
        "perf/sim_time_frac": timing.sim / max(timing.rollout + timing.learn, 1e-9),
        **learned.stats.metrics(), "lr": run.scheduler.get_last_lr()[0],
        "train/skipped_updates": counters.skipped_updates,
        **run.progress.window.metrics(),
        "ddppo/episodes": counters.episodes,
    }
    run.progress.window.reset()
    if run.writer:
        run.writer.scalars(run.progress.metrics, counters.env_steps)
    run.display.update(counters.env_steps, run.progress.metrics)


def evaluate_on_schedule(run: Run) -> None:
    cfg = run.cfg
    if cfg.eval_interval and cfg.eval_episodes and run.progress.counters.update % cfg.eval_interval == 0:
        evaluate_on_val(run)


def evaluate_on_val(run: Run) -> dict:
    """``eval_episodes`` val episodes, shared by all ranks (each runs its share), logged as eval/*."""
    evaluation = evaluate_policy(run.policy, run.cfg, "val", run.cfg.eval_episodes, device=run.info.device,
                                 info=run.info)
    if run.writer:
        run.writer.scalars({f"eval/{k}": v for k, v in evaluation.items() if not k.endswith("_ci95")},
                           run.progress.counters.env_steps)
    return evaluation


# ----------------------------------------------------------------------------------------------- checkpoint / stop
def checkpoint_or_stop(run: Run, stop: StopRequest) -> bool:
    """The resume state and a checkpoint, on schedule, at the end, or when a signal asked to stop (then True);
    FloatingPointError after ``ppo.max_bad_updates`` bad updates in a row."""
    cfg, counters = run.cfg, run.progress.counters
    stopping = agree_on_stop(stop, run.info)
    finished = counters.env_steps >= cfg.total_steps
    if counters.update % cfg.checkpoint_interval == 0 or finished or stopping or diverged(run):
        save_resume(run.run_dir, run.info, shared_components(run), rank_components(run), cfg)
    if diverged(run):  # the skipped updates left the weights alone: the state just saved predates the first
        if run.writer:
            run.writer.close()
        first = counters.update - counters.bad_in_a_row + 1
        raise FloatingPointError(
            f"{counters.bad_in_a_row} updates in a row (updates {first}-{counters.update}) had a NaN/Inf loss "
            f"or gradient and were skipped; stopped. The resume state in {run.run_dir} holds the weights from "
            "before them: lower ppo.lr, check the observations, or raise ppo.max_bad_updates, then resume")
    if stopping:
        run.log(f"signal {stop.signal} received: saved resume state at update {counters.update}; exiting")
    return stopping


def agree_on_stop(stop: StopRequest, info) -> bool:
    """Whether a stop signal arrived on any rank (SIGUSR1 wins over SIGTERM), recorded in ``stop`` on every rank:
    all ranks must stop at the same update."""
    usr1, term = all_reduce_sum([float(stop.signal == signal.SIGUSR1), float(stop.signal == signal.SIGTERM)],
                                info).tolist()
    if usr1 > 0 or term > 0:
        stop.signal = signal.SIGUSR1 if usr1 > 0 else signal.SIGTERM
        return True
    return False


@contextlib.contextmanager
def stop_requests(signals=(signal.SIGTERM, signal.SIGUSR1)):
    """Turn SIGTERM / SIGUSR1 into a request acted on at the next update boundary, where the state is consistent;
    the previous handlers come back afterwards."""
    request = StopRequest()

    def on_signal(signum, _frame):
        request.signal = signum

    previous = {sig: signal.signal(sig, on_signal) for sig in signals}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------------------------- finish
def finish(run: Run, stop: StopRequest) -> dict:
    """The run's result: counters, the last metrics, the benchmark figures, a final evaluation when the run is done,
    every rank's peak memory and threads; rank 0 writes it as summary.json."""
    cfg, info, counters = run.cfg, run.info, run.progress.counters
    run.display.stop()
    result = {"env_steps": counters.env_steps, "updates": counters.update, "run_dir": str(run.run_dir),
              "resumed_from_update": run.progress.resumed_from, "signal": stop.signal, **run.hooks.results(run.policy),
              **run.progress.metrics}
    if cfg.eval_episodes > 0 and counters.env_steps >= cfg.total_steps:
        ev = result["eval"] = evaluate_on_val(run)
        run.log(f"val ({ev['episodes']} episodes): "  # the task's own metrics (PointNav: success, SPL, ...)
                + ", ".join(f"{k} {ev[k]:.3f} ± {ev[k + '_ci95']:.3f}" for k in run.envs.episode_metrics))
    if run.writer:
        run.writer.close()
    result.update(per_rank_resources(info))
    if info.is_main:
        summary = {k: v for k, v in result.items() if k != "progress"}
        atomic_write_text(run.run_dir / "summary.json", json.dumps(summary, indent=1, default=float))
    if info.enabled:
        dist.destroy_process_group()  # no barrier: the other ranks need not wait for rank 0's evaluation
    return result


def per_rank_resources(info) -> dict[str, list[float]]:
    """Every rank's peak memory and thread budget, in rank order (a collective: all ranks get here)."""
    mine = {**peak_memory(), "torch_threads": torch.get_num_threads(), "render_threads": numba.get_num_threads()}
    out = {}
    for key, value in mine.items():  # the same keys on every rank: all of them use CUDA or none does
        slots = torch.zeros(info.world_size, dtype=torch.float64)
        slots[info.rank] = value
        out[f"{key}_per_rank"] = all_reduce_sum(slots, info).tolist()
    return out
