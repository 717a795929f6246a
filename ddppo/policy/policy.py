"""Recurrent actor-critic policy for PointGoal navigation (DD-PPO / habitat-baselines PointNavResNetPolicy).

Conventions (all batch-first, N environments):
- ``masks`` [N] (float or bool): 0/False means "this step starts a new episode", which resets the
  recurrent state to zeros and the previous action to "none" (embedding index 0).
- The recurrent state is ONE tensor [num_hidden_layers, N, hidden_size]; for an LSTM the h states of all
  layers come first, then the c states.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddppo.config import ConvInit, GoalAngle, PolicyConfig, RnnType, VisualNormalization
from ddppo.policy.encoders import VisualEncoder, make_encoder
from ddppo.policy.packing import episode_segments, run_packed
from ddppo.policy.precision import encode
from ddppo.policy.running_norm import RunningMeanAndVar

GOAL_SENSOR = "pointgoal_with_gps_compass"
RECURRENT_CORES = {RnnType.lstm: nn.LSTM, RnnType.gru: nn.GRU}
"""``policy.rnn_type`` -> the recurrent core (DD-PPO's); ``none`` is a feed-forward Linear + ReLU with an empty state
(for comparisons with feed-forward agents; the previous action still enters, zeroed at episode starts)."""
VISUAL_SENSORS = ("rgb", "depth")
GOAL_EMBED_SIZE = 32
ACTION_EMBED_SIZE = 32

ObsSpaces = dict[str, tuple[tuple[int, ...], torch.dtype]]


def _as_tensor(x: Any, device: torch.device) -> Tensor:
    return torch.as_tensor(x, device=device)


def _mask_bool(masks: Any, device: torch.device) -> Tensor:
    m = _as_tensor(masks, device)
    return m if m.dtype == torch.bool else m != 0


class VisualInput(nn.Module):
    """Observation dict -> normalised channels-first visual tensor [N, C, H', W'].

    RGB (uint8 0..255) is scaled by 1/255, depth is used as is ([0, 1]); present sensors are optionally
    average-pooled by ``avgpool``, concatenated with RGB first and then normalised per channel by a
    ``RunningMeanAndVar`` (``normalizer``; identity when ``normalize`` is false). Images already pooled by
    ``pool`` (rollout storage keeps them so) are recognised by their size and not pooled again.
    """

    def __init__(self, obs_spaces: ObsSpaces, avgpool: int = 1, normalize: bool = True):
        super().__init__()
        if avgpool < 1:
            raise ValueError(f"avgpool must be >= 1, got {avgpool}")
        self.sensors = [k for k in VISUAL_SENSORS if k in obs_spaces]
        if not self.sensors:
            raise ValueError("VisualInput needs an 'rgb' or 'depth' observation")
        hws = {tuple(obs_spaces[k][0][:2]) for k in self.sensors}
        if len(hws) != 1:
            raise ValueError(f"rgb and depth must have the same height and width, got {sorted(hws)}")
        self.raw_hw: tuple[int, int] = hws.pop()  # type: ignore[assignment]
        self.channels_per_sensor = {k: int(obs_spaces[k][0][2]) for k in self.sensors}
        self.out_channels = sum(self.channels_per_sensor.values())
        self.avgpool = int(avgpool)
        self.output_hw = (self.raw_hw[0] // self.avgpool, self.raw_hw[1] // self.avgpool)
        if min(self.output_hw) < 1:
            raise ValueError(f"avgpool {avgpool} is larger than the {self.raw_hw} image")
        self.normalizer: nn.Module = RunningMeanAndVar(self.out_channels) if normalize else nn.Identity()

    def forward(self, obs: dict[str, Any], device: torch.device | None = None) -> Tensor:
        """``device``: where to put the observations; defaults to the normaliser's device (else left as is)."""
        if device is None:
            buf = next(self.buffers(), None)
            device = buf.device if buf is not None else None
        # pool each sensor before concatenating and before scaling RGB: at habitat's 256² the full-resolution
        # float copies and avg_pool2d (slow for 1-4 channels), not the encoder, were most of an action's cost
        parts = []
        for key in self.sensors:
            x = torch.as_tensor(obs[key], device=device)
            x = block_mean(x, self.avgpool) if tuple(x.shape[1:3]) != self.output_hw else x.float()
            if key == "rgb":
                x = x * (1.0 / 255.0)
            parts.append(x)
        x = (torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]).permute(0, 3, 1, 2)
        return self.normalizer(x.contiguous())  # each encoder puts it in the memory format it runs fastest in


    def pooled_spaces(self, obs_spaces: ObsSpaces) -> ObsSpaces:
        """The spaces of ``pool``'s output: visual sensors at the pooled size as float32, the rest unchanged."""
        if self.avgpool == 1:
            return dict(obs_spaces)
        h, w = self.output_hw
        return {k: (((h, w, v[0][2]), torch.float32) if k in self.sensors else v) for k, v in obs_spaces.items()}

    def pool(self, obs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Observations with the visual sensors average-pooled (raw units, float): what the rollout storage
        keeps, so pooling runs once per step rather than at every forward pass over it (act, each PPO epoch)."""
        if self.avgpool == 1:
            return obs
        return {k: (block_mean(v, self.avgpool) if k in self.sensors else v) for k, v in obs.items()}


def block_mean(images: Tensor, k: int) -> Tensor:
    """Float mean over k x k pixel blocks of [N, H, W, C] images (any dtype), as avg_pool2d(kernel=stride=k) would
    give, computed as two strided sums: several times faster on CPU for camera images."""
    n, h, w, c = images.shape
    h2, w2 = h // k, w // k
    rows = images[:, : h2 * k, : w2 * k].reshape(n, h2, k, w2 * k, c).sum(2, dtype=torch.float32)
    return rows.view(n, h2, w2, k, c).sum(3) / (k * k)


def action_log_probs(logits: Tensor, actions: Tensor) -> Tensor:
    """log softmax(logits)[action] per row: Categorical(logits=logits).log_prob(actions) without building one (its
    construction and argument checks cost more than the policy's heads at rollout batch sizes)."""
    return torch.log_softmax(logits, dim=-1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)


def linear(layer: nn.Linear, x: Tensor) -> Tensor:
    """``layer(x)`` without the module call. At rollout batch sizes a module call (more for a Sequential or a ReLU
    module) costs as much as the small layer itself, so the policy applies its per-step layers through these
    two helpers: the same operations and results, but forward hooks registered on those submodules do not fire."""
    return F.linear(x, layer.weight, layer.bias)


def linear_relu(block: nn.Sequential, x: Tensor) -> Tensor:
    """``block(x)`` for a ``Sequential(Linear, ReLU)`` without its three module calls (see :func:`linear`)."""
    return torch.relu_(linear(block[0], x))


def goal_features(goal: Tensor, angle: GoalAngle = GoalAngle.as_read) -> Tensor:
    """[rho, cos(a), sin(a)] from the sensor reading [rho, a] where a = -phi (``angle="as_read"``, ddppo), or
    [rho, cos(-a), sin(-a)] (``"negated"``, habitat-baselines, whose PointNavResNetNet negates the reading once
    more). The two differ only in the sign of one input, which the following linear layer absorbs: same
    capacity, and weights carry over by negating one column (ddppo/policy/habitat_baselines.py does).
    """
    a = goal[:, 1] if angle == GoalAngle.as_read else -goal[:, 1]
    return torch.stack([goal[:, 0], torch.cos(a), torch.sin(a)], dim=-1)


def visual_normalization(setting: VisualNormalization, obs_spaces: ObsSpaces) -> bool:
    """Whether the visual input gets a running mean/var normaliser: ``always`` (ddppo), ``never``, or ``auto``: only
    when RGB is present (habitat-baselines' ``normalize_visual_inputs="rgb" in observation_space``)."""
    return setting == VisualNormalization.always or (setting == VisualNormalization.auto and "rgb" in obs_spaces)


class Policy(nn.Module):
    """Recurrent actor-critic: visual encoder + goal + previous action -> RNN -> policy logits and value.

    Submodule names are stable (a transfer module loads them by name): ``visual_input``, ``encoder``,
    ``visual_fc``, ``goal_embed``, ``action_embed``, ``core``, ``actor``, ``critic``. Blind agents (no rgb
    or depth in ``obs_spaces``) have ``visual_input``, ``encoder`` and ``visual_fc`` set to None; without a
    ``pointgoal_with_gps_compass`` observation ``goal_embed`` is None.
    """

    def __init__(self, obs_spaces: ObsSpaces, cfg: PolicyConfig, num_actions: int = 4):
        """``cfg`` is the config's ``policy`` section (its choices validated when the config loaded) or a
        PolicyConfig; ``obs_spaces`` maps each observation to its (shape, dtype)."""
        super().__init__()
        self.goal_angle = cfg.goal_angle
        self.num_actions = int(num_actions)
        self.hidden_size = hidden_size = int(cfg.hidden_size)
        self.rnn_type = cfg.rnn_type
        self.num_recurrent_layers = int(cfg.num_recurrent_layers)
        self.encoder_name = cfg.encoder
        self.encoder_precision = cfg.encoder_precision
        self.frozen_modules: tuple[str, ...] = ()
        """Submodules that stay in eval mode whatever ``train()`` asks (a frozen transferred encoder: its running
        input statistics must not drift either). Set by ddppo.trainer.transfer."""

        self.visual_input: VisualInput | None = None
        self.encoder: VisualEncoder | None = None
        self.visual_fc: nn.Module | None = None
        core_in = 0
        if any(k in obs_spaces for k in VISUAL_SENSORS):
            self.visual_input = VisualInput(obs_spaces, avgpool=cfg.avgpool,
                                            normalize=visual_normalization(cfg.normalize_visual, obs_spaces))
            self.encoder = make_encoder(cfg.encoder, self.visual_input.out_channels, self.visual_input.output_hw,
                                        cfg.base_planes, cfg.ngroups, cfg.compression_groups)
            if cfg.conv_init == ConvInit.torch_default:
                for module in self.encoder.modules():
                    if isinstance(module, (nn.Conv2d, nn.GroupNorm)):
                        module.reset_parameters()
            self.visual_fc = nn.Sequential(nn.Linear(self.encoder.output_size, hidden_size), nn.ReLU(True))
            core_in += hidden_size

        self.goal_embed: nn.Linear | None = None
        if GOAL_SENSOR in obs_spaces:
            self.goal_embed = nn.Linear(3, GOAL_EMBED_SIZE)
            core_in += GOAL_EMBED_SIZE

        self.action_embed = nn.Embedding(self.num_actions + 1, ACTION_EMBED_SIZE)
        core_in += ACTION_EMBED_SIZE

        if self.rnn_type == RnnType.none:  # feed-forward: one hidden layer of the same width, no state
            self.core: nn.Module = nn.Sequential(nn.Linear(core_in, hidden_size), nn.ReLU(True))
        else:
            self.core = RECURRENT_CORES[self.rnn_type](core_in, hidden_size, num_layers=self.num_recurrent_layers)
        for name, p in self.core.named_parameters():
            if "weight" in name:
                nn.init.orthogonal_(p)
            else:
                nn.init.zeros_(p)

        self.actor = nn.Linear(hidden_size, self.num_actions)
        nn.init.orthogonal_(self.actor.weight, gain=0.01)
        nn.init.zeros_(self.actor.bias)
        self.critic = nn.Linear(hidden_size, 1)
        nn.init.orthogonal_(self.critic.weight, gain=1.0)
        nn.init.zeros_(self.critic.bias)

    def train(self, mode: bool = True) -> Policy:
        super().train(mode)
        for name in getattr(self, "frozen_modules", ()):
            module = getattr(self, name)
            if module is not None:
                module.eval()
        return self

    # ------------------------------------------------------------------ observations as stored

    def storage_spaces(self, obs_spaces: ObsSpaces) -> ObsSpaces:
        """Spaces of the observations as ``preprocess`` returns them, for the rollout storage."""
        return self.visual_input.pooled_spaces(obs_spaces) if self.visual_input is not None else dict(obs_spaces)

    def preprocess(self, obs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Observations as the rollout storage keeps them (visual sensors pooled once); ``forward`` takes either."""
        return self.visual_input.pool(obs) if self.visual_input is not None else obs

    # ------------------------------------------------------------------ recurrent state

    @property
    def num_hidden_layers(self) -> int:
        """Layers of the state tensor: h (and c for an LSTM) per recurrent layer; 0 for a feed-forward core."""
        if self.rnn_type == RnnType.none:
            return 0
        return self.num_recurrent_layers * (2 if self.rnn_type == RnnType.lstm else 1)

    def initial_hidden(self, n: int, device: torch.device | str | None = None) -> Tensor:
        if device is None:
            device = self.actor.weight.device
        return torch.zeros(self.num_hidden_layers, n, self.hidden_size, device=device)

    def _rnn(self, x: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
        if self.rnn_type == RnnType.lstm:
            h, c = hidden.split(self.num_recurrent_layers, dim=0)
            out, (h, c) = self.core(x, (h.contiguous(), c.contiguous()))
            return out, torch.cat([h, c], dim=0)
        out, h = self.core(x, hidden.contiguous())
        return out, h

    def _check_hidden(self, hidden: Tensor, n: int) -> None:
        expected = (self.num_hidden_layers, n, self.hidden_size)
        if tuple(hidden.shape) != expected:
            raise ValueError(f"hidden state must have shape {expected}, got {tuple(hidden.shape)}")

    def _run_core(self, x: Tensor, masks: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """Run the RNN over x [T, N, D] resetting hidden where masks [T, N] (bool) is False.

        One fused RNN call either way: a plain sequence when no environment starts an episode after step 0,
        otherwise each episode segment packed as its own sequence (``ddppo.policy.packing``). Both give
        exactly the step-by-step result.
        """
        if self.rnn_type == RnnType.none:
            return linear_relu(self.core, x), hidden
        if x.shape[0] == 1 or bool(masks[1:].all()):
            return self._rnn(x, hidden * masks[0].to(hidden.dtype).view(1, -1, 1))
        return run_packed(self._rnn, x, hidden, episode_segments(masks))

    def _heads(self, out: Tensor) -> tuple[Tensor, Tensor]:
        """The core's output [..., hidden] -> (action logits [..., A], value [...])."""
        return linear(self.actor, out), linear(self.critic, out).squeeze(-1)

    # ------------------------------------------------------------------ per-step features

    def encode(self, x: Tensor) -> Tensor:
        """The encoder's flat float32 features of normalised visual input ``x`` [B, C, H, W], computed in the
        dtype ``encoder_precision`` gives on x's device (see :func:`ddppo.policy.precision.encode`)."""
        assert self.encoder is not None
        return encode(self.encoder, x, self.encoder_precision)

    def _features(self, obs: dict[str, Any], prev_actions: Any, masks: Tensor) -> Tensor:
        """Non-recurrent input to the core for a flat batch [B]: cat(visual_fc, goal_embed, action_embed)."""
        device = self.actor.weight.device
        feats = []
        if self.encoder is not None:
            assert self.visual_input is not None and self.visual_fc is not None
            feats.append(linear_relu(self.visual_fc, self.encode(self.visual_input(obs, device))))
        if self.goal_embed is not None:
            goal = _as_tensor(obs[GOAL_SENSOR], device).to(self.goal_embed.weight.dtype)
            feats.append(linear(self.goal_embed, goal_features(goal.reshape(-1, 2), self.goal_angle)))
        prev = _as_tensor(prev_actions, device).long().reshape(-1)
        index = (prev + 1) * masks  # 0 ("no previous action") where an episode starts
        feats.append(F.embedding(index, self.action_embed.weight))
        return torch.cat(feats, dim=-1)

    # ------------------------------------------------------------------ public API

    def forward(
        self, obs: dict[str, Any], prev_actions: Any, masks: Any, hidden: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One step for N environments -> (logits [N, A], value [N], new hidden)."""
        device = self.actor.weight.device
        m = _mask_bool(masks, device).reshape(-1)
        n = m.shape[0]
        self._check_hidden(hidden, n)
        x = self._features(obs, prev_actions, m)
        out, hidden = self._run_core(x.unsqueeze(0), m.unsqueeze(0), hidden)
        out = out.squeeze(0)
        return *self._heads(out), hidden

    def act(
        self,
        obs: dict[str, Any],
        prev_actions: Any,
        masks: Any,
        hidden: Tensor,
        deterministic: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Pick actions -> (actions [N] long, log_probs [N], values [N], new hidden)."""
        logits, values, hidden = self.forward(obs, prev_actions, masks, hidden)
        if not bool(torch.isfinite(logits).all()):
            raise FloatingPointError("the policy's action logits are NaN/Inf: check the observations (NaN or Inf in "
                                     "a sensor reading?) and the weights")
        if deterministic:
            actions = logits.argmax(dim=-1)
        else:  # what Categorical(logits).sample() draws, without its per-call construction and checks
            actions = torch.multinomial(torch.softmax(logits, dim=-1), 1, replacement=True).squeeze(-1)
        return actions, action_log_probs(logits, actions), values, hidden

    def evaluate_actions(
        self,
        obs_seq: dict[str, Any],
        prev_actions_seq: Any,
        masks_seq: Any,
        hidden0: Tensor,
        actions_seq: Any,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Re-evaluate a rollout: tensors [T, N, ...], hidden0 the state before step 0.

        Returns (log_probs [T, N], values [T, N], entropy [T, N]), identical to calling ``forward`` step by
        step (the visual encoder runs once on all T*N frames).
        """
        device = self.actor.weight.device
        m = _mask_bool(masks_seq, device)
        t_len, n = m.shape[:2]
        self._check_hidden(hidden0, n)
        flat_obs = {}
        for key, value in obs_seq.items():
            if key in VISUAL_SENSORS or key == GOAL_SENSOR:
                v = _as_tensor(value, device)
                flat_obs[key] = v.reshape(t_len * n, *v.shape[2:])
        prev = _as_tensor(prev_actions_seq, device).reshape(t_len * n)
        x = self._features(flat_obs, prev, m.reshape(t_len * n)).view(t_len, n, -1)
        out, _ = self._run_core(x, m, hidden0)
        logits, values = self._heads(out)
        log_p = torch.log_softmax(logits, dim=-1)
        actions = _as_tensor(actions_seq, device).long().reshape(t_len, n)
        entropy = -(log_p.exp() * log_p).sum(-1)
        return log_p.gather(-1, actions.unsqueeze(-1)).squeeze(-1), values, entropy
