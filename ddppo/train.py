"""DD-PPO training, top to bottom.

    ddppo train [--config FILE] [--fresh] [key=value ...]
    torchrun --nproc-per-node N ddppo/train.py [--config FILE] [key=value ...]

Every worker steps its own batch of environments, collects a rollout (cut short when enough other workers are
done: straggler preemption), computes PPO gradients over its samples and all-reduces them, weighted by sample
count, so the update equals one over the concatenation of all workers' samples. Running the same command again
resumes the run from its directory; --fresh starts over.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (torchrun ddppo/train.py): import the package, not its files
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import numba  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from ddppo.atomic import atomic_write_text  # noqa: E402
from ddppo.config import load_config, save_config  # noqa: E402
from ddppo.distributed import (  # noqa: E402
    RolloutCounter,
    all_reduce_sum,
    broadcast_module,
    init_distributed,
    resolve_sim_device,
)
from ddppo.envs import make_vector_env  # noqa: E402
from ddppo.evaluation import evaluate_policy  # noqa: E402
from ddppo.memory import keep_freed_memory, peak_memory  # noqa: E402
from ddppo.policy import build_policy  # noqa: E402
from ddppo.resume import load_resume, save_resume, set_aside_previous_run  # noqa: E402
from ddppo.rl.episode_stats import EpisodeStats  # noqa: E402
from ddppo.rl.flat_grads import FlatGradients  # noqa: E402
from ddppo.rl.ppo import bootstrap_truncated, make_adam, normalized_advantages, ppo_loss  # noqa: E402
from ddppo.rl.storage import RolloutStorage  # noqa: E402
from ddppo.sim.data import ensure_dataset  # noqa: E402
from ddppo.sim.render import set_render_threads  # noqa: E402
from ddppo.telemetry import ProgressDisplay, TBWriter  # noqa: E402
from ddppo.transfer.loading import apply_transfer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="ddppo train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="YAML file overriding the defaults")
    p.add_argument("--fresh", action="store_true", help="ignore an existing run directory's resume state")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. ppo.num_envs=8")
    return p.parse_args(argv)


def train(cfg, fresh: bool = False, log=print, show_progress: bool = True) -> dict:
    # ------------------------------------------------------------------------------------------- set-up
    info = init_distributed(cfg.device, cfg.ddppo.backend)
    main = info.is_main
    log = log if main else (lambda *a, **k: None)
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    elif "SLURM_CPUS_PER_TASK" in os.environ and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(int(os.environ["SLURM_CPUS_PER_TASK"]))
    # the simulator's numba kernels get the same thread budget as torch: otherwise every rank of a torchrun job
    # renders (and, through the OpenMP runtime both share, runs torch) on all the machine's cores
    set_render_threads(torch.get_num_threads())
    if cfg.keep_freed_memory:
        keep_freed_memory()
    run_dir = Path(cfg.run_dir) / cfg.name
    if main:
        ensure_dataset(cfg.task, cfg.dataset, log=log)
        run_dir.mkdir(parents=True, exist_ok=True)
        if fresh:
            set_aside_previous_run(run_dir, log)
        save_config(cfg, run_dir / "config.yaml")
    if info.enabled:
        dist.barrier()
    sim_device = resolve_sim_device(cfg.sim.device, info.device)
    n_envs = cfg.ppo.num_envs
    envs = make_vector_env(cfg, cfg.task.split, n_envs, seed=cfg.seed, env_offset=info.rank * n_envs,
                           device=sim_device)

    torch.manual_seed(cfg.seed)  # same initial weights everywhere; the broadcast below makes it certain
    policy = build_policy(cfg.policy, envs.obs_spaces).to(info.device)
    broadcast_module(policy, info)
    torch.manual_seed(cfg.seed + 1000 * info.rank)  # each worker samples its own actions
    # transferred weights (cfg.transfer), frozen parts left out, the visual pathway in its own lr group
    params, param_groups = apply_transfer(policy, cfg, run_dir, log, write=main)
    optimizer = make_adam(param_groups, lr=cfg.ppo.lr, eps=cfg.ppo.eps)
    grads = FlatGradients(params)  # zeroed, all-reduced and clipped as one buffer
    storage = RolloutStorage(cfg.ppo.num_steps, n_envs, policy.storage_spaces(envs.obs_spaces),
                             (policy.num_hidden_layers, cfg.policy.hidden_size), info.device)
    counter = RolloutCounter(info)
    state = {"update": 0, "env_steps": 0, "episodes": 0, "wall_time": 0.0, "world_size": info.world_size,
             "skipped_updates": 0, "bad_in_a_row": 0}
    # linear decay by the fraction of total_steps done (habitat-baselines' percent_done), not by a planned update
    # count: preempted rollouts are shorter, so a run takes more updates than full rollouts would
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda _: max(0.0, 1 - state["env_steps"] / cfg.total_steps) if cfg.ppo.lr_decay else 1.0
    )

    episodes = EpisodeStats(n_envs, envs.episode_metrics)  # returns, and sums over episodes ended since the last log
    dd_window = torch.zeros(4, dtype=torch.float64)  # preempted ranks, rollout fraction, updates, wait seconds
    resumed_from = 0
    resume_path = run_dir / "resume.pt"
    if resume_path.is_file():
        shared, mine = load_resume(run_dir, info)
        policy.load_state_dict(shared["policy"])
        optimizer.load_state_dict(shared["optimizer"])
        scheduler.load_state_dict(shared["scheduler"])
        state.update(shared["state"])
        torch.set_rng_state(mine["torch_rng"])
        envs.load_state_dict(mine["envs"])
        first_obs = policy.preprocess({k: v.to(info.device) for k, v in envs.observe().items()})
        storage.set_first_observation(first_obs, mine["hidden"].to(info.device), mine["masks"].to(info.device))
        storage.prev_actions[0].copy_(mine["prev_actions"])
        episodes.load_state_dict(mine)
        dd_window.copy_(mine["dd_window"])
        counter.round = state["update"]
        resumed_from = state["update"]
        log(f"resumed {run_dir} at update {state['update']}, {state['env_steps']} env steps")
    else:
        storage.set_first_observation(policy.preprocess({k: v.to(info.device) for k, v in envs.reset().items()}))

    # a resumed run may repeat steps logged after its resume state was saved: drop those points
    writer = TBWriter(run_dir / "tb", purge_step=state["env_steps"] + 1 if resumed_from else None) if main else None
    display = ProgressDisplay(cfg.total_steps, enabled=main and show_progress)
    sim_seconds, rollout_steps_total = 0.0, 0  # this rank's simulator time, for benchmarks
    display.start(state["env_steps"])
    t_start = time.perf_counter() - state["wall_time"]
    metrics: dict[str, float] = {}
    progress: list[tuple[float, int]] = []  # (wall clock, env steps) after each update, for benchmarks

    # the rollout loop's settings as plain numbers: an OmegaConf attribute read costs ~25 us, several per step
    num_steps, gamma = cfg.ppo.num_steps, cfg.ppo.gamma
    bootstrap_time_limits = cfg.ppo.time_limit == "bootstrap"  # else a time limit is terminal (habitat-baselines)
    slowdown = cfg.ddppo.slowdown if info.rank == cfg.ddppo.slow_rank else 0.0
    # straggler preemption: once sync_frac of the workers are done, stop at any step past min_rollout_frac
    preempt = info.enabled and cfg.ddppo.preemption
    preempt_quorum = cfg.ddppo.sync_frac * info.world_size
    preempt_from = cfg.ddppo.min_rollout_frac * num_steps

    # ------------------------------------------------------------------------------------------- loop
    with stop_requests() as stop_signal:
        while state["env_steps"] < cfg.total_steps:
            # ---- rollout
            policy.eval()
            t0 = time.perf_counter()
            t_sim = t_act = 0.0
            for t in range(num_steps):
                ta = time.perf_counter()
                with torch.inference_mode():  # lighter than no_grad (no version counters): ~6% of an action
                    obs_t = {k: v[t] for k, v in storage.obs.items()}
                    actions, log_probs, values, hidden = policy.act(
                        obs_t, storage.prev_actions[t], storage.masks[t], storage.hidden[t]
                    )
                tb = time.perf_counter()
                result = envs.step(actions.to(sim_device))
                if slowdown > 0:
                    time.sleep(slowdown)
                tc = time.perf_counter()
                t_act += tb - ta
                t_sim += tc - tb
                rewards = result.reward.to(info.device)
                if bootstrap_time_limits and result.truncated.any():  # not terminal: bootstrap from V(final obs)
                    with torch.inference_mode():
                        final_obs = {k: v.to(info.device) for k, v in result.final_obs.items()}
                        _, final_values, _ = policy(final_obs, actions, torch.ones_like(rewards), hidden)
                    rewards = bootstrap_truncated(rewards, result.truncated.to(info.device), final_values, gamma)
                not_done = (~result.done.to(info.device)).float()
                stored_obs = policy.preprocess({k: v.to(info.device) for k, v in result.obs.items()})
                storage.insert(stored_obs, hidden, actions, log_probs, values, rewards, not_done, not_done)
                episodes.add(result.reward, result.done, result.info)
                if preempt and preempt_from <= t + 1 < num_steps and counter.count() >= preempt_quorum:
                    break
            counter.finished()
            rollout_steps = storage.step
            sim_seconds += t_sim
            rollout_steps_total += rollout_steps
            t_rollout = time.perf_counter() - t0

            # ---- update
            t1 = time.perf_counter()
            with torch.no_grad():  # bootstrap from where the rollout stopped (full or preempted)
                last = {k: v[storage.step] for k, v in storage.obs.items()}
                _, next_value, _ = policy(last, storage.prev_actions[storage.step], storage.masks[storage.step],
                                          storage.hidden[storage.step])
            storage.compute_returns(next_value, cfg.ppo.gamma, cfg.ppo.tau)
            policy.train()  # from here on the visual normaliser updates (a collective: same count on every rank)
            t_wait = time.perf_counter()  # the first collective after the rollout: a fast rank waits here
            totals = all_reduce_sum([storage.num_samples, float(rollout_steps < num_steps),
                                     rollout_steps / num_steps], info)
            t_wait = time.perf_counter() - t_wait
            global_samples = int(totals[0])
            losses = ppo_update(policy, optimizer, grads, storage, cfg.ppo, info, cfg.ddppo.grad_weighting)
            if losses[6] > 0:  # NaN/Inf: ppo_update rolled the update back; too many in a row stop the run below
                state["skipped_updates"] += 1
                state["bad_in_a_row"] += 1
                log(f"update {state['update'] + 1}: NaN/Inf loss or gradient, update skipped "
                    f"({state['bad_in_a_row']} in a row, at most ppo.max_bad_updates={cfg.ppo.max_bad_updates})")
            else:
                state["bad_in_a_row"] = 0
            diverged = state["bad_in_a_row"] >= cfg.ppo.max_bad_updates
            storage.after_update()
            counter.next_round()
            t_learn = time.perf_counter() - t1

            state["update"] += 1
            state["env_steps"] += global_samples
            if losses[6] == 0:  # a skipped update learned nothing: the schedule does not step for it
                scheduler.step()  # the next update's lr, from the steps done so far
            state["wall_time"] = time.perf_counter() - t_start
            progress.append((time.perf_counter(), state["env_steps"]))

            # ---- logging (metrics all-reduced, written by rank 0)
            timing = all_reduce_sum([t_rollout, t_learn, t_sim, t_act, t_wait], info) / info.world_size
            dd_window += torch.tensor([totals[1].item(), totals[2].item() / info.world_size, 1.0, timing[4].item()],
                                      dtype=torch.float64)
            display.update(state["env_steps"], metrics)
            if state["update"] % cfg.log_interval == 0 or state["env_steps"] >= cfg.total_steps or diverged:
                ep = all_reduce_sum(episodes.take(), info).tolist()
                state["episodes"] += int(ep[0])
                metrics = episodes.means(ep)
                fps = state["env_steps"] / max(state["wall_time"], 1e-9)
                metrics.update({
                    "perf/fps": fps,
                    "perf/env_fps": global_samples / max(timing[0].item(), 1e-9),
                    "perf/learner_fps": global_samples / max(timing[1].item(), 1e-9),
                    "perf/sim_time_frac": timing[2].item() / max(timing[0].item() + timing[1].item(), 1e-9),
                    "loss/policy": losses[0].item(), "loss/value": losses[1].item(), "loss/entropy": losses[2].item(),
                    "loss/approx_kl": losses[3].item(), "loss/clip_fraction": losses[4].item(),
                    "loss/grad_norm": losses[5].item(), "lr": scheduler.get_last_lr()[0],
                    "train/skipped_updates": state["skipped_updates"],
                    "ddppo/preempted_ranks": (dd_window[0] / dd_window[2]).item(),
                    "ddppo/rollout_fraction": (dd_window[1] / dd_window[2]).item(),
                    "ddppo/wait_s": (dd_window[3] / dd_window[2]).item(),
                    "ddppo/episodes": state["episodes"],
                })
                dd_window.zero_()
                if writer:
                    writer.scalars(metrics, state["env_steps"])
                display.update(state["env_steps"], metrics)

            # ---- periodic evaluation on val, shared by all ranks (each runs its share of the episodes)
            if cfg.eval_interval and cfg.eval_episodes and state["update"] % cfg.eval_interval == 0:
                evaluation = evaluate_policy(policy, cfg, "val", cfg.eval_episodes, device=info.device, info=info)
                if writer:
                    writer.scalars({f"eval/{k}": v for k, v in evaluation.items() if not k.endswith("_ci95")},
                                   state["env_steps"])

            # ---- checkpoint / resume state (on schedule, at the end, or when asked to stop by a signal)
            # every rank must stop at the same update: agree on whether (and which) signal arrived anywhere
            usr1, term = all_reduce_sum([float(stop_signal["sig"] == signal.SIGUSR1),
                                         float(stop_signal["sig"] == signal.SIGTERM)], info).tolist()
            flag = usr1 > 0 or term > 0
            if flag:
                stop_signal["sig"] = signal.SIGUSR1 if usr1 > 0 else signal.SIGTERM
            finished = state["env_steps"] >= cfg.total_steps
            if state["update"] % cfg.checkpoint_interval == 0 or finished or flag or diverged:
                save_resume(run_dir, info, policy, optimizer, scheduler, state, envs, storage, cfg,
                            {"dd_window": dd_window, **episodes.state_dict()})
            if diverged:  # the skipped updates left the weights alone: the state just saved predates the first
                if writer:
                    writer.close()
                first = state["update"] - state["bad_in_a_row"] + 1
                raise FloatingPointError(
                    f"{state['bad_in_a_row']} updates in a row (updates {first}-{state['update']}) had a NaN/Inf loss "
                    f"or gradient and were skipped; stopped. The resume state in {run_dir} holds the weights from "
                    "before them: lower ppo.lr, check the observations, or raise ppo.max_bad_updates, then resume")
            if flag:
                log(f"signal {stop_signal['sig']} received: saved resume state at update {state['update']}; exiting")
                break

    display.stop()
    if writer:
        writer.close()
    with torch.no_grad():  # lets callers check that every rank ended with the same weights
        checksum = sum(float(t.double().sum()) for t in policy.state_dict().values() if t.is_floating_point())
    result = {"env_steps": state["env_steps"], "updates": state["update"], "run_dir": str(run_dir),
              "resumed_from_update": resumed_from, "signal": stop_signal["sig"], "param_checksum": checksum,
              "progress": progress, "sim_s_per_step": sim_seconds / max(1, rollout_steps_total), **metrics}
    if len(progress) > 1:  # throughput after the first update (start-up, compilation and cache fills excluded)
        (t_a, s_a), (t_b, s_b) = progress[0], progress[-1]
        result["steady_fps"] = (s_b - s_a) / max(t_b - t_a, 1e-9)
    if cfg.eval_episodes > 0 and state["env_steps"] >= cfg.total_steps:
        result["eval"] = evaluate_policy(policy, cfg, split="val", num_episodes=cfg.eval_episodes,
                                         device=info.device, info=info)
        ev = result["eval"]
        log(f"val ({ev['episodes']} episodes): "  # the task's own metrics (PointNav: success, SPL, ...)
            + ", ".join(f"{k} {ev[k]:.3f} ± {ev[k + '_ci95']:.3f}" for k in envs.episode_metrics))
        if main:
            w = TBWriter(run_dir / "tb")
            w.scalars({f"eval/{k}": v for k, v in ev.items() if not k.endswith("_ci95")}, state["env_steps"])
            w.close()
    # every rank's peak memory and thread budget, in rank order (a collective: all ranks get here), for the summary
    # and benchmarks
    per_rank = {**peak_memory(), "torch_threads": torch.get_num_threads(), "render_threads": numba.get_num_threads()}
    for key, value in per_rank.items():  # the same keys on every rank: all of them use CUDA or none does
        slots = torch.zeros(info.world_size, dtype=torch.float64)
        slots[info.rank] = value
        result[f"{key}_per_rank"] = all_reduce_sum(slots, info).tolist()
    if main:
        summary = {k: v for k, v in result.items() if k != "progress"}
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1, default=float))
    if info.enabled:
        dist.destroy_process_group()  # no barrier: the other ranks need not wait for rank 0's evaluation
    return result


def ppo_update(policy, optimizer, grads: FlatGradients, storage: RolloutStorage, ppo, info,
               grad_weighting: str = "samples") -> torch.Tensor:
    """PPO epochs over environment-split minibatches. Each rank sums its per-sample losses and divides by the
    minibatch's sample count over all ranks, and gradients are summed across ranks: the update equals a single
    process's update on the concatenated samples, whatever share each rank collected. (``grad_weighting="ranks"``
    divides by its own count times the number of ranks instead: each rank's mean gradient, averaged with equal
    weight, as habitat-baselines' DistributedDataParallel does.)

    With ``ppo.normalize_advantages`` the rollout's advantages (``storage.advantages``, replaced in place) are
    normalised first, with the mean and variance of every rank's rollout (all-reduced), so this stays one update
    over the concatenation of all workers' samples.

    A NaN/Inf loss on any rank, or a NaN/Inf gradient, skips the whole update on every rank: the policy (weights
    and normaliser statistics) and the optimiser go back to where they were before it.

    Returns the mean policy loss, value loss, entropy, approx KL, clip fraction and grad norm (all ranks), and
    1 in a 7th place when the update was skipped (the losses are NaN then)."""
    # what to roll back to: earlier minibatches' steps and the normaliser's statistics of a bad batch must go too
    before = ({k: v.detach().clone() for k, v in policy.state_dict().items()}, optimizer_snapshot(optimizer))
    sums = torch.zeros(6, dtype=torch.float64)
    n_minibatches = 0
    bad = False
    if ppo.normalize_advantages:
        valid = storage.advantages[: storage.step]
        valid.copy_(normalized_advantages(valid, lambda values: all_reduce_sum(values, info)))
    for _epoch in range(ppo.ppo_epoch):
        if bad:
            break
        for batch in storage.minibatches(ppo.num_mini_batch):
            # NaN logits give a NaN loss, caught below on every rank
            log_probs, values, entropy = policy.evaluate_actions(
                batch["obs"], batch["prev_actions"], batch["masks"], batch["hidden0"], batch["actions"]
            )
            loss, terms = ppo_loss(
                log_probs, batch["old_log_probs"], batch["advantages"], values, batch["old_values"],
                batch["returns"], entropy, clip=ppo.clip, value_coef=ppo.value_coef,
                entropy_coef=ppo.entropy_coef, clipped_value_loss=ppo.clipped_value_loss,
                value_clip=ppo.value_clip, reduction="sum",
            )
            # a bad loss on any rank rides on the sample-count all-reduce, so every rank skips together
            n_global, n_bad = all_reduce_sum([batch["num_samples"], float(not torch.isfinite(loss))], info).tolist()
            if n_bad > 0:
                bad = True
                break
            grads.zero_()
            (loss / (n_global if grad_weighting == "samples" else batch["num_samples"] * info.world_size)).backward()
            if info.enabled:
                grads.all_reduce_()
            grad_norm = grads.clip_norm_(ppo.max_grad_norm)
            if not torch.isfinite(grad_norm):  # all-reduced gradients: every rank has this same norm
                bad = True
                break
            optimizer.step()
            keys = ("policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction")
            sums[:5] += torch.tensor([terms[k].item() for k in keys], dtype=torch.float64) / n_global
            sums[5] += grad_norm.item() / info.world_size
            n_minibatches += 1
    if bad:
        policy.load_state_dict(before[0])
        optimizer.load_state_dict(before[1])
        grads.zero_()
        return torch.tensor([math.nan] * 6 + [1.0], dtype=torch.float64)
    # sums[:5] are already global means per minibatch once summed over ranks
    return torch.cat([all_reduce_sum(sums.tolist(), info) / n_minibatches, torch.zeros(1, dtype=torch.float64)])


def optimizer_snapshot(optimizer: torch.optim.Optimizer) -> dict:
    """A copy of the optimiser's state dict to roll back to: its tensors cloned, the rest deep-copied (a deepcopy
    of the whole dict walked every tensor in Python: ~4% of a quickstart update)."""
    state = optimizer.state_dict()
    return {"state": {k: {n: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for n, v in s.items()}
                      for k, s in state["state"].items()},
            "param_groups": copy.deepcopy(state["param_groups"])}


@contextlib.contextmanager
def stop_requests(signals=(signal.SIGTERM, signal.SIGUSR1)):
    """Turn SIGTERM / SIGUSR1 into a request acted on at the next update boundary, where the state is consistent;
    the previous handlers come back afterwards."""
    request = {"sig": None}

    def on_signal(signum, _frame):
        request["sig"] = signum

    previous = {sig: signal.signal(sig, on_signal) for sig in signals}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


EXIT_REQUEUE = 3
"""Exit code after SIGUSR1: the resume state is saved and the run is not finished; requeue or restart me."""


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        result = train(cfg, fresh=args.fresh)
    # bad input, a diverged run, a full disk: one line naming the problem, no traceback
    except (ValueError, OSError, FloatingPointError) as e:
        print(f"ddppo train: error: {e}", file=sys.stderr)
        return 2
    return EXIT_REQUEUE if result["signal"] == signal.SIGUSR1 else 0


if __name__ == "__main__":
    sys.exit(main())
