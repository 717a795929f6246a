"""DD-PPO across processes: real torchrun launches, two Gloo ranks on CPU, no mock of torch.distributed.

- one update built from the trainer's pieces with different sample counts per rank equals single-process
  training on the concatenated batch, and leaves identical parameters on both ranks;
  (``tests/helpers/dist_grad_check.py``; it also runs the trainer's own ``ddppo.trainer.loop.ppo_update``);
- the real trainer as ``torchrun --nproc-per-node 2 ddppo/train.py``: checkpoints, per-rank resume states, and
  TensorBoard steps that count the samples of both ranks; without a slowdown nothing is preempted;
- straggler preemption: with rank 1 slowed down, only its rollouts are cut (per-rank rollout lengths recorded by
  ``tests/helpers/train_rank_dump.py``), TensorBoard shows it, and both ranks end with identical parameters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny import tiny

from ddppo.config import load_config
from ddppo.distributed import resolve_device, resolve_sim_device
from ddppo.policy import Policy
from ddppo.rl.ppo import ppo_loss

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parent.parent
HELPERS = Path(__file__).resolve().parent / "helpers"
TORCHRUN_TIMEOUT = 240

NUM_ENVS, NUM_STEPS = 2, 8
TINY = tiny(NUM_ENVS, NUM_STEPS, "ddppo.backend=gloo", "log_interval=1")


@pytest.fixture(scope="module")
def data_dir(two_scene_dataset) -> Path:
    return two_scene_dataset


def torchrun(args: list[str], env_extra: dict[str, str] | None = None, nproc: int = 2,
             timeout: float = TORCHRUN_TIMEOUT) -> subprocess.CompletedProcess:
    """torchrun --standalone (a free rendezvous port of its own, so concurrent tests never clash)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env_extra or {}))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    torchrun_bin = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun_bin), "--standalone", f"--nproc-per-node={nproc}", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return proc


def check_rc(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"rc={proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"


def read_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} over every event file of run_dir/tb."""
    out: dict[str, dict[int, float]] = {}
    files = sorted((run_dir / "tb").glob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event file under {run_dir / 'tb'}"
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for ev in acc.Scalars(tag):
                out.setdefault(tag, {})[ev.step] = ev.value
    return out


# ---------------------------------------------------------------------------------------------- gradients
@pytest.fixture(scope="module")
def grad_dumps(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("grad_check")
    proc = torchrun([str(HELPERS / "dist_grad_check.py"), str(out)])
    check_rc(proc)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def reference_update(dumps: list[dict], normalize_advantages: bool = False):
    """The same update in ONE process on the concatenated batch of both ranks.

    The two rollouts have different lengths, so the shorter one is zero-padded in time and the padding gets
    sample weight 0 (the recurrent core is causal: padding after the valid steps does not change them). The
    visual running normaliser folds in the statistics of all valid frames once, as the synchronised update
    on the ranks does, then normalises with them. The loss is the weighted MEAN over all valid samples
    (reduction="mean"), an independent code path from the ranks' sums divided by the all-reduced count.
    With ``normalize_advantages`` the valid advantages of both ranks are normalised together by torch.var_mean
    (habitat-baselines' formula: (A - mean) / sqrt(var + 1e-5), unbiased variance), and the gradients returned
    are the clipped ones the step used.
    """
    cfg = load_config(None, dumps[0]["policy_overrides"])
    spaces = {k: (tuple(v.shape[2:]), v.dtype) for k, v in dumps[0]["batch"]["obs"].items()}  # [T, N, *shape]
    policy = Policy(spaces, cfg.policy)
    policy.load_state_dict(dumps[0]["init_state"])
    batches = [d["batch"] for d in dumps]
    t_max = max(b["actions"].shape[0] for b in batches)

    # normaliser: one statistics update with every valid frame of both ranks, then frozen
    frames = torch.cat([b["obs"]["depth"].reshape(-1, *b["obs"]["depth"].shape[2:]) for b in batches])
    policy.train()
    policy.visual_input({"depth": frames})
    policy.eval()

    def pad(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == t_max:
            return x
        return torch.cat([x, x.new_zeros(t_max - x.shape[0], *x.shape[1:])])

    def cat(key: str) -> torch.Tensor:
        return torch.cat([pad(b[key]) for b in batches], dim=1)

    obs = {k: torch.cat([pad(b["obs"][k]) for b in batches], dim=1) for k in batches[0]["obs"]}
    masks = torch.cat([torch.cat([b["masks"], torch.ones(t_max - b["masks"].shape[0], b["masks"].shape[1])])
                       for b in batches], dim=1)
    weight = torch.cat([pad(torch.ones_like(b["old_log_probs"])) for b in batches], dim=1)
    hidden0 = torch.cat([b["hidden0"] for b in batches], dim=1)
    advantages = cat("advantages")
    if normalize_advantages:
        var, mean = torch.var_mean(advantages[weight > 0].double())
        advantages = ((advantages.double() - mean) / (var + 1e-5).sqrt()).float()
    log_probs, values, entropy = policy.evaluate_actions(obs, cat("prev_actions"), masks, hidden0, cat("actions"))
    loss, _ = ppo_loss(log_probs, cat("old_log_probs"), advantages, values, cat("old_values"),
                       cat("returns"), entropy, cfg.ppo, reduction="mean", sample_weight=weight)
    params = [p for p in policy.parameters() if p.requires_grad]
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.ppo.lr, eps=cfg.ppo.eps)
    optimizer.zero_grad()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in zip(names, params)}
    torch.nn.utils.clip_grad_norm_(params, cfg.ppo.max_grad_norm)
    clipped = {n: p.grad.detach().clone() for n, p in zip(names, params)}
    optimizer.step()
    state = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    return (clipped, state, int(weight.sum())) if normalize_advantages else (grads, state, int(weight.sum()))


def test_ranks_start_identical_and_have_different_sample_counts(grad_dumps):
    d0, d1 = grad_dumps
    assert d0["world_size"] == d1["world_size"] == 2
    assert (d0["num_samples"], d1["num_samples"]) == (NUM_STEPS * 2, 3 * 2)
    assert d0["n_global"] == d1["n_global"] == d0["num_samples"] + d1["num_samples"]
    for k in d0["init_state"]:  # the ranks seeded differently: broadcast_module made them equal
        assert torch.equal(d0["init_state"][k], d1["init_state"][k]), k


def test_params_identical_on_all_ranks_after_a_step(grad_dumps):
    d0, d1 = grad_dumps
    for k in d0["reduced_grads"]:
        assert torch.equal(d0["reduced_grads"][k], d1["reduced_grads"][k]), f"all-reduced gradient of {k} differs"
    for k in d0["trainer_state"]:
        assert torch.equal(d0["trainer_state"][k], d1["trainer_state"][k]), f"ppo_update: {k} differs between ranks"
    assert torch.equal(d0["trainer_losses"], d1["trainer_losses"])  # logged metrics agree too
    changed = 0
    for k in d0["final_state"]:
        assert torch.equal(d0["final_state"][k], d1["final_state"][k]), f"{k} differs between ranks after the step"
        changed += not torch.equal(d0["final_state"][k], d0["init_state"][k])
    assert changed > 0
    # the synchronised visual normaliser saw every rank's frames
    assert d0["final_state"]["visual_input.normalizer.count"].item() == d0["n_global"]
    # each rank's own gradient differs from the other's: the all-reduce had something to do
    assert any(not torch.allclose(d0["local_grads"][k], d1["local_grads"][k]) for k in d0["local_grads"])


def test_sample_weighted_gradient_equals_single_process_on_concatenated_batch(grad_dumps):
    d0, d1 = grad_dumps
    ref_grads, ref_state, n_valid = reference_update(grad_dumps)
    assert n_valid == d0["n_global"]
    for k, g in ref_grads.items():
        torch.testing.assert_close(d0["reduced_grads"][k], g, rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    for k, v in ref_state.items():
        torch.testing.assert_close(d0["final_state"][k], v, rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
        # the trainer's ppo_update reaches the same state (minibatch env order may differ: allclose)
        torch.testing.assert_close(d0["trainer_state"][k], v, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, k=k: f"ddppo.trainer.loop.ppo_update, {k}: {m}")

    # The reference DD-PPO average (each rank's mean gradient, averaged with equal weight) is measurably
    # different here, so this test would catch a rank-count (instead of sample-count) weighting.
    n0, n1, n = d0["num_samples"], d1["num_samples"], d0["n_global"]
    naive = {k: 0.5 * (d0["local_grads"][k] * n / n0 + d1["local_grads"][k] * n / n1) for k in ref_grads}
    flat_naive = torch.cat([naive[k].flatten() for k in ref_grads])
    flat_ref = torch.cat([ref_grads[k].flatten() for k in ref_grads])
    assert (flat_naive - flat_ref).norm() > 1e-3 * flat_ref.norm()

    # ddppo.grad_weighting=ranks is that average (habitat-baselines' DistributedDataParallel), clipped as usual
    clip = torch.clamp(0.2 / (flat_naive.norm() + 1e-6), max=1.0)  # max_grad_norm of the helper's config
    for k in ref_grads:
        torch.testing.assert_close(d0["trainer_grads_ranks"][k], naive[k] * clip, rtol=1e-4, atol=1e-7,
                                   msg=lambda m, k=k: f"grad_weighting=ranks, {k}: {m}")


def test_normalized_advantages_use_every_ranks_rollout(grad_dumps):
    """ppo.normalize_advantages: the trainer's update normalises advantages with the mean and variance of both
    ranks' rollouts (all-reduced), so it still equals one process's update on the concatenated batch. Normalised
    per rank, the two ranks' advantages would be centred separately, a different update."""
    d0, d1 = grad_dumps
    ref_grads, ref_state, _ = reference_update(grad_dumps, normalize_advantages=True)
    for k, v in ref_state.items():
        assert torch.equal(d0["trainer_state_normalized"][k], d1["trainer_state_normalized"][k]), k
        torch.testing.assert_close(d0["trainer_state_normalized"][k], v, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, k=k: f"normalised advantages, {k}: {m}")
    # Adam's first step hardly depends on the gradient's scale: compare the gradient the step used, too
    for k, g in ref_grads.items():
        torch.testing.assert_close(d0["trainer_grads_normalized"][k], g, rtol=1e-4, atol=1e-7,
                                   msg=lambda m, k=k: f"normalised advantages, gradient of {k}: {m}")
    flat = torch.cat([g.flatten() for g in ref_grads.values()])
    unnormalized = torch.cat([d0["reduced_grads"][k].flatten() for k in ref_grads])
    # the normalisation changed the update's direction (not only its scale, which clipping may undo)
    assert (flat / flat.norm() - unnormalized / unnormalized.norm()).norm() > 1e-2


# ---------------------------------------------------------------------------------------------- the trainer
def train_overrides(data_dir: Path, run_dir: Path, name: str, updates: int, *extra: str) -> list[str]:
    total = updates * 2 * NUM_ENVS * NUM_STEPS
    return [*TINY, f"task.data_dir={data_dir}", f"run_dir={run_dir}", f"name={name}", f"total_steps={total}",
            "checkpoint_interval=2", *extra]


def run_dumped_training(tmp_path: Path, overrides: list[str]) -> tuple[list[dict], list[dict]]:
    dump = tmp_path / "dump"
    proc = torchrun([str(HELPERS / "train_rank_dump.py"), *overrides], env_extra={"DDPPO_TEST_DUMP": str(dump)})
    check_rc(proc)
    infos = [json.loads((dump / f"rank{r}.json").read_text()) for r in range(2)]
    states = [torch.load(dump / f"rank{r}_policy.pt", weights_only=True) for r in range(2)]
    return infos, states


def test_torchrun_trainer_script_two_ranks(data_dir, tmp_path):
    """`torchrun --nproc-per-node 2 ddppo/train.py ...` (the script form of `ddppo train`) trains, checkpoints, and
    logs steps that count the samples of both ranks. The default sync_frac 0.6 needs 1.2 finished ranks out of
    2, so nothing is ever preempted: rollout fraction exactly 1, no preempted rank."""
    updates = 3
    proc = torchrun(["ddppo/train.py", *train_overrides(data_dir, tmp_path / "runs", "two", updates)])
    check_rc(proc)
    run = tmp_path / "runs" / "two"
    ckpts = sorted((run / "checkpoints").glob("ckpt_*.pt"))
    assert [p.name for p in ckpts] == ["ckpt_000002.pt", "ckpt_000003.pt"]  # checkpoint_interval=2, + the end
    last = torch.load(ckpts[-1], weights_only=True)
    assert last["update"] == updates and last["env_steps"] == updates * 2 * NUM_ENVS * NUM_STEPS
    resume = torch.load(run / "resume.pt", weights_only=True)
    assert resume["state"]["update"] == updates
    for rank in (0, 1):  # every rank wrote its own resume state (and kept the previous set's: updates 2 and 3)
        files = sorted(p.name for p in run.glob(f"resume_rank{rank}*.pt"))
        assert files == [f"resume_rank{rank}.u{u:07d}.pt" for u in (2, updates)], files
        torch.load(run / files[-1], weights_only=True)

    # only rank 0 writes TensorBoard, and it counts the samples of BOTH ranks: 2 ranks x envs x steps per update
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 1
    scalars = read_scalars(run)
    per_update = 2 * NUM_ENVS * NUM_STEPS
    assert sorted(scalars["perf/fps"]) == [per_update * (u + 1) for u in range(updates)]
    assert set(scalars["ddppo/rollout_fraction"].values()) == {1.0}
    assert set(scalars["ddppo/preempted_ranks"].values()) == {0.0}
    assert {"loss/policy", "loss/value", "loss/entropy", "loss/grad_norm", "lr"} <= set(scalars)

    # torchrun gives each rank one thread, and neither torch nor the renderer takes more: numba starting its OpenMP
    # pool used to set the OpenMP runtime torch shares to every core of the machine
    summary = json.loads((run / "summary.json").read_text())
    assert summary["torch_threads_per_rank"] == [1, 1]
    assert summary["render_threads_per_rank"] == [1, 1]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="thread names come from Linux's /proc")
def test_train_frees_the_process_group_when_it_returns(data_dir, tmp_path):
    """After train() returns, no thread of the process group is left: destroy_process_group() really freed it. It
    used not to (torch.distributed.nn, imported lazily by the first optimiser, kept the group in its functions'
    default arguments), and a Gloo thread dropping a tensor while Python shut down then aborted a rank now and
    then ("terminate called without an active exception")."""
    infos, _ = run_dumped_training(tmp_path, train_overrides(data_dir, tmp_path / "runs", "free", 2))
    for info in infos:
        assert info["rc"] == 0
        assert not [t for t in info["threads_after_train"] if "gloo" in t], info["threads_after_train"]


# ---------------------------------------------------------------------------------------------- preemption
def test_straggler_preemption_cuts_only_the_slow_rank(data_dir, tmp_path):
    """Rank 1 sleeps 0.1 s per step (>= 0.8 s per rollout); rank 0 needs a few milliseconds per step. With
    sync_frac 0.5 one finished rank (count 1 >= 0.5 * 2) preempts the other once it has >= 25% of its steps.
    (The default 0.6 would need 1.2 finished ranks, i.e. never with 2 ranks.)

    The linear learning-rate decay (on here) follows the steps done, so the extra updates that cut rollouts take
    still learn: the lr logged after each update is lr0 * (1 - steps done / total_steps), above 0 until
    total_steps (decaying by a planned count of full-rollout updates, it reached 0 halfway through the run)."""
    updates = 4
    overrides = train_overrides(data_dir, tmp_path / "runs", "slow", updates, "ddppo.slowdown=0.1",
                                "ddppo.slow_rank=1", "ddppo.sync_frac=0.5", "ddppo.preemption=true",
                                "ppo.lr_decay=true", "ppo.lr=1e-3")
    infos, states = run_dumped_training(tmp_path, overrides)
    fast, slow = infos[0]["rollout_lengths"], infos[1]["rollout_lengths"]
    # cut rollouts collect fewer samples, so the trainer needs extra updates to reach total_steps
    assert len(fast) == len(slow) > updates
    # Round 0 is excluded from the "fast rank" check: start-up skew (first kernel calls, a loaded CI machine)
    # can make rank 0 the straggler of the very first rollout.
    assert fast[1:] == [NUM_STEPS] * (len(fast) - 1), f"the fast rank must not be cut: {fast}"
    min_steps = int(0.25 * NUM_STEPS)
    assert all(min_steps <= s <= NUM_STEPS for s in fast + slow), (fast, slow)
    assert all(s < NUM_STEPS for s in slow[1:]), f"every rollout of the slow rank after the first is cut: {slow}"
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), f"{k} differs between ranks"

    scalars = read_scalars(tmp_path / "runs" / "slow")
    frac, cut_ranks = scalars["ddppo/rollout_fraction"], scalars["ddppo/preempted_ranks"]
    steps = sorted(frac)
    assert steps == sorted(cut_ranks)
    assert [frac[k] for k in steps] == pytest.approx([(f + s) / (2 * NUM_STEPS) for f, s in zip(fast, slow)])
    assert [cut_ranks[k] for k in steps] == [float(f < NUM_STEPS) + float(s < NUM_STEPS) for f, s in zip(fast, slow)]
    assert max(frac.values()) < 1.0 and min(cut_ranks.values()) >= 1
    # TensorBoard steps count the samples actually collected by both ranks
    expected_steps, total = [], 0
    for f, s in zip(fast, slow):
        total += NUM_ENVS * (f + s)
        expected_steps.append(total)
    assert steps == expected_steps

    total_steps = updates * 2 * NUM_ENVS * NUM_STEPS
    lr = scalars["lr"]
    assert [lr[k] for k in steps] == pytest.approx([1e-3 * max(0.0, 1 - k / total_steps) for k in steps], rel=1e-6)
    assert all(lr[k] > 0 for k in steps if k < total_steps), lr


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu"))
    # a bare "cuda" is the worker's own GPU; an explicit index is kept
    assert resolve_device("cuda", local_rank=3) == torch.device("cuda:3")
    assert resolve_device("cuda:1", local_rank=3) == torch.device("cuda:1")
    assert resolve_sim_device("auto", torch.device("cuda:2")) == torch.device("cuda:2")
    assert resolve_sim_device("cpu", torch.device("cuda:2")) == torch.device("cpu")
