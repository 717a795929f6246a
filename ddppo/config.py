"""The one source of defaults: dataclasses. YAML files in configs/ and ``key=value`` arguments only override them.

Merging and type checks are OmegaConf's (structured configs): an unknown key, a value of the wrong type or a choice
that is not one of its Enum's members fails at start with a one-line error naming the key. Every choice is an Enum
here, validated once, when the config loads; the modules that act on a choice look it up in their own plain dict
(keyed by the Enum) and check nothing again. Checks that span several keys, or ranges, live in ``check``.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ddppo.io.atomic import atomic_write_text


class Choice(str, Enum):
    """A config choice: an Enum whose members are also their names as strings (``RnnType.gru == "gru"``), so a
    dict keyed by members answers to the plain name too, and a choice prints and saves as its name."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


def _choice(name: str, members: str, doc: str) -> type[Choice]:
    enum = Choice(name, [(m, m) for m in members.split()])
    enum.__doc__ = doc
    return enum


Backend = _choice("Backend", "embedded habitat", "sim.backend: the simulator.")
Sensor = _choice("Sensor", "depth rgb", "sim.sensors: the visual sensors.")
KernelChoice = _choice("KernelChoice", "auto numba torch", "sim.kernels: the embedded simulator's kernels.")
TaskType = _choice("TaskType", "pointnav flee exploration", "task.type: the task (ddppo.sim.tasks.TASKS).")
Split = _choice("Split", "train val test", "task.split: the dataset split.")
Encoder = _choice("Encoder", "resnet18 resnet50 se_resneXt50 squeezenet1_1 simple_cnn",
                  "policy.encoder: the visual encoder (ddppo.policy.encoders.ENCODERS).")
RnnType = _choice("RnnType", "lstm gru none", "policy.rnn_type: the recurrent core.")
VisualNormalization = _choice("VisualNormalization", "always never auto", "policy.normalize_visual.")
GoalAngle = _choice("GoalAngle", "as_read negated", "policy.goal_angle.")
ConvInit = _choice("ConvInit", "kaiming_normal torch_default", "policy.conv_init.")
EncoderPrecision = _choice("EncoderPrecision", "float32 bfloat16 auto", "policy.encoder_precision.")
ValueClip = _choice("ValueClip", "max where", "ppo.value_clip.")
TimeLimit = _choice("TimeLimit", "bootstrap terminal", "ppo.time_limit.")
DistBackend = _choice("DistBackend", "auto gloo nccl", "ddppo.backend: torch.distributed's backend.")
GradWeighting = _choice("GradWeighting", "samples ranks", "ddppo.grad_weighting.")
TransferEncoder = _choice("TransferEncoder", "frozen finetune scratch", "transfer.encoder.")
TransferCore = _choice("TransferCore", "load scratch", "transfer.core.")


@dataclass
class SimConfig:
    """The simulator: the embedded one (default) or habitat-sim."""

    backend: Backend = Backend.embedded
    """embedded (ddppo's own, pip-only) | habitat (habitat-sim from conda: scenes and datasets of habitat)."""
    resolution: int = 64
    """Square image side in pixels (habitat's paper used 256; 64 or 128 for fast work)."""
    sensors: list[Sensor] = field(default_factory=lambda: [Sensor.depth])
    """Visual sensors: any of depth, rgb; empty for a blind agent."""
    device: str = "cpu"
    """Where the simulator's tensors live: cpu, cuda, or cuda:N. 'auto' = the trainer's device."""
    kernels: KernelChoice = KernelChoice.auto
    """The implementation of every kernel of the embedded simulator (moves, geodesics, rendering, sensors, PointNav's
    bookkeeping): numba (compiled, CPU) | torch (vectorised, any device) | auto (numba on the CPU, else torch)."""
    renderer: str = ""
    """Deprecated: the earlier name of ``kernels``, read as it (with a warning)."""
    forward_step: float = 0.25
    turn_angle: float = 10.0
    max_depth: float = 10.0
    gpu_device_id: int = -1
    """habitat: the GPU that renders; -1 = the trainer's CUDA device, else the worker's local rank, else (no CUDA
    device) habitat-sim's first EGL device, a software renderer on a machine without a GPU."""


@dataclass
class TaskConfig:
    """The navigation task and its dataset (habitat semantics)."""

    type: TaskType = TaskType.pointnav
    """pointnav | flee | exploration (ddppo/sim/tasks.py). Flee and Exploration run on PointNav episodes: their
    starts, with the goal sensor reading zeros."""
    data_dir: str = "data/pointnav"
    """Dataset root: {split}/{split}.json.gz episodes and scenes/{scene}.npz."""
    split: Split = Split.train
    max_episode_steps: int = 500
    success_distance: float = 0.2
    slack_reward: float = -0.01
    success_reward: float = 2.5
    generate_if_missing: bool = True
    """Generate the embedded dataset (with the settings under ``dataset``) when data_dir has none."""
    scenes_dir: str = ""
    """habitat: where episodes' scene_id paths start (habitat's data/scene_datasets)."""
    scene_dataset_config: str = "default"
    """habitat: habitat-sim's scene dataset config file (.scene_dataset_config.json); default = none."""


@dataclass
class DatasetConfig:
    """What ``ddppo dataset generate`` (and generate_if_missing) builds."""

    seed: int = 0
    scenes: dict[str, int] = field(default_factory=lambda: {"train": 40, "val": 10, "test": 10})
    episodes_per_scene: dict[str, int] = field(default_factory=lambda: {"train": 200, "val": 20, "test": 20})
    episodes_per_goal: int = 4
    """Starts drawn per goal; they share one geodesic field (habitat draws one per goal)."""
    min_extent: float = 5.0
    max_extent: float = 30.0
    max_rooms: int = 12
    max_objects_per_room: int = 3
    min_geodesic: float = 1.0
    max_geodesic: float = 30.0


@dataclass
class PolicyConfig:
    encoder: Encoder = Encoder.resnet18
    """resnet18 | resnet50 | se_resneXt50 | squeezenet1_1 | simple_cnn (ignored for blind agents)."""
    base_planes: int = 32
    ngroups: int = 16
    hidden_size: int = 512
    rnn_type: RnnType = RnnType.lstm
    """lstm | gru | none (a feed-forward Linear + ReLU core, for comparisons with feed-forward agents)."""
    num_recurrent_layers: int = 2
    """Ignored when rnn_type=none."""
    avgpool: int = 1
    """Average-pool the visual input by this factor first (habitat pools 256 -> 128)."""
    normalize_visual: VisualNormalization = VisualNormalization.always
    """always | never | auto: running mean/var normalisation of the visual input; auto = only when RGB is present
    (habitat-baselines). true/false, the earlier boolean form, mean always/never."""
    goal_angle: GoalAngle = GoalAngle.as_read
    """as_read | negated: goal features [rho, cos a, sin a] of the sensor's reading [rho, a = -phi] (ddppo), or of
    -a: [rho, cos phi, sin phi] (habitat-baselines). The linear layer after them absorbs the sign."""
    compression_groups: int = 0
    """GroupNorm groups of the encoder's compression layer: 0 = ngroups (ddppo); habitat-baselines uses 1."""
    conv_init: ConvInit = ConvInit.kaiming_normal
    """kaiming_normal | torch_default: the visual encoder's initial weights (habitat-baselines keeps PyTorch's)."""
    encoder_precision: EncoderPrecision = EncoderPrecision.float32
    """float32 | bfloat16 | auto: what the visual encoder computes in (torch.autocast around it; its weights and
    gradients, the normaliser before it and everything after it stay float32). auto = bfloat16 where the device
    has native bf16 arithmetic (CUDA GPUs that support it; x86 CPUs with AVX512-BF16 or AMX), else float32."""


@dataclass
class PPOConfig:
    """The numbers of habitat-baselines' ddppo_pointnav.yaml; where ddppo's defaults differ (value_clip, time_limit)
    docs/habitat_baselines.md says why."""

    num_steps: int = 128
    num_envs: int = 4
    """Environments per worker (rank)."""
    ppo_epoch: int = 2
    num_mini_batch: int = 2
    lr: float = 2.5e-4
    eps: float = 1e-5
    clip: float = 0.2
    value_coef: float = 0.5
    entropy_coef: float = 0.01
    max_grad_norm: float = 0.2
    gamma: float = 0.99
    tau: float = 0.95
    clipped_value_loss: bool = True
    value_clip: ValueClip = ValueClip.max
    """How the clipped value loss clips: max = 0.5 max((V - R)^2, (V_clip - R)^2) (ddppo, PPO's original form) |
    where = 0.5 (V' - R)^2 with V' = V where |V - V_old| < clip, else V_clip (habitat-baselines)."""
    time_limit: TimeLimit = TimeLimit.bootstrap
    """bootstrap | terminal: an episode cut by task.max_episode_steps is bootstrapped from the value of its last
    observation (ddppo: the cut is not a state of the task) or treated as terminal (habitat-baselines)."""
    normalize_advantages: bool = False
    """Normalise each rollout's advantages over all ranks (mean and variance all-reduced)."""
    lr_decay: bool = False
    """Linear decay of the learning rate to 0 by the fraction of total_steps done."""
    max_bad_updates: int = 3
    """An update whose loss or gradient is NaN/Inf is skipped (logged as train/skipped_updates); this many in a row
    stop the run with an error, the resume state holding the weights from before the first of them."""


@dataclass
class DDPPOConfig:
    sync_frac: float = 0.6
    """A worker stops collecting once this fraction of workers finished (and it has >= 25% of its steps)."""
    min_rollout_frac: float = 0.25
    backend: DistBackend = DistBackend.auto
    """gloo | nccl | auto (nccl on CUDA, gloo on CPU)."""
    preemption: bool = True
    grad_weighting: GradWeighting = GradWeighting.samples
    """samples | ranks: gradients averaged over every worker's samples (ddppo: one update over the concatenation) or
    each worker's mean gradient averaged with equal weight (habitat-baselines' DistributedDataParallel)."""
    slowdown: float = 0.0
    """Benchmarks and tests only: extra seconds per environment step on the rank given by slow_rank."""
    slow_rank: int = -1


@dataclass
class TransferConfig:
    """Start from another run's weights (ddppo/trainer/transfer.py); the run records them in transfer.json."""

    checkpoint: str = ""
    """A training checkpoint (runs/<name>/checkpoints/ckpt_*.pt) to take weights from; empty = none."""
    encoder: TransferEncoder = TransferEncoder.finetune
    """frozen | finetune | scratch: the visual pathway (visual_input, encoder, visual_fc) is loaded and kept fixed
    (eval mode, no gradient), loaded and trained, or freshly initialised."""
    core: TransferCore = TransferCore.scratch
    """load | scratch: the recurrent core with its goal and action embeddings. Actor and critic are always new."""
    encoder_lr_scale: float = 1.0
    """The visual pathway's learning rate is ppo.lr times this (fine-tuning often wants less than 1)."""


@dataclass
class TrainConfig:
    """Everything ``ddppo train`` reads."""

    name: str = "pointnav"
    run_dir: str = "runs"
    seed: int = 1
    device: str = "auto"
    """cpu | cuda | auto (cuda:LOCAL_RANK when available)."""
    total_steps: int = 2_000_000
    """Environment steps over all workers."""
    num_threads: int = 0
    """torch threads per worker, which the renderer uses too; 0 = torch's default (torchrun sets 1; under SLURM,
    the task's CPUs)."""
    keep_freed_memory: bool = True
    """Have glibc's malloc keep freed blocks up to 32 MB for reuse rather than unmapping them
    (ddppo.trainer.malloc_settings.keep_freed_memory): on CPU, a PPO update otherwise page-faults its
    activations in afresh every minibatch."""
    checkpoint_interval: int = 50
    """Updates between checkpoints."""
    keep_checkpoints: int = 3
    log_interval: int = 5
    """Updates between TensorBoard writes."""
    eval_episodes: int = 100
    """Deterministic val episodes evaluated at the end of training and at every eval_interval (0 = none)."""
    eval_interval: int = 0
    """Updates between evaluations on the val split during training, logged as eval/* (0 = only at the end)."""
    sim: SimConfig = field(default_factory=SimConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    ddppo: DDPPOConfig = field(default_factory=DDPPOConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    config_file: str = ""
    """Set by the loader: the YAML file this run came from."""


class ConfigError(ValueError):
    """A bad key, value or file; the message is one line naming it."""


def load_config(config_file: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                schema=TrainConfig, saved: dict | None = None):
    """Defaults <- YAML file <- ``saved`` (a config a checkpoint holds) <- ``key=value`` overrides, validated;
    returns a typed OmegaConf object."""
    cfg = OmegaConf.structured(schema)
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            cfg = OmegaConf.merge(cfg, _read_earlier_forms(OmegaConf.load(path)))
        except OmegaConfBaseException as e:
            raise ConfigError(f"config file {path}: {_one_line(e)}") from None
        except Exception as e:  # YAML syntax errors come from the parser
            raise ConfigError(f"config file {path}: {_one_line(e)}") from None
        cfg.config_file = str(path)
    if saved is not None:
        try:
            cfg = OmegaConf.merge(cfg, _read_earlier_forms(OmegaConf.create(saved)))
        except Exception as e:
            raise ConfigError(_one_line(e)) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        # one at a time, so the error names the item; any exception (YAML's parser rejecting a control character,
        # OmegaConf merging a list into a mapping) is bad input, not a crash
        try:
            cfg = OmegaConf.merge(cfg, _read_earlier_forms(OmegaConf.from_dotlist([item])))
        except Exception as e:
            msg = _one_line(e)  # names the item, unless the message begins with its key already
            raise ConfigError(msg if msg.startswith(item.split("=", 1)[0]) else f"override {item!r}: {msg}") from None
    try:  # ${...} interpolations and ??? resolve now, not at first use hours into a run
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None
    (check if schema is TrainConfig else check_dataset)(cfg)
    return cfg


def _read_earlier_forms(raw):
    """Values that configs, run directories and checkpoints saved before a key took names still hold, as the names:
    ``policy.normalize_visual`` true/false is always/never. ``raw`` is an untyped config, changed in place."""
    policy = raw.get("policy") if OmegaConf.is_dict(raw) else None
    if OmegaConf.is_dict(policy) and isinstance(policy.get("normalize_visual"), bool):
        policy.normalize_visual = "always" if policy.normalize_visual else "never"
    return raw


def _one_line(e: Exception) -> str:
    """OmegaConf's error in one line naming the key; a value that is not one of a choice's members reads as
    ``key='value': use one of a, b, c``, as every other bad value does."""
    msg = str(e).strip().splitlines()
    first = msg[0] if msg else type(e).__name__
    key = next((line.split(":", 1)[1].strip() for line in msg if line.strip().startswith("full_key:")), "")
    choice = re.fullmatch(r"Invalid value '(.*)', expected one of \[(.*)\]", first)
    if choice and key:
        return f"{key}={choice[1]!r}: use one of {choice[2]}"
    return f"{first} (key: {key})" if key and key not in first else first


def check(cfg: TrainConfig) -> None:
    """Constraints that span keys or ranges OmegaConf's types cannot express."""

    def need(ok: bool, msg: str):
        if not ok:
            raise ConfigError(msg)

    read_renamed_keys(cfg)  # here, as every config passes through: loaded ones and those of checkpoints
    sim, ppo, task, dd = cfg.sim, cfg.ppo, cfg.task, cfg.ddppo
    check_dataset(cfg.dataset, "dataset.")
    need(8 <= sim.resolution <= 1024, f"sim.resolution={sim.resolution} must be in [8, 1024]")
    need(ppo.num_envs >= 1, f"ppo.num_envs={ppo.num_envs} must be >= 1")
    need(ppo.num_steps >= 4, f"ppo.num_steps={ppo.num_steps} must be >= 4")
    need(1 <= ppo.num_mini_batch <= ppo.num_envs,
         f"ppo.num_mini_batch={ppo.num_mini_batch} must be between 1 and ppo.num_envs={ppo.num_envs} "
         "(minibatches split environments so recurrent sequences stay whole)")
    need(ppo.ppo_epoch >= 1, f"ppo.ppo_epoch={ppo.ppo_epoch} must be >= 1")
    need(ppo.max_bad_updates >= 1, f"ppo.max_bad_updates={ppo.max_bad_updates} must be >= 1")
    for name in ("lr", "eps", "clip", "max_grad_norm"):
        need(math.isfinite(ppo[name]) and ppo[name] > 0, f"ppo.{name}={ppo[name]} must be > 0 and finite")
    for name in ("value_coef", "entropy_coef"):
        need(math.isfinite(ppo[name]) and ppo[name] >= 0, f"ppo.{name}={ppo[name]} must be >= 0 and finite")
    for name in ("log_interval", "checkpoint_interval"):  # both are divisors of the update count
        need(cfg[name] >= 1, f"{name}={cfg[name]} must be >= 1")
    for name in ("eval_interval", "eval_episodes", "num_threads"):
        need(cfg[name] >= 0, f"{name}={cfg[name]} must be >= 0")
    for name in ("forward_step", "max_depth"):
        need(math.isfinite(sim[name]) and sim[name] > 0, f"sim.{name}={sim[name]} must be > 0 and finite")
    need(0 < sim.turn_angle <= 180, f"sim.turn_angle={sim.turn_angle} must be in (0, 180]")
    need(math.isfinite(task.success_distance) and task.success_distance > 0,
         f"task.success_distance={task.success_distance} must be > 0 and finite")
    for name in ("hidden_size", "num_recurrent_layers", "base_planes", "ngroups"):
        need(cfg.policy[name] >= 1, f"policy.{name}={cfg.policy[name]} must be >= 1")
    need(0 < ppo.gamma <= 1 and 0 <= ppo.tau <= 1, "ppo.gamma must be in (0, 1] and ppo.tau in [0, 1]")
    need(0 < dd.sync_frac <= 1, f"ddppo.sync_frac={dd.sync_frac} must be in (0, 1]")
    need(0 < dd.min_rollout_frac <= 1, f"ddppo.min_rollout_frac={dd.min_rollout_frac} must be in (0, 1]")
    tr = cfg.transfer
    need(tr.encoder_lr_scale > 0, f"transfer.encoder_lr_scale={tr.encoder_lr_scale} must be > 0")
    need(bool(tr.checkpoint) or (tr.encoder != "frozen" and tr.core != "load"),
         f"transfer.encoder={tr.encoder} transfer.core={tr.core}: name the weights with transfer.checkpoint=PATH")
    need(task.max_episode_steps >= 1, f"task.max_episode_steps={task.max_episode_steps} must be >= 1")
    need(cfg.total_steps >= 1, f"total_steps={cfg.total_steps} must be >= 1")
    need(cfg.keep_checkpoints >= 1, f"keep_checkpoints={cfg.keep_checkpoints} must be >= 1")
    need(cfg.policy.compression_groups >= 0, f"policy.compression_groups={cfg.policy.compression_groups} must be >= 0")
    need(cfg.policy.avgpool >= 1, f"policy.avgpool={cfg.policy.avgpool} must be >= 1")
    need(sim.resolution // cfg.policy.avgpool >= 16 or not sim.sensors,
         f"sim.resolution={sim.resolution} / policy.avgpool={cfg.policy.avgpool} leaves < 16 pixels")
    check_backend(cfg)


def read_renamed_keys(cfg: TrainConfig) -> None:
    """Keys that configs, run directories and checkpoints still hold under an earlier name, read as the new one with
    a one-line warning: ``sim.renderer`` is ``sim.kernels`` (it always picked every kernel, not only the renderer).
    The old key is emptied, so the saved config names each setting once."""
    sim = cfg.sim
    if sim.renderer in ("", "auto"):  # "auto", the old default, is in every config saved before the rename
        sim.renderer = ""
        return
    if sim.renderer not in ("numba", "torch"):
        raise ConfigError(f"sim.renderer={sim.renderer!r}: use auto, numba or torch (better: sim.kernels)")
    if sim.kernels == "auto":  # the new key, when set, wins
        sim.kernels = sim.renderer
    print(f"ddppo: warning: sim.renderer is deprecated, use sim.kernels (it picks every simulator kernel); "
          f"sim.renderer={sim.renderer} read as sim.kernels={sim.kernels}", file=sys.stderr)
    sim.renderer = ""


def check_backend(cfg: TrainConfig) -> None:
    """The simulator backend's own constraints (that habitat-sim imports is ddppo.sim.environments.require_backend's
    to check: the launcher calls it right after loading the config)."""
    sim, task = cfg.sim, cfg.task
    if sim.backend == Backend.embedded:
        return
    if task.type != TaskType.pointnav:
        raise ConfigError(f"task.type={task.type!r} runs on sim.backend=embedded only (habitat: pointnav)")
    if task.generate_if_missing:
        raise ConfigError("task.generate_if_missing=true would write embedded scenes into a habitat dataset; "
                          "set it false for sim.backend=habitat")
    if not task.scenes_dir:
        raise ConfigError("task.scenes_dir is empty: sim.backend=habitat needs the scene directory "
                          "(e.g. data/scene_datasets)")


def check_dataset(ds, prefix: str = "") -> None:
    """Constraints of a DatasetConfig (``prefix`` names it inside a TrainConfig)."""

    def need(ok: bool, msg: str):
        if not ok:
            raise ConfigError(prefix + msg)

    bad = sorted(set(ds.scenes) - {"train", "val", "test"})
    need(not bad, f"scenes: unknown split(s) {bad}; use train, val, test")
    need(all(n >= 0 for n in ds.scenes.values()), "scenes: counts must be >= 0")
    need(all(n >= 1 for k, n in ds.episodes_per_scene.items() if ds.scenes.get(k, 0) > 0),
         "episodes_per_scene: every split with scenes needs >= 1 episode per scene")
    need(ds.episodes_per_goal >= 1, f"episodes_per_goal={ds.episodes_per_goal} must be >= 1")
    need(2.0 <= ds.min_extent <= ds.max_extent <= 200.0,
         f"min_extent={ds.min_extent}, max_extent={ds.max_extent}: need 2 <= min_extent <= max_extent <= 200")
    need(0 < ds.min_geodesic < ds.max_geodesic,
         f"min_geodesic={ds.min_geodesic}, max_geodesic={ds.max_geodesic}: need 0 < min < max")
    need(ds.max_rooms >= 1 and ds.max_objects_per_room >= 0, "max_rooms must be >= 1, max_objects_per_room >= 0")


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    atomic_write_text(path, OmegaConf.to_yaml(cfg))

