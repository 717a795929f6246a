"""Transfer: the Flee and Exploration tasks on hand-made trajectories, loading a PointNav checkpoint into a new run
(frozen / fine-tuned / scratch encoder, loaded core), its errors, and the config checks.

Rewards are checked against values computed independently of the environment: geodesic distances by a separate
fast-marching run from the agent's position (and a hand-worked path length), covered area by counting navigable
scene cells. Training runs are in-process and tiny (16x16 depth, 2 envs x 8 steps, 2 updates).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tiny import quiet, tiny

from ddppo.config import ConfigError, SimConfig, TaskConfig, TrainConfig, load_config
from ddppo.evaluation.evaluate import evaluate_policy, format_table
from ddppo.evaluation.trained_policy import policy_spaces
from ddppo.io import checkpoint
from ddppo.policy import Policy
from ddppo.sim.dataset import Episode
from ddppo.sim.dataset_dir import generate_dataset
from ddppo.sim.environments import make_vector_env
from ddppo.sim.geometry import MOVE_FORWARD, STOP, TURN_RIGHT, heading_to_quaternion
from ddppo.sim.navmesh import NavGrid
from ddppo.sim.tasks import COVERAGE_CELL, ExplorationVectorEnv, FleeVectorEnv
from ddppo.trainer.loop import train
from ddppo.trainer.transfer import CORE_MODULES, ENCODER_MODULES, apply_transfer

TINY = tiny(2, 8, "task.max_episode_steps=40", "total_steps=32", "checkpoint_interval=1", "log_interval=1")

# east 2 m along z = 1.5, south 1.25 m round the wall's end, west 2 m behind the wall (TURN_RIGHT x 9 = -90°)
AROUND_THE_WALL = [TURN_RIGHT] * 9 + [MOVE_FORWARD] * 8 + [TURN_RIGHT] * 9 + [MOVE_FORWARD] * 5 + \
    [TURN_RIGHT] * 9 + [MOVE_FORWARD] * 8
START, END = (1.0, 1.5), (1.0, 2.75)


@pytest.fixture(scope="module")
def wall(make_scene):
    """4.2 m room (0.05 m cells) with a 0.1 m thick wall from the west side to x = 2.6 m at z = 2.0-2.1 m."""
    occ = np.zeros((84, 84), np.uint8)
    occ[40:42, :52] = 1
    return NavGrid(make_scene(occ, name="wall"))


def drive(cls, nav, actions, max_steps=100):
    ep = Episode("0", "wall", (START[0], 0.0, START[1]), tuple(heading_to_quaternion(0.0)), (3.5, 0.0, 1.0), 2.5)
    env = cls([ep], {"wall": nav}, 1, SimConfig(resolution=16), TaskConfig(max_episode_steps=max_steps),
              order="shuffle")
    first = env.reset()
    steps = [env.step(torch.tensor([a])) for a in actions]
    return env, first, steps


# ------------------------------------------------------------------------------------------------ Flee
def test_flee_reward_is_the_increase_of_geodesic_distance_from_the_start(wall):
    env, first, steps = drive(FleeVectorEnv, wall, AROUND_THE_WALL)
    previous = 0.0
    for k, r in enumerate(steps):
        pos = (float(r.info["agent_x"][0]), float(r.info["agent_z"][0]))
        # independent: a fast-marching field from where the agent is (not from the start), read at the start;
        # the two directions of the discretised field differ by up to ~2% round the corner
        d = wall.geodesic_distance(START, pos) if math.dist(START, pos) > 1e-6 else 0.0
        mine = float(r.info["distance_from_start"][0])
        assert mine == pytest.approx(d, rel=0.03, abs=0.01), f"step {k}"
        assert float(r.reward[0]) == pytest.approx(mine - previous, abs=1e-5), f"step {k}"
        previous = mine
    assert (float(steps[-1].info["agent_x"][0]), float(steps[-1].info["agent_z"][0])) == pytest.approx(END, abs=1e-4)
    # the return telescopes to the final distance (no slack, no bonus)
    total = sum(float(r.reward[0]) for r in steps)
    assert total == pytest.approx(float(steps[-1].info["distance_from_start"][0]), abs=1e-4)
    # hand-worked shortest path round the wall's end, a disc of the agent radius (0.1 m) about each corner:
    # tangents from start and end, two arcs and the 0.1 m wall end: 3.755 m; the FMM grid adds up to ~5% at corners
    r = 0.1
    c1, c2 = (2.6, 2.0), (2.6, 2.1)
    tan1, tan2 = math.sqrt(math.dist(START, c1) ** 2 - r * r), math.sqrt(math.dist(END, c2) ** 2 - r * r)
    arc1 = math.atan2(START[1] - c1[1], START[0] - c1[0]) % (2 * math.pi) + math.acos(r / math.dist(START, c1))
    arc2 = math.atan2(END[1] - c2[1], END[0] - c2[0]) - math.acos(r / math.dist(END, c2))
    hand = tan1 + tan2 + r * (2 * math.pi - arc1) + r * arc2 + 0.1
    assert hand == pytest.approx(3.755, abs=0.002)
    assert total == pytest.approx(hand, rel=0.06)
    assert total > math.dist(START, END) + 1.0  # the wall forces a real detour
    # no goal: the goal sensor reads zeros; the other observations are PointNav's
    assert set(first) == set(env.obs_spaces) and torch.all(first["pointgoal_with_gps_compass"] == 0)
    assert torch.all(steps[-1].obs["pointgoal_with_gps_compass"] == 0)
    assert all(k in steps[0].info for k in env.episode_metrics + env.record_metrics)


def test_flee_stop_ends_the_episode_without_bonus(wall):
    _, _, steps = drive(FleeVectorEnv, wall, [TURN_RIGHT] * 9 + [MOVE_FORWARD] * 4 + [STOP])
    last = steps[-1]
    assert bool(last.terminated[0]) and not bool(last.truncated[0])
    assert float(last.reward[0]) == 0.0
    assert float(last.info["distance_from_start"][0]) == pytest.approx(1.0, rel=0.01)  # straight line (FMM: <1%)
    assert float(last.info["steps"][0]) == 14


# ------------------------------------------------------------------------------------------------ Exploration
def covered_area_by_hand(nav: NavGrid, positions) -> tuple[list[float], float]:
    """Per position, the navigable area (m²) of its 0.5 m cell if first entered there, and the total."""
    c = nav.scene.cell_size
    jj, ii = np.nonzero(nav.navigable)
    cx, cz = (ii + 0.5) * c, (jj + 0.5) * c  # scene origin is (0, 0)
    seen, gains = set(), []
    for x, z in positions:
        cell = (math.floor(x / COVERAGE_CELL), math.floor(z / COVERAGE_CELL))
        inside = (np.floor(cx / COVERAGE_CELL) == cell[0]) & (np.floor(cz / COVERAGE_CELL) == cell[1])
        gains.append(0.0 if cell in seen else float(inside.sum()) * c * c)
        seen.add(cell)
    return gains, sum(gains)


def test_exploration_reward_is_newly_covered_navigable_area(wall):
    env, first, steps = drive(ExplorationVectorEnv, wall, AROUND_THE_WALL)
    positions = [START] + [(float(r.info["agent_x"][0]), float(r.info["agent_z"][0])) for r in steps]
    gains, total = covered_area_by_hand(wall, positions)
    assert [float(r.reward[0]) for r in steps] == pytest.approx(gains[1:], abs=1e-5)
    assert float(steps[-1].info["area_covered"][0]) == pytest.approx(total, abs=1e-5)
    assert float(steps[0].info["area_covered"][0]) == pytest.approx(gains[0] + gains[1], abs=1e-5)
    # hand-worked: cells away from walls are fully navigable (0.25 m²); turning in place covers nothing
    assert float(steps[0].reward[0]) == 0.0
    assert 0.25 in [round(g, 6) for g in gains]
    assert torch.all(first["pointgoal_with_gps_compass"] == 0)


def test_exploration_revisiting_earns_nothing(wall):
    # 1 m east and 0.75 m back west (not the full metre: x = 1.0 is a cell boundary, float error picks a side)
    back_and_forth = [TURN_RIGHT] * 9 + [MOVE_FORWARD] * 4 + [TURN_RIGHT] * 18 + [MOVE_FORWARD] * 3
    _, _, steps = drive(ExplorationVectorEnv, wall, back_and_forth)
    assert sum(float(r.reward[0]) for r in steps[-3:]) == 0.0
    assert float(steps[-1].info["area_covered"][0]) == pytest.approx(float(steps[12].info["area_covered"][0]))


@pytest.mark.parametrize("cls", [FleeVectorEnv, ExplorationVectorEnv])
def test_task_state_resumes_mid_episode(wall, cls):
    env, _, _ = drive(cls, wall, [TURN_RIGHT] * 9 + [MOVE_FORWARD] * 3)
    state = env.state_dict()
    rest = [MOVE_FORWARD] * 3 + [TURN_RIGHT] * 9 + [MOVE_FORWARD] * 3
    a = [float(env.step(torch.tensor([x])).reward[0]) for x in rest]
    twin, _, _ = drive(cls, wall, [])
    twin.load_state_dict(state)
    b = [float(twin.step(torch.tensor([x])).reward[0]) for x in rest]
    assert a == b and sum(a) > 0


# ------------------------------------------------------------------------------------------------ config
def test_config_rejects_unknown_task_type_and_transfer_modes():
    with pytest.raises(ConfigError, match=r"task.type='fly'"):
        load_config(None, ["task.type=fly"])
    with pytest.raises(ConfigError, match=r"transfer.encoder='melt'"):
        load_config(None, ["transfer.encoder=melt"])
    with pytest.raises(ConfigError, match=r"transfer.core='keep'"):
        load_config(None, ["transfer.core=keep"])
    with pytest.raises(ConfigError, match=r"transfer.checkpoint"):
        load_config(None, ["transfer.encoder=frozen"])
    with pytest.raises(ConfigError, match=r"transfer.encoder_lr_scale"):
        load_config(None, ["transfer.encoder_lr_scale=0"])
    for name in ("flee", "exploration"):
        cfg = load_config(Path(__file__).parent.parent / "configs" / "transfer" / f"{name}.yaml")
        assert cfg.task.type == name


# ------------------------------------------------------------------------------------------------ transfer
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("transfer_data") / "data"
    cfg = load_config(None, ["dataset.scenes={train: 2, val: 2, test: 0}",
                             "dataset.episodes_per_scene={train: 10, val: 4, test: 0}",
                             "dataset.min_extent=4", "dataset.max_extent=6"]).dataset
    generate_dataset(out, cfg, log=quiet)
    return out


def tiny(data_dir, run_dir, name, *extra):
    return load_config(None, [*TINY, f"task.data_dir={data_dir}", f"run_dir={run_dir}", f"name={name}", *extra])


@pytest.fixture(scope="module")
def pointnav_ckpt(data_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pointnav_src")
    train(tiny(data_dir, root, "src"), log=quiet)
    return sorted((root / "src" / "checkpoints").glob("ckpt_*.pt"))[-1]


def module_tensors(state: dict, names) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.split(".")[0] in names}


@pytest.fixture(scope="module")
def flee_runs(data_dir, pointnav_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("flee_runs")
    out = {}
    for mode in ("frozen", "finetune"):
        cfg = tiny(data_dir, root, mode, "task.type=flee", f"transfer.checkpoint={pointnav_ckpt}",
                   f"transfer.encoder={mode}", "transfer.encoder_lr_scale=0.5")
        result = train(cfg, log=quiet)
        final = checkpoint.load(sorted((root / mode / "checkpoints").glob("ckpt_*.pt"))[-1])["policy"]
        out[mode] = (root / mode, result, final)
    return out


def test_frozen_encoder_stays_bit_identical_and_the_rest_trains(flee_runs, pointnav_ckpt):
    src = checkpoint.load(pointnav_ckpt)["policy"]
    run_dir, result, final = flee_runs["frozen"]
    assert result["updates"] == 2 and "episode/distance_from_start" in result
    frozen = module_tensors(final, ENCODER_MODULES)
    assert any(k.startswith("visual_input.normalizer.") for k in frozen)  # the running statistics too
    for k, v in frozen.items():
        assert torch.equal(v, src[k]), k
    assert not torch.equal(final["core.weight_hh_l0"], src["core.weight_hh_l0"])  # core: fresh and trained
    record = json.loads((run_dir / "transfer.json").read_text())
    assert record["checkpoint"] == str(pointnav_ckpt.resolve()) and record["encoder"] == "frozen"
    assert record["loaded"] == list(ENCODER_MODULES) and record["frozen"] == list(ENCODER_MODULES)
    assert record["source_task"] == "pointnav" and len(record["sha256"]) == 64


def test_finetuned_encoder_changes(flee_runs, pointnav_ckpt):
    src = checkpoint.load(pointnav_ckpt)["policy"]
    _, _, final = flee_runs["finetune"]
    changed = [k for k, v in module_tensors(final, ("encoder", "visual_fc")).items() if not torch.equal(v, src[k])]
    assert changed
    assert not torch.equal(final["visual_input.normalizer.count"], src["visual_input.normalizer.count"])


def test_a_resumed_transfer_run_does_not_need_the_source_checkpoint(data_dir, pointnav_ckpt, tmp_path):
    source = tmp_path / "source.pt"
    shutil.copy(pointnav_ckpt, source)
    extra = ["task.type=exploration", f"transfer.checkpoint={source}", "transfer.encoder=frozen"]
    train(tiny(data_dir, tmp_path, "resumed", *extra, "total_steps=16"), log=quiet)  # 1 update, then "preempted"
    source.unlink()  # e.g. pruned by the source run's keep_checkpoints
    result = train(tiny(data_dir, tmp_path, "resumed", *extra, "total_steps=32"), log=quiet)
    assert result["resumed_from_update"] == 1 and result["updates"] == 2
    final = checkpoint.load(sorted((tmp_path / "resumed" / "checkpoints").glob("ckpt_*.pt"))[-1])["policy"]
    src = checkpoint.load(pointnav_ckpt)["policy"]
    for k, v in module_tensors(final, ENCODER_MODULES).items():  # still frozen after the resume
        assert torch.equal(v, src[k]), k


def fresh_policy(cfg, seed=3):
    torch.manual_seed(seed)
    return Policy(policy_spaces(cfg), cfg.policy)


def test_frozen_encoder_is_in_eval_mode_and_out_of_the_optimizer(data_dir, pointnav_ckpt, tmp_path):
    cfg = tiny(data_dir, tmp_path, "x", f"transfer.checkpoint={pointnav_ckpt}", "transfer.encoder=frozen")
    policy = fresh_policy(cfg)
    params, groups = apply_transfer(policy, cfg, tmp_path, quiet)
    policy.train()
    assert policy.training and policy.core.training
    for name in ENCODER_MODULES:
        module = getattr(policy, name)
        assert not any(m.training for m in module.modules()), name
        assert not any(p.requires_grad for p in module.parameters()), name
    assert len(groups) == 1 and {id(p) for p in groups[0]["params"]} == {id(p) for p in params}
    assert not {id(p) for p in policy.encoder.parameters()} & {id(p) for p in params}
    assert (tmp_path / "transfer.json").is_file()


def test_finetune_gets_its_own_learning_rate(data_dir, pointnav_ckpt, tmp_path):
    cfg = tiny(data_dir, tmp_path, "x", f"transfer.checkpoint={pointnav_ckpt}", "transfer.encoder_lr_scale=0.1",
               "ppo.lr=0.001")
    policy = fresh_policy(cfg)
    params, groups = apply_transfer(policy, cfg, None, quiet)
    assert [g.get("lr") for g in groups] == [None, pytest.approx(1e-4)]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for n in ENCODER_MODULES
                                                  for p in getattr(policy, n).parameters()}
    assert sum(len(g["params"]) for g in groups) == len(params) == len(list(policy.parameters()))
    opt = torch.optim.Adam(groups, lr=cfg.ppo.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 0.5)
    assert sched.get_last_lr() == pytest.approx([5e-4, 5e-5])


def test_scratch_encoder_is_not_loaded_but_the_core_can_be(data_dir, pointnav_ckpt, tmp_path):
    src = checkpoint.load(pointnav_ckpt)["policy"]
    cfg = tiny(data_dir, tmp_path, "x", f"transfer.checkpoint={pointnav_ckpt}", "transfer.encoder=scratch",
               "transfer.core=load")
    policy = fresh_policy(cfg)
    init = {k: v.clone() for k, v in policy.state_dict().items()}
    apply_transfer(policy, cfg, tmp_path, quiet)
    state = policy.state_dict()
    for k in module_tensors(state, ("encoder", "visual_fc")):
        assert torch.equal(state[k], init[k]) and not torch.equal(state[k], src[k]), k
    for k in module_tensors(state, CORE_MODULES):
        assert torch.equal(state[k], src[k]), k
    assert not torch.equal(state["actor.weight"], src["actor.weight"])  # heads are always new
    assert json.loads((tmp_path / "transfer.json").read_text())["loaded"] == list(CORE_MODULES)


def save_untrained(cfg, path: Path) -> Path:
    """A real checkpoint (trainer's format) of an untrained policy built from ``cfg``."""
    checkpoint.save({"policy": fresh_policy(cfg).state_dict(), "config": OmegaConf.to_container(cfg, enum_to_str=True),
                     "env_steps": 0, "update": 0}, path)
    return path


def one_line_error(cfg) -> str:
    with pytest.raises(ValueError) as e:
        apply_transfer(fresh_policy(cfg), cfg, None, quiet)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_incompatible_checkpoints_are_one_line_errors_naming_the_module(data_dir, tmp_path):
    def cfg_with(*extra):
        return tiny(data_dir, tmp_path, "x", *extra)

    resnet = save_untrained(cfg_with("policy.encoder=resnet18", "policy.ngroups=4"), tmp_path / "resnet.pt")
    msg = one_line_error(cfg_with(f"transfer.checkpoint={resnet}"))
    assert "module 'encoder'" in msg and "resnet18" in msg and "simple_cnn" in msg and str(resnet) in msg

    wide = save_untrained(cfg_with("policy.base_planes=16"), tmp_path / "wide.pt")
    msg = one_line_error(cfg_with(f"transfer.checkpoint={wide}"))
    assert "module 'encoder'" in msg and "shape" in msg

    rgb = save_untrained(cfg_with("sim.sensors=[rgb]"), tmp_path / "rgb.pt")
    assert "module 'visual_input'" in one_line_error(cfg_with(f"transfer.checkpoint={rgb}"))

    big_core = save_untrained(cfg_with("policy.hidden_size=48"), tmp_path / "core.pt")
    msg = one_line_error(cfg_with(f"transfer.checkpoint={big_core}", "transfer.encoder=scratch",
                                  "transfer.core=load"))
    assert "module 'core'" in msg

    blind = save_untrained(cfg_with("sim.sensors=[]"), tmp_path / "blind.pt")
    assert "module 'visual_input'" in one_line_error(cfg_with(f"transfer.checkpoint={blind}"))

    not_ckpt = tmp_path / "weights.pt"
    checkpoint.save({"policy": {}}, not_ckpt)
    assert "not a ddppo training checkpoint" in one_line_error(cfg_with(f"transfer.checkpoint={not_ckpt}"))


# ------------------------------------------------------------------------------------------------ evaluation
@pytest.mark.parametrize("task", ["flee", "exploration"])
def test_evaluation_summarises_the_tasks_own_metrics(data_dir, tmp_path, task):
    cfg = tiny(data_dir, tmp_path, "x", f"task.type={task}")
    envs = make_vector_env(cfg, "val", 1)
    summary = evaluate_policy(fresh_policy(cfg), cfg, "val", num_episodes=2, num_envs=2)
    assert summary["episodes"] == 2
    assert set(envs.record_metrics) <= set(summary) and "success" not in summary
    table = format_table({"checkpoint": summary})
    assert envs.episode_metrics[0] in table


def test_train_config_default_task_is_pointnav():
    assert OmegaConf.structured(TrainConfig).task.type == "pointnav"


def test_eval_of_a_flee_checkpoint_has_no_oracle_reference(data_dir, tmp_path, capsys):
    """The oracle walks to the PointNav goal: no ceiling for Flee, so `ddppo eval` leaves it out and says so."""
    import json

    from ddppo.launch.cli import main as cli_main

    train(tiny(data_dir, tmp_path, "flee", "task.type=flee"), log=quiet)
    ckpt = sorted((tmp_path / "flee" / "checkpoints").glob("ckpt_*.pt"))[-1]
    out = tmp_path / "eval"
    assert cli_main(["eval", str(ckpt), "--episodes", "2", "--num-envs", "2", "--agents", "oracle,random",
                     "--out", str(out)]) == 0
    assert set(json.loads((out / "summary.json").read_text())) == {"protocol", "checkpoint", "random"}
    assert "no oracle reference for task.type=flee" in capsys.readouterr().err
