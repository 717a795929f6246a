"""habitat-baselines' PointNavResNetPolicy checkpoints in ddppo: the policy configuration their weights imply, and
their state dict under ddppo's module names.

A habitat-baselines checkpoint (``PPOTrainer.save_checkpoint``) is ``{"state_dict": the policy's weights, "config":
its config, "extra_state": {"step", "wall_time"}}``; ``ddppo.io.checkpoint.load`` reads the config as plain dicts.
Older releases (e.g. the released DD-PPO PointNav weights) prefix every key with ``actor_critic.``. The architecture
is read from the weights themselves (encoder family and width, normaliser, recurrent core), the image size from the
config's sensors. What maps where:

==============================================================  ==============================================
habitat-baselines                                               ddppo
==============================================================  ==============================================
net.visual_encoder.running_mean_and_var._mean/_var/_count       visual_input.normalizer.mean/var/count
net.visual_encoder.backbone.conv1.{0,1}                         encoder.stem.{0,1}
net.visual_encoder.backbone.layer{i}.{j}.convs / .downsample    encoder.layers.{i-1}.{j}.branch / .shortcut
net.visual_encoder.compression                                  encoder.compression
net.visual_fc.1                                                 visual_fc.0
net.tgt_embeding                                                goal_embed
net.prev_action_embedding                                       action_embed
net.state_encoder.rnn                                           core
action_distribution.linear / critic.fc                          actor / critic
==============================================================  ==============================================

habitat-baselines concatenates its visual sensors in sorted order (depth before rgb), ddppo puts RGB first: the
first convolution's input channels and the normaliser's statistics are permuted. Its goal features are
[rho, cos phi, sin phi]: loaded into a policy with ``goal_angle=as_read`` the sin column of the goal embedding is
negated (the same function). Any key without a counterpart, or of another shape, is refused in one line naming it.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from ddppo.config import GoalAngle
from ddppo.policy.policy import VISUAL_SENSORS, Policy

_RENAMES = [
    (re.compile(r"^net\.visual_encoder\.running_mean_and_var\._(mean|var|count)$"), r"visual_input.normalizer.\1"),
    (re.compile(r"^net\.visual_encoder\.backbone\.conv1\.(\d+)\.(\w+)$"), r"encoder.stem.\1.\2"),
    (re.compile(r"^net\.visual_encoder\.backbone\.layer(\d)\.(\d+)\.convs\.(\d+)\.(\w+)$"), None),
    (re.compile(r"^net\.visual_encoder\.backbone\.layer(\d)\.(\d+)\.downsample\.(\d+)\.(\w+)$"), None),
    (re.compile(r"^net\.visual_encoder\.compression\.(\d+)\.(\w+)$"), r"encoder.compression.\1.\2"),
    (re.compile(r"^net\.visual_fc\.1\.(\w+)$"), r"visual_fc.0.\1"),
    (re.compile(r"^net\.tgt_embeding\.(\w+)$"), r"goal_embed.\1"),
    (re.compile(r"^net\.prev_action_embedding\.(\w+)$"), r"action_embed.\1"),
    (re.compile(r"^net\.state_encoder\.rnn\.(\w+)$"), r"core.\1"),
    (re.compile(r"^action_distribution\.linear\.(\w+)$"), r"actor.\1"),
    (re.compile(r"^critic\.fc\.(\w+)$"), r"critic.\1"),
]
HB_CHANNELS_PER_SENSOR = {"depth": 1, "rgb": 3}


def is_habitat_baselines_checkpoint(ckpt: dict) -> bool:
    """habitat-baselines' layout (``state_dict``), not ddppo's (``policy``)."""
    return isinstance(ckpt.get("state_dict"), dict) and "policy" not in ckpt


def _weights(ckpt: dict, source: str) -> dict[str, Tensor]:
    state = ckpt["state_dict"]
    if state and all(k.startswith("actor_critic.") for k in state):  # older releases saved the agent's state
        state = {k[len("actor_critic."):]: v for k, v in state.items()}
    bad = next((k for k, v in state.items() if not torch.is_tensor(v)), None)
    if bad is not None:
        raise ValueError(f"{source}: state_dict key {bad!r} is not a tensor")
    return state


def _sensors(state: dict[str, Tensor]) -> list[str]:
    """The visual sensors, from the first convolution's input channels (habitat-baselines' order: sorted)."""
    conv1 = state.get("net.visual_encoder.backbone.conv1.0.weight")
    if conv1 is None:
        return []
    by_channels = {1: ["depth"], 3: ["rgb"], 4: ["depth", "rgb"]}
    if conv1.shape[1] not in by_channels:
        raise ValueError(f"net.visual_encoder.backbone.conv1.0.weight takes {conv1.shape[1]} channels: not depth (1), "
                         "rgb (3) or both (4)")
    return by_channels[conv1.shape[1]]


def _encoder(state: dict[str, Tensor]) -> str:
    prefix = "net.visual_encoder.backbone."
    if any(".se." in k for k in state if k.startswith(prefix)):
        raise ValueError(f"{prefix}layer1.0.se: a squeeze-excitation backbone, which ddppo has no counterpart of")
    blocks = {int(m[1]) for k in state if (m := re.match(prefix + r"layer3\.(\d+)\.", k))}
    first, last = state.get(prefix + "layer1.0.convs.0.weight"), state.get(prefix + "layer1.0.convs.6.weight")
    if last is None and len(blocks) == 2:
        return "resnet18"
    if last is not None and first is not None and len(blocks) == 6 and last.shape[0] == 4 * first.shape[0]:
        return "resnet50"
    raise ValueError(f"{prefix}layer1-4: a backbone other than resnet18 or resnet50 (ddppo's counterparts of "
                     "habitat-baselines' backbones)")


def policy_overrides(ckpt: dict, source: str) -> list[str]:
    """``key=value`` settings of ddppo's policy (and image size) that reproduce the checkpoint's network."""
    state = _weights(ckpt, source)
    try:
        sensors = _sensors(state)
        out = [f"sim.sensors=[{','.join(sorted(sensors, key=VISUAL_SENSORS.index))}]"]
        if sensors:
            planes = state["net.visual_encoder.backbone.conv1.0.weight"].shape[0]
            normalised = "net.visual_encoder.running_mean_and_var._mean" in state
            out += [f"policy.encoder={_encoder(state)}", f"policy.base_planes={planes}",
                    f"policy.ngroups={planes // 2}", "policy.avgpool=2", "policy.compression_groups=1",
                    f"policy.normalize_visual={'always' if normalised else 'never'}"]
            out.append(f"sim.resolution={_resolution(ckpt.get('config'), sensors)}")
        hh = state["net.state_encoder.rnn.weight_hh_l0"]
        layers = sum(1 for k in state if re.fullmatch(r"net\.state_encoder\.rnn\.weight_ih_l\d+", k))
        gates = hh.shape[0] // hh.shape[1]
        if gates not in (3, 4):
            raise ValueError(f"net.state_encoder.rnn.weight_hh_l0 has shape {tuple(hh.shape)}: not a GRU or an LSTM")
    except KeyError as e:
        raise ValueError(f"{source}: {e.args[0]} is not in the checkpoint (not a PointNavResNetPolicy)") from None
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    return out + [f"policy.hidden_size={hh.shape[1]}", f"policy.rnn_type={'lstm' if gates == 4 else 'gru'}",
                  f"policy.num_recurrent_layers={layers}", "policy.goal_angle=negated"]


def _resolution(config, sensors: list[str]) -> int:
    """The sensors' side from habitat's config (``habitat.simulator.agents.<agent>.sim_sensors``); 256 without one."""
    agents = (((config or {}).get("habitat") or {}).get("simulator") or {}).get("agents") or {}
    sides = {spec.get("width") for agent in agents.values() for name, spec in (agent.get("sim_sensors") or {}).items()
             if name.split("_")[0] in sensors and isinstance(spec, dict)}
    sides.discard(None)
    if len(sides) > 1:
        raise ValueError(f"habitat.simulator sensors of widths {sorted(sides)}: ddppo's sensors share one resolution")
    return int(sides.pop()) if sides else 256


def _ddppo_key(key: str) -> str | None:
    for pattern, replacement in _RENAMES:
        m = pattern.match(key)
        if m is None:
            continue
        if replacement is not None:
            return m.expand(replacement)
        part = "branch" if ".convs." in key else "shortcut"
        return f"encoder.layers.{int(m[1]) - 1}.{m[2]}.{part}.{m[3]}.{m[4]}"
    return None


def ddppo_state_dict(ckpt: dict, policy: Policy, source: str, complete: bool = True) -> dict[str, Tensor]:
    """The checkpoint's weights under ddppo's names: the visual channels in ddppo's order (RGB first), the goal
    embedding in ``policy.goal_angle``'s form. A key without a counterpart is a one-line ValueError naming it. With
    ``complete`` (a whole policy to load) every key must also be one of ``policy``'s, with its shape, and every key
    of ``policy`` must be there; without (ddppo.trainer.transfer takes some modules and checks them itself) not."""
    state = _weights(ckpt, source)
    try:
        order = _channel_order(_sensors(state))
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    mine = policy.state_dict()
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        target = _ddppo_key(key)
        if target is None or (complete and target not in mine):
            raise ValueError(f"{source}: key {key!r} has no counterpart in ddppo's policy"
                             + (f" ({target} is not in this policy)" if target else ""))
        out[target] = _convert(target, value, order, policy.goal_angle)
        if complete and tuple(out[target].shape) != tuple(mine[target].shape):
            raise ValueError(f"{source}: key {key!r} has shape {tuple(value.shape)} but ddppo's {target} has "
                             f"{tuple(mine[target].shape)}")
    missing = next((k for k in mine if k not in out), None) if complete else None
    if missing is not None:
        raise ValueError(f"{source}: ddppo's policy needs {missing}, which the checkpoint does not have")
    return out


def _convert(target: str, value: Tensor, channel_order: Tensor, goal_angle: str) -> Tensor:
    if target in ("encoder.stem.0.weight", "visual_input.normalizer.mean", "visual_input.normalizer.var"):
        return value.index_select(1, channel_order)
    if target == "visual_input.normalizer.count":
        return value.to(torch.float64)
    if target == "goal_embed.weight" and goal_angle == GoalAngle.as_read:
        return value * value.new_tensor([1.0, 1.0, -1.0])  # sin(-a) = -sin(a): the same function
    return value


def _channel_order(sensors: list[str]) -> Tensor:
    """For each visual channel in ddppo's order (RGB first), its index in habitat-baselines' (sensors sorted)."""
    start, theirs = 0, {}
    for name in sorted(sensors):
        theirs[name] = list(range(start, start + HB_CHANNELS_PER_SENSOR[name]))
        start += HB_CHANNELS_PER_SENSOR[name]
    return torch.tensor([c for name in sorted(sensors, key=VISUAL_SENSORS.index) for c in theirs[name]],
                        dtype=torch.long)
