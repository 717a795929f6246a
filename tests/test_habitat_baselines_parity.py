"""Parity with habitat-baselines' DD-PPO, checked against habitat-baselines' own code (the installed
habitat-baselines 0.3.320260507, imported through tests/helpers/habitat_baselines_import.py):

- configs/pointnav/habitat_baselines{,_gibson}.yaml against ddppo_pointnav.yaml (upstream's file, kept verbatim in
  tests/upstream with its commit and sha256) composed by habitat-baselines' config system, key by key through an
  explicit mapping; every key of its ``rl.ppo`` and ``rl.ddppo`` sections is mapped, pinned to the one behaviour
  ddppo has, or excused with the reason, and so is every key of ``habitat.simulator``, ``habitat.task`` and
  ``habitat.environment`` (defaults included; the ones ddppo has no setting for in NOT_IMPLEMENTED, each with why);
- on identical tensors: returns (GAE, and discounted returns without it) of its RolloutStorage.compute_returns and
  of ddppo's storage; the PPO loss terms (policy, value clipped in its ``where`` form and unclipped, entropy), the
  clip fraction and the gradients of its PPO._update_from_batch and of ddppo.rl.ppo.ppo_loss (the ``max`` form,
  which habitat-baselines no longer has, is checked by hand in tests/test_storage_ppo.py);
- a PointNavResNetPolicy (ResNet50, LSTM 2 x 512, RGB-D, perturbed weights and normaliser statistics) saved by
  habitat-baselines' own PPOTrainer.save_checkpoint, read by ddppo (no code unpickled) into the preset's policy:
  the same action log-probabilities and values, one step and over sequences with episode starts; `ddppo eval`
  evaluates the file, and ``transfer.checkpoint`` takes its encoder.

Skips with the reason where habitat_baselines does not import; fails instead where DDPPO_REQUIRE_SYSTEM is set.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from habitat_support import need_habitat_baselines
from omegaconf import OmegaConf

from ddppo.config import load_config
from ddppo.evaluation.trained_policy import policy_from_checkpoint
from ddppo.io import checkpoint
from ddppo.policy import GOAL_SENSOR, Policy
from ddppo.policy.habitat_baselines_weights import ddppo_state_dict
from ddppo.rl.ppo import ppo_loss
from ddppo.rl.storage import RolloutStorage
from ddppo.sim.episode_order import MAX_SCENE_REPEAT_STEPS, STEP_REPETITION_RANGE
from ddppo.sim.habitat_backend import AGENT_MAX_CLIMB, AGENT_MAX_SLOPE, HFOV
from ddppo.sim.navmesh import AGENT_HEIGHT, AGENT_RADIUS, SENSOR_HEIGHT

REPO = Path(__file__).resolve().parent.parent
PRESETS = [REPO / "configs" / "pointnav" / "habitat_baselines.yaml",
           REPO / "configs" / "pointnav" / "habitat_baselines_gibson.yaml"]
DDPPO_POINTNAV = REPO / "tests" / "upstream" / "habitat_baselines" / "ddppo_pointnav.yaml"
"""habitat-baselines' ``ddppo_pointnav.yaml`` verbatim (the PyPI wheel ships no YAML); tests/upstream/README.md
names the upstream commit, whose file has DDPPO_POINTNAV_SHA256."""
DDPPO_POINTNAV_SHA256 = "b8b443ace3e48556e500260606b96390963a84ecdb1e23253918348bf9b3077a"
SENSORS = "habitat.simulator.agents.main_agent.sim_sensors"


@pytest.fixture(scope="module")
def hb():
    return need_habitat_baselines()


def ddppo_pointnav(hb, *overrides: str, as_dict: bool = True):
    """ddppo_pointnav.yaml composed by habitat-baselines' config system (as plain dicts, or its own DictConfig): the
    installed file where the install has one, else the upstream file kept in tests/upstream."""
    from habitat_baselines.config.default import get_config

    installed = Path(hb.__file__).parent / "config" / "pointnav" / "ddppo_pointnav.yaml"
    cfg = get_config(str(installed if installed.is_file() else DDPPO_POINTNAV), list(overrides))
    return OmegaConf.to_container(cfg, resolve=True) if as_dict else cfg


def test_the_kept_ddppo_pointnav_yaml_is_upstreams():
    assert hashlib.sha256(DDPPO_POINTNAV.read_bytes()).hexdigest() == DDPPO_POINTNAV_SHA256


def get(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


# ---------------------------------------------------------------------------------------------- the preset
class Same(NamedTuple):
    """A habitat-baselines key and the ddppo key that holds the same setting."""

    theirs: str
    ours: str
    convert: Callable[[Any], Any] = lambda v: v


class Pinned(NamedTuple):
    """A habitat-baselines key whose value is the only behaviour ddppo has (no key of ddppo's selects another)."""

    theirs: str
    value: Any
    why: str


SAME = [Same("habitat_baselines.num_environments", "ppo.num_envs"),
        Same("habitat_baselines.total_num_steps", "total_steps", int),
        Same("habitat_baselines.log_interval", "log_interval"),
        *(Same(f"habitat_baselines.rl.ppo.{k}", f"ppo.{v}") for k, v in (
            ("clip_param", "clip"), ("ppo_epoch", "ppo_epoch"), ("num_mini_batch", "num_mini_batch"),
            ("value_loss_coef", "value_coef"), ("entropy_coef", "entropy_coef"), ("lr", "lr"), ("eps", "eps"),
            ("max_grad_norm", "max_grad_norm"), ("num_steps", "num_steps"), ("gamma", "gamma"), ("tau", "tau"),
            ("use_linear_lr_decay", "lr_decay"), ("use_normalized_advantage", "normalize_advantages"),
            ("use_clipped_value_loss", "clipped_value_loss"))),
        Same("habitat_baselines.rl.ppo.hidden_size", "policy.hidden_size"),
        Same("habitat_baselines.rl.ddppo.sync_frac", "ddppo.sync_frac"),
        Same("habitat_baselines.rl.ddppo.rnn_type", "policy.rnn_type", str.lower),
        Same("habitat_baselines.rl.ddppo.num_recurrent_layers", "policy.num_recurrent_layers"),
        Same("habitat_baselines.rl.ddppo.backbone", "policy.encoder"),
        Same("habitat.environment.max_episode_steps", "task.max_episode_steps"),
        Same("habitat.task.slack_reward", "task.slack_reward"),
        Same("habitat.task.success_reward", "task.success_reward"),
        Same("habitat.task.measurements.success.success_distance", "task.success_distance"),
        Same("habitat.simulator.forward_step_size", "sim.forward_step"),
        Same("habitat.simulator.turn_angle", "sim.turn_angle"),
        Same(f"{SENSORS}.depth_sensor.max_depth", "sim.max_depth"),
        *(Same(f"{SENSORS}.{s}_sensor.{side}", "sim.resolution") for s in ("rgb", "depth")
          for side in ("width", "height")),
        Same("habitat.simulator.scene_dataset", "task.scene_dataset_config"),
        Same("habitat.task.type", "task.type", {"Nav-v0": "pointnav"}.get)]

PINNED = [
    Pinned("habitat_baselines.rl.ppo.use_gae", True, "ddppo always uses GAE (use_gae false equals ppo.tau=1)"),
    Pinned("habitat_baselines.rl.ppo.use_linear_clip_decay", False, "ddppo has no clip decay"),
    Pinned("habitat_baselines.rl.ppo.use_double_buffered_sampler", False, "ddppo does not overlap rollouts"),
    Pinned("habitat_baselines.rl.ddppo.distrib_backend", "NCCL", "ddppo.backend=auto: NCCL on CUDA, Gloo on CPU"),
    Pinned("habitat_baselines.rl.ddppo.pretrained", False, "no start weights: transfer.checkpoint empty"),
    Pinned("habitat_baselines.rl.ddppo.pretrained_encoder", False, "no start weights: transfer.checkpoint empty"),
    Pinned("habitat_baselines.rl.ddppo.train_encoder", True, "the encoder trains (transfer.encoder=frozen not set)"),
    Pinned("habitat_baselines.rl.ddppo.force_distributed", False, "habitat-baselines' testing switch"),
    Pinned("habitat_baselines.rl.policy.main_agent.name", "PointNavResNetPolicy", "ddppo's Policy is its twin"),
    Pinned("habitat_baselines.rl.policy.main_agent.action_distribution_type", "categorical", "4 discrete actions"),
    Pinned("habitat_baselines.rl.policy.main_agent.obs_transforms", {}, "no resize or crop: the policy pools 2x"),
    Pinned("habitat_baselines.test_episode_count", -1, "every episode: ddppo eval --protocol habitat"),
    Pinned("habitat.simulator.agents.main_agent.height", AGENT_HEIGHT, "ddppo.sim.navmesh"),
    Pinned("habitat.simulator.agents.main_agent.radius", AGENT_RADIUS, "ddppo.sim.navmesh"),
    *(Pinned(f"{SENSORS}.{s}_sensor.position", [0.0, SENSOR_HEIGHT, 0.0], "ddppo.sim.navmesh")
      for s in ("rgb", "depth")),
    *(Pinned(f"{SENSORS}.{s}_sensor.hfov", HFOV, "90 degrees in both backends") for s in ("rgb", "depth")),
    Pinned(f"{SENSORS}.depth_sensor.min_depth", 0.0, "depth in [0, max_depth] normalised to [0, 1]"),
    Pinned(f"{SENSORS}.depth_sensor.normalize_depth", True, "depth in [0, max_depth] normalised to [0, 1]"),
    Pinned("habitat.task.lab_sensors.pointgoal_with_gps_compass_sensor.goal_format", "POLAR", "[rho, -phi]"),
    Pinned("habitat.task.lab_sensors.pointgoal_with_gps_compass_sensor.dimensionality", 2, "[rho, -phi]"),
    Pinned("habitat.task.reward_measure", "distance_to_goal_reward", "the decrease of the geodesic distance"),
    Pinned("habitat.task.measurements.distance_to_goal.distance_to", "POINT", "to the goal's position"),
    Pinned("habitat.task.success_measure", "spl", "its success reward comes when SPL > 0, i.e. on success"),
    # habitat.simulator, habitat.task and habitat.environment: the behaviour ddppo has
    Pinned("habitat.simulator.type", "Sim-v0", "habitat-sim (sim.backend=habitat) or its embedded stand-in"),
    Pinned("habitat.simulator.default_agent_id", 0, "one agent"),
    Pinned("habitat.simulator.agents_order", ["main_agent"], "one agent"),
    Pinned("habitat.simulator.default_agent_navmesh", True, "ddppo.sim.habitat_backend.agent_navmesh_settings"),
    Pinned("habitat.simulator.navmesh_include_static_objects", False, "agent_navmesh_settings: static objects out"),
    Pinned("habitat.simulator.agents.main_agent.max_climb", AGENT_MAX_CLIMB, "agent_navmesh_settings"),
    Pinned("habitat.simulator.agents.main_agent.max_slope", AGENT_MAX_SLOPE, "agent_navmesh_settings"),
    Pinned("habitat.simulator.agents.main_agent.is_set_start_state", False, "each episode's start pose"),
    Pinned("habitat.simulator.habitat_sim_v0.allow_sliding", True, "collisions slide along walls in both backends"),
    Pinned("habitat.simulator.habitat_sim_v0.enable_physics", False, "kinematic navmesh motion in both backends"),
    Pinned("habitat.simulator.habitat_sim_v0.enable_hbao", False, "no ambient occlusion in either renderer"),
    Pinned("habitat.simulator.renderer.enable_batch_renderer", False, "one simulator per environment"),
    *(Pinned(f"{SENSORS}.{s}_sensor.{k}", v, why) for s in ("rgb", "depth") for k, v, why in (
        ("orientation", [0.0, 0.0, 0.0], "level cameras looking ahead"),
        ("sensor_subtype", "PINHOLE", "pinhole cameras in both backends"),
        ("noise_model", "None", "noise-free sensors"), ("noise_model_kwargs", {}, "noise-free sensors"))),
    Pinned(f"{SENSORS}.rgb_sensor.type", "HabitatSimRGBSensor", "sim.sensors: rgb"),
    Pinned(f"{SENSORS}.depth_sensor.type", "HabitatSimDepthSensor", "sim.sensors: depth"),
    Pinned("habitat.task.goal_sensor_uuid", GOAL_SENSOR, "the goal observation's name"),
    Pinned("habitat.task.lab_sensors.pointgoal_with_gps_compass_sensor.type", "PointGoalWithGPSCompassSensor",
           "the goal observation"),
    Pinned("habitat.task.end_on_success", True, "STOP ends ddppo's episode, and success is decided only at STOP"),
    *(Pinned(f"habitat.task.measurements.{k}.type", v, "ddppo's PointNav metrics and reward") for k, v in (
        ("distance_to_goal", "DistanceToGoal"), ("success", "Success"), ("spl", "SPL"),
        ("distance_to_goal_reward", "DistanceToGoalReward"))),
    *(Pinned(f"habitat.task.actions.{k}.type", v, "ddppo's 4 actions") for k, v in (
        ("stop", "StopAction"), ("move_forward", "MoveForwardAction"), ("turn_left", "TurnLeftAction"),
        ("turn_right", "TurnRightAction"))),
    *(Pinned(f"habitat.environment.iterator_options.{k}", v, "ddppo.sim.episode_order.SceneGroupedIterator")
      for k, v in (("cycle", True), ("shuffle", True), ("group_by_scene", True), ("num_episode_sample", -1),
                   ("max_scene_repeat_episodes", -1), ("max_scene_repeat_steps", MAX_SCENE_REPEAT_STEPS),
                   ("step_repetition_range", STEP_REPETITION_RANGE))),
]

EXCUSED = {
    "habitat_baselines.rl.ppo.reward_window_size": "logging: ddppo logs means over the episodes since the last log",
    "habitat_baselines.rl.ppo.entropy_target_factor": "Gaussian action spaces only",
    "habitat_baselines.rl.ppo.use_adaptive_entropy_pen": "Gaussian action spaces only",
    "habitat_baselines.rl.ddppo.pretrained_weights": "a path, unused while pretrained is false",
    "habitat_baselines.rl.ddppo.reset_critic": "only with pretrained weights; ddppo's transfer never loads heads",
}

REARRANGE = "a field of habitat's rearrangement tasks and articulated agents; PointNav (Nav-v0) never reads it"
PHYSICS = "physics and object simulation; PointNav runs with enable_physics false (pinned)"
NOT_IMPLEMENTED = {  # habitat.simulator, habitat.task and habitat.environment keys ddppo has no setting for
    "habitat.simulator.scene": "a placeholder: each episode's scene_id chooses the scene",
    "habitat.simulator.seed": "ddppo seeds every simulator from `seed` (plus the environment's index)",
    "habitat.simulator.create_renderer": "habitat-sim creates the renderer its sensors need",
    "habitat.simulator.requires_textures": "scenes are rendered with their textures (habitat's default)",
    "habitat.simulator.concur_render": "rendering is not overlapped with physics, which is off",
    "habitat.simulator.debug_render": "debug views: none", "habitat.simulator.debug_render_goal": "debug views: none",
    "habitat.simulator.debug_render_articulated_agent": "debug views: none",
    "habitat.simulator.ep_info": "set by habitat at run time, not a setting",
    "habitat.simulator.habitat_sim_v0.gpu_device_id": "sim.gpu_device_id=-1: the trainer's GPU (habitat: 0 here)",
    "habitat.simulator.habitat_sim_v0.gpu_gpu": "observations come back on the CPU (CUDA-GL interop unused)",
    "habitat.simulator.habitat_sim_v0.frustum_culling": "a rendering speed-up; the images do not change",
    "habitat.simulator.habitat_sim_v0.leave_context_with_background_renderer": "no background renderer",
    "habitat.simulator.habitat_sim_v0.enable_gfx_replay_save": "no replay recording",
    "habitat.simulator.renderer.composite_files": "batch renderer only (off, pinned)",
    "habitat.simulator.renderer.classic_replay_renderer": "batch renderer only (off, pinned)",
    "habitat.task.rank0_env0_measure_names": "logging: habitat's performance measure",
    "habitat.task.rank0_measure_names": "logging",
    "habitat.environment.max_episode_seconds": "no wall-clock limit; task.max_episode_steps ends episodes",
    **dict.fromkeys([f"habitat.simulator.{k}" for k in (
        "auto_sleep", "step_physics", "additional_object_paths", "kinematic_mode", "load_objs", "object_ids_start",
        "should_setup_semantic_ids")] + ["habitat.simulator.habitat_sim_v0.physics_config_file",
                                         "habitat.task.physics_target_sps", "habitat.task.count_obj_collisions"],
        PHYSICS),
    **dict.fromkeys([f"habitat.simulator.{k}" for k in (
        "needs_markers", "update_articulated_agent", "robot_joint_start_noise", "ctrl_freq", "ac_freq_ratio",
        "hold_thresh", "grasp_impulse")] + [f"habitat.simulator.agents.main_agent.{k}" for k in (
            "grasp_managers", "start_position", "start_rotation", "joint_start_noise", "joint_that_can_control",
            "joint_start_override", "articulated_agent_urdf", "articulated_agent_type", "ik_arm_urdf",
            "motion_data_path", "auto_update_sensor_transform")] + [f"habitat.task.{k}" for k in (
            "settle_steps", "constraint_violation_ends_episode", "constraint_violation_drops_object",
            "force_regenerate", "should_save_to_cache", "object_in_hand_sample_prob", "min_start_distance",
            "render_target", "filter_colliding_states", "num_spawn_attempts", "spawn_max_dist_to_obj",
            "base_angle_noise", "spawn_max_dist_to_obj_delta", "recep_place_shrink_factor", "ee_sample_factor",
            "ee_exclude_region", "base_noise", "spawn_region_scale", "joint_max_impulse", "desired_resting_position",
            "use_marker_t", "cache_robot_init", "success_state", "should_enforce_target_within_reach",
            "task_spec_base_path", "task_spec", "pddl_domain_def", "obj_succ_thresh", "enable_safe_drop",
            "art_succ_thresh", "robot_at_thresh", "min_distance_start_agents")], REARRANGE),
    **dict.fromkeys([f"habitat.task.actions.{a}.tilt_angle" for a in ("move_forward", "turn_left", "turn_right")],
                    "the look-up/look-down actions' angle; ddppo has no such actions"),
}
"""Every other key of habitat.simulator, habitat.task and habitat.environment (ddppo_pointnav.yaml composed by
habitat's config system, every default included), with why ddppo has no setting for it."""

CODE = [  # habitat-baselines behaviour set in its code rather than its config, and the ddppo key that selects it;
    # the tests below run both sides with these settings (policy parity, loss parity)
    ("PointNavResNetNet: goal features [rho, cos(-a), sin(-a)]", "policy.goal_angle", "negated"),
    ("PointNavResNetPolicy.from_config: normalize_visual_inputs='rgb' in obs", "policy.normalize_visual", "auto"),
    ("ResNetEncoder: F.avg_pool2d(x, 2)", "policy.avgpool", 2),
    ("ResNetEncoder: GroupNorm(1, ...) after the compression conv", "policy.compression_groups", 1),
    ("PointNavResNetPolicy(resnet_baseplanes=32), ngroups=baseplanes // 2", "policy.base_planes", 32),
    ("PointNavResNetPolicy(resnet_baseplanes=32), ngroups=baseplanes // 2", "policy.ngroups", 16),
    ("ResNetEncoder.layer_init is never called: PyTorch's initial weights", "policy.conv_init", "torch_default"),
    ("PPO._update_from_batch: value clip torch.where(|V - V_old| < clip, ...)", "ppo.value_clip", "where"),
    ("PPOTrainer: a time-limit cut is done (mask 0), never bootstrapped", "ppo.time_limit", "terminal"),
    ("DDPPO: DistributedDataParallel averages the ranks' gradients", "ddppo.grad_weighting", "ranks"),
]


@pytest.mark.parametrize("preset", PRESETS, ids=[p.name for p in PRESETS])
def test_preset_is_ddppo_pointnav_yaml_key_by_key(hb, preset):
    theirs = ddppo_pointnav(hb)
    ours = OmegaConf.to_container(load_config(preset, [] if "gibson" not in preset.name else
                                              ["sim.backend=embedded", "task.generate_if_missing=true"]))
    for same in SAME:
        expected = same.convert(get(theirs, same.theirs))
        assert get(ours, same.ours) == pytest.approx(expected), f"{same.theirs} -> {same.ours}"
    for pinned in PINNED:
        assert get(theirs, pinned.theirs) == pinned.value, f"{pinned.theirs}: {pinned.why}"
    for what, key, value in CODE:
        assert get(ours, key) == value, f"{key}: {what}"
    assert sorted(get(theirs, SENSORS)) == ["depth_sensor", "rgb_sensor"] and sorted(ours["sim"]["sensors"]) == [
        "depth", "rgb"]
    assert sorted(get(theirs, "habitat.task.actions")) == ["move_forward", "stop", "turn_left", "turn_right"]
    assert ours["ddppo"]["backend"] in ("auto", "nccl") and not ours["transfer"]["checkpoint"]
    # every key of the PPO and DD-PPO sections is accounted for
    accounted = {s.theirs for s in SAME} | {p.theirs for p in PINNED} | set(EXCUSED)
    for section in ("habitat_baselines.rl.ppo", "habitat_baselines.rl.ddppo"):
        for key in get(theirs, section):
            assert f"{section}.{key}" in accounted, f"{section}.{key} is neither mapped, pinned nor excused"
    import inspect

    from habitat_baselines.rl.ddppo.policy.resnet_policy import PointNavResNetPolicy
    assert inspect.signature(PointNavResNetPolicy).parameters["resnet_baseplanes"].default == 32


def leaves(tree: dict, prefix: str):
    """The dotted keys of a config's values (an empty mapping, like an empty list, is a value)."""
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from leaves(value, f"{prefix}.{key}")
        else:
            yield f"{prefix}.{key}"


def test_every_simulator_task_and_environment_key_is_accounted_for(hb):
    """Each key of ddppo_pointnav.yaml's habitat.simulator, habitat.task and habitat.environment, defaults included,
    is mapped to ddppo's key (SAME) or pinned to ddppo's one behaviour (PINNED) -- both checked by value in
    test_preset_is_ddppo_pointnav_yaml_key_by_key -- or listed in NOT_IMPLEMENTED with the reason; a key upstream
    adds fails here until it is placed, and a listed key upstream drops fails too."""
    theirs = ddppo_pointnav(hb)
    keys = {key for section in ("simulator", "task", "environment")
            for key in leaves(theirs["habitat"][section], f"habitat.{section}")}
    checked = {s.theirs for s in SAME} | {p.theirs for p in PINNED}
    both = checked & set(NOT_IMPLEMENTED)
    assert not both, f"both checked and listed as not implemented: {sorted(both)}"
    unplaced = sorted(keys - checked - set(NOT_IMPLEMENTED))
    assert not unplaced, f"neither mapped, pinned nor listed in NOT_IMPLEMENTED: {unplaced}"
    stale = sorted(set(NOT_IMPLEMENTED) - keys)
    assert not stale, f"NOT_IMPLEMENTED lists keys ddppo_pointnav.yaml no longer has: {stale}"
    assert len(keys) > 100 and all(NOT_IMPLEMENTED.values())


def test_gibson_preset_reads_habitats_dataset_layout(hb):
    theirs = ddppo_pointnav(hb)["habitat"]["dataset"]
    raw = OmegaConf.load(PRESETS[1])
    assert raw.sim.backend == "habitat"
    assert theirs["data_path"].format(split="val") == f"{raw.task.data_dir}/val/val.json.gz"
    assert theirs["scenes_dir"] == raw.task.scenes_dir


# ---------------------------------------------------------------------------------------------- returns
def test_returns_equal_habitat_baselines_rollout_storage(hb):
    """A preempted rollout (5 of 7 steps) with episode ends; GAE and, without it, discounted returns (tau = 1)."""
    from gym import spaces
    from habitat_baselines.common.rollout_storage import RolloutStorage as HBStorage

    gen = torch.Generator().manual_seed(3)
    t_max, steps, n, gamma, tau = 7, 5, 3, 0.99, 0.95
    rewards, values = torch.randn(steps, n, generator=gen), torch.randn(steps, n, generator=gen)
    not_done, next_value = torch.rand(steps, n, generator=gen) > 0.3, torch.randn(n, generator=gen)
    stub = types.SimpleNamespace(num_recurrent_layers=1, recurrent_hidden_size=4)
    for use_gae, lam in ((True, tau), (False, 1.0)):
        theirs = HBStorage(t_max, n, spaces.Dict({"x": spaces.Box(0, 1, (1,), np.float32)}), spaces.Discrete(4),
                           stub)
        theirs.buffers["rewards"][:steps] = rewards[..., None]
        theirs.buffers["value_preds"][:steps] = values[..., None]
        theirs.buffers["masks"][1:steps + 1] = not_done[..., None]
        theirs.current_rollout_step_idxs = [steps]
        theirs.compute_returns(next_value[..., None], use_gae, gamma, tau)
        ours = RolloutStorage(t_max, n, {"x": ((1,), torch.float32)}, (1, 4))
        ours.rewards[:steps], ours.values[:steps], ours.not_done[:steps] = rewards, values, not_done.float()
        ours.step = steps
        ours.compute_returns(next_value, gamma, lam)
        torch.testing.assert_close(ours.returns[:steps], theirs.buffers["returns"][:steps, :, 0])
        torch.testing.assert_close(ours.advantages[:steps], ours.returns[:steps] - values)


# ---------------------------------------------------------------------------------------------- PPO loss
class GivenOutputs(torch.nn.Module):
    """Stands in for the network under habitat-baselines' PPO: evaluate_actions returns the given per-sample values,
    log-probabilities and entropies as parameters, so both losses see the same numbers and have gradients."""

    def __init__(self, values, log_probs, entropy):
        super().__init__()
        self.values, self.log_probs, self.entropy = (torch.nn.Parameter(x[:, None].clone())
                                                     for x in (values, log_probs, entropy))

    def evaluate_actions(self, *args, **kwargs):
        return self.values, self.log_probs, self.entropy, None, {}

    def policy_parameters(self):
        return self.parameters()

    def aux_loss_parameters(self):
        return {}


@pytest.mark.parametrize("clipped", [True, False])
def test_ppo_loss_terms_equal_habitat_baselines(hb, clipped):
    from habitat_baselines.rl.ppo.ppo import PPO

    gen = torch.Generator().manual_seed(5)
    b = 64
    old_values, old_log_probs = torch.randn(b, generator=gen), -torch.rand(b, generator=gen) * 2
    values = old_values + torch.randn(b, generator=gen) * 0.3  # about half moved more than the clip of 0.2
    log_probs = old_log_probs + torch.randn(b, generator=gen) * 0.3
    entropy, advantages = torch.rand(b, generator=gen) + 0.5, torch.randn(b, generator=gen)
    returns = torch.randn(b, generator=gen)
    preset = load_config(PRESETS[0]).ppo
    net = GivenOutputs(values, log_probs, entropy)
    ppo = PPO(net, clip_param=preset.clip, ppo_epoch=1, num_mini_batch=1, value_loss_coef=preset.value_coef,
              entropy_coef=preset.entropy_coef, lr=0.0, eps=preset.eps, max_grad_norm=1e9,
              use_clipped_value_loss=clipped, use_normalized_advantage=False)
    batch = {"observations": {}, "recurrent_hidden_states": None, "prev_actions": None, "masks": None,
             "actions": None, "action_log_probs": old_log_probs[:, None], "value_preds": old_values[:, None],
             "returns": returns[:, None], "advantages": advantages[:, None]}
    metrics: dict = collections.defaultdict(list)
    ppo._update_from_batch(batch, 0, None, metrics)  # lr 0: the step leaves the parameters, the gradients stay

    leaves = [x.clone().requires_grad_(True) for x in (values, log_probs, entropy)]
    preset.clipped_value_loss = clipped
    total, info = ppo_loss(leaves[1], old_log_probs, advantages, leaves[0], old_values, returns, leaves[2], preset)
    total.backward()
    for ours, theirs in (("policy_loss", "action_loss"), ("value_loss", "value_loss"), ("entropy", "dist_entropy"),
                         ("clip_fraction", "ppo_fraction_clipped")):
        torch.testing.assert_close(info[ours], metrics[theirs][0].to(info[ours].dtype), msg=ours)
    for leaf, param in zip(leaves, (net.values, net.log_probs, net.entropy)):
        torch.testing.assert_close(leaf.grad, param.grad[:, 0])
    moved = ((values - old_values).abs() >= preset.clip).sum().item()
    assert 0 < moved < b  # both branches of the clip were taken


# ---------------------------------------------------------------------------------------------- policy and checkpoints
RES, HIDDEN, N = 128, 512, 4


@pytest.fixture(scope="module")
def hb_checkpoint(hb, tmp_path_factory):
    """(PointNavResNetPolicy as ddppo_pointnav.yaml builds it, at 128 x 128, its weights and normaliser statistics
    perturbed; the file habitat-baselines' PPOTrainer.save_checkpoint wrote for it)."""
    from gym import spaces
    from habitat_baselines.rl.ddppo.policy.resnet_policy import PointNavResNetPolicy
    from habitat_baselines.rl.ppo.ppo_trainer import PPOTrainer

    out = tmp_path_factory.mktemp("hb_ckpt")
    sides = [f"{SENSORS}.{s}_sensor.{side}={RES}" for s in ("rgb", "depth") for side in ("width", "height")]
    config = ddppo_pointnav(hb, f"habitat_baselines.checkpoint_folder={out}", *sides, as_dict=False)
    obs_space = spaces.Dict({"rgb": spaces.Box(0, 255, (RES, RES, 3), np.uint8),
                             "depth": spaces.Box(0.0, 1.0, (RES, RES, 1), np.float32),
                             GOAL_SENSOR: spaces.Box(-math.inf, math.inf, (2,), np.float32)})
    ddppo_cfg = config.habitat_baselines.rl.ddppo
    torch.manual_seed(0)
    policy = PointNavResNetPolicy(obs_space, spaces.Discrete(4), hidden_size=HIDDEN, rnn_type=ddppo_cfg["rnn_type"],
                                  num_recurrent_layers=ddppo_cfg["num_recurrent_layers"],
                                  backbone=ddppo_cfg["backbone"], normalize_visual_inputs="rgb" in obs_space.spaces)
    with torch.no_grad():
        policy.train()  # the normaliser learns statistics from frames, as in training
        policy.net.visual_encoder(observations(torch.Generator().manual_seed(1), 8))
        for p in policy.parameters():  # GroupNorm's ones and zeros, LSTM's zero biases: all distinct now
            p.add_(0.02 * torch.randn_like(p))
    policy.eval()
    trainer = types.SimpleNamespace(_agent=types.SimpleNamespace(get_save_state=lambda: {
        "state_dict": policy.state_dict()}), config=config)  # what PPOTrainer.save_checkpoint reads of its trainer
    PPOTrainer.save_checkpoint(trainer, "ckpt.0.pth", {"step": 1234, "wall_time": 5.0})
    return policy, out / "ckpt.0.pth"


def observations(gen: torch.Generator, n: int) -> dict[str, torch.Tensor]:
    return {"rgb": torch.randint(0, 256, (n, RES, RES, 3), dtype=torch.uint8, generator=gen),
            "depth": torch.rand(n, RES, RES, 1, generator=gen),
            GOAL_SENSOR: torch.stack([torch.rand(n, generator=gen) * 10,
                                      (torch.rand(n, generator=gen) - 0.5) * 2 * math.pi], -1)}


def preset_policy(hb_file: Path):
    """ddppo's policy built from the preset's policy settings (at the test's image size), the file's weights
    loaded into it: it loads only if the preset's network is habitat-baselines' key for key, shape for shape."""
    cfg = load_config(PRESETS[0], [f"sim.resolution={RES}"])
    spaces = {"rgb": ((RES, RES, 3), torch.uint8), "depth": ((RES, RES, 1), torch.float32),
              GOAL_SENSOR: ((2,), torch.float32)}
    policy = Policy(spaces, cfg.policy)
    policy.load_state_dict(ddppo_state_dict(checkpoint.load(hb_file), policy, str(hb_file)))
    return policy.eval()


def test_policy_gives_habitat_baselines_log_probs_and_values(hb_checkpoint):
    hb_policy, path = hb_checkpoint
    loaded, cfg = policy_from_checkpoint(path)
    assert (cfg.policy.encoder, cfg.policy.rnn_type, cfg.policy.num_recurrent_layers, cfg.sim.resolution) == (
        "resnet50", "lstm", 2, RES)
    ours = preset_policy(path)
    gen = torch.Generator().manual_seed(2)
    obs = observations(gen, N)
    hidden = torch.randn(ours.num_hidden_layers, N, HIDDEN, generator=gen)
    prev, masks = torch.tensor([0, 1, 2, 3]), torch.tensor([1.0, 0.0, 1.0, 1.0])
    with torch.no_grad():
        features, hb_hidden, _ = hb_policy.net(obs, hidden.permute(1, 0, 2), prev[:, None], masks[:, None].bool())
        hb_log_probs = hb_policy.action_distribution(features).logits
        hb_values = hb_policy.critic(features)[:, 0]
        for policy in (ours, loaded):
            logits, values, new_hidden = policy(obs, prev, masks, hidden)
            torch.testing.assert_close(logits.log_softmax(-1), hb_log_probs, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(values, hb_values, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(new_hidden, hb_hidden.permute(1, 0, 2), rtol=1e-4, atol=1e-5)


def test_sequence_evaluation_equals_habitat_baselines(hb_checkpoint):
    """evaluate_actions over 3 steps x 4 environments with episode starts inside (habitat-baselines packs its
    sequences its own way; ddppo its own)."""
    from habitat_baselines.rl.models.rnn_state_encoder import build_pack_info_from_dones, build_rnn_build_seq_info

    hb_policy, path = hb_checkpoint
    ours = preset_policy(path)
    gen, t_len = torch.Generator().manual_seed(4), 3
    obs = observations(gen, t_len * N)
    hidden0 = torch.randn(ours.num_hidden_layers, N, HIDDEN, generator=gen)
    masks = torch.tensor([[1, 0, 1, 1], [1, 1, 0, 1], [0, 1, 1, 1]], dtype=torch.bool)
    prev, actions = torch.randint(0, 4, (t_len, N), generator=gen), torch.randint(0, 4, (t_len, N), generator=gen)
    seq_info = build_rnn_build_seq_info(torch.device("cpu"), build_pack_info_from_dones((~masks).numpy()))
    with torch.no_grad():
        hb_values, hb_log_probs, hb_entropy, _, _ = hb_policy.evaluate_actions(
            obs, hidden0.permute(1, 0, 2), prev.reshape(-1, 1), masks.reshape(-1, 1), actions.reshape(-1, 1),
            seq_info)
        seq_obs = {k: v.reshape(t_len, N, *v.shape[1:]) for k, v in obs.items()}
        log_probs, values, entropy = ours.evaluate_actions(seq_obs, prev, masks.float(), hidden0, actions)
    for a, b in ((log_probs, hb_log_probs), (values, hb_values), (entropy, hb_entropy)):
        torch.testing.assert_close(a.reshape(-1), b.reshape(-1), rtol=1e-4, atol=1e-5)


def test_checkpoint_is_read_without_its_code_and_mismatches_are_refused(hb_checkpoint, tmp_path):
    _, path = hb_checkpoint
    ckpt = checkpoint.load(path)  # the config comes back as plain data
    assert isinstance(ckpt["config"], dict) and ckpt["extra_state"] == {"step": 1234, "wall_time": 5.0}
    assert ckpt["config"]["habitat_baselines"]["rl"]["ddppo"]["backbone"] == "resnet50"
    with pytest.raises(ValueError, match="compression_groups|has shape") as e:  # another encoder: refused
        policy_from_checkpoint(path, ["policy.hidden_size=256"])
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    legacy = tmp_path / "legacy.pth"  # older releases saved the agent's state: every key under actor_critic.
    torch.save({"state_dict": {f"actor_critic.{k}": v for k, v in ckpt["state_dict"].items()}}, legacy)
    with pytest.raises(ValueError, match="compression.0.weight' has shape"):  # no config: 256 x 256 sensors assumed
        policy_from_checkpoint(legacy)
    _, cfg = policy_from_checkpoint(legacy, [f"sim.resolution={RES}"])
    assert cfg.policy.encoder == "resnet50"
    extra = {**ckpt, "state_dict": {**ckpt["state_dict"], "net.gps_embedding.weight": torch.zeros(32, 2)}}
    odd = tmp_path / "odd.pth"
    torch.save(extra, odd)
    with pytest.raises(ValueError, match=r"'net\.gps_embedding\.weight'") as e:
        policy_from_checkpoint(odd)
    assert "\n" not in str(e.value)


def test_ddppo_eval_runs_the_habitat_baselines_checkpoint(hb_checkpoint, tmp_path, capsys):
    """`ddppo eval HB_CHECKPOINT --protocol habitat` on embedded scenes: its own config gives the image size."""
    from ddppo.launch.cli import main as cli_main
    from ddppo.sim.dataset_dir import generate_dataset

    _, path = hb_checkpoint
    data = tmp_path / "data"
    generate_dataset(data, load_config(None, ["dataset.scenes={train: 1, val: 1, test: 1}", "dataset.max_extent=6",
                                              "dataset.episodes_per_scene={train: 2, val: 2, test: 2}"]).dataset,
                     log=lambda *_: None)
    capsys.readouterr()
    assert cli_main(["eval", str(path), "--protocol", "habitat", "--agents", "", "--num-envs", "2", "--out",
                     str(tmp_path / "ev"), f"task.data_dir={data}", "task.max_episode_steps=5"]) == 0
    assert capsys.readouterr().out.startswith("protocol habitat: actions sampled from the policy, every episode")
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["protocol"]["name"] == "habitat" and summary["checkpoint"]["episodes"] == 2


def test_transfer_takes_the_habitat_baselines_encoder(hb_checkpoint, tmp_path):
    """transfer.checkpoint=HB_CHECKPOINT: the visual pathway computes habitat-baselines' visual features, in a run
    whose goal features are ddppo's own form; a compression layer of other groups is refused naming the key."""
    from ddppo.trainer.transfer import apply_transfer

    hb_policy, path = hb_checkpoint
    cfg = load_config(PRESETS[0], [f"sim.resolution={RES}", f"transfer.checkpoint={path}", "transfer.core=load",
                                   "policy.goal_angle=as_read"])
    spaces = {"rgb": ((RES, RES, 3), torch.uint8), "depth": ((RES, RES, 1), torch.float32),
              GOAL_SENSOR: ((2,), torch.float32)}
    policy = Policy(spaces, cfg.policy)
    apply_transfer(policy, cfg, tmp_path, log=lambda *_: None)
    obs = observations(torch.Generator().manual_seed(6), 3)
    with torch.no_grad():
        ours = policy.visual_fc(policy.encode(policy.eval().visual_input(obs)))
        theirs = hb_policy.net.visual_fc(hb_policy.net.visual_encoder(obs))
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
        goal = obs[GOAL_SENSOR]  # ddppo's goal form with the negated column: habitat-baselines' embedding
        torch.testing.assert_close(policy.goal_embed(torch.stack([goal[:, 0], goal[:, 1].cos(), goal[:, 1].sin()], -1)),
                                   hb_policy.net.tgt_embeding(torch.stack([goal[:, 0], (-goal[:, 1]).cos(),
                                                                           (-goal[:, 1]).sin()], -1)))
    assert json.loads((tmp_path / "transfer.json").read_text())["source_env_steps"] == 1234
    other = load_config(PRESETS[0], [f"sim.resolution={RES}", f"transfer.checkpoint={path}",
                                     "policy.compression_groups=0"])
    with pytest.raises(ValueError, match="policy.compression_groups") as e:
        apply_transfer(Policy(spaces, other.policy), other, None, log=lambda *_: None)
    assert "\n" not in str(e.value)
